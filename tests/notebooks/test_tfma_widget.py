"""TFMA's own slicing-metrics widget, rendered in a real browser (headless Chromium).

The notebook server `make notebooks` starts (notebooks/server.py: the classic Notebook UI with
TFMA's nbextension enabled), on 127.0.0.1 and a free port, serves a copy of
notebooks/model_analysis.ipynb whose parameters name the shared smoke run's pipeline root (the
session's `runs` fixture, tests/conftest.py: no pipeline runs here); its kernel starts in the
repository's notebooks/, as the committed notebook's would. Chromium runs the notebook's cells
through the last TFMA widget cell, then each widget cell is checked: the custom element is
defined and in that cell's output, carries the run's slices with their metric names and values,
and no "Error displaying widget" shows; the console has no JavaScript error but the failed
requests to Google's fonts and chart loader (offline; browser.EXPECTED_OFFLINE). A screenshot of
each widget cell is saved in $TEST_ARTIFACTS_DIR (default outputs/test-artifacts/).

The robustness section's widget (the CapsNet's accuracy per transform family, against the CNN
as its baseline; the `runs` fixture's third run has --robustness) is checked the same way.

Needs Debian's chromium and chromium-driver (.ci/run installs them): skips without them, fails
under CI=true.
"""

import os
import pathlib

import nbformat
import pytest

from notebooks import analysis, server
from pipeline.evaluation import ACCURACY
from tests.notebooks import browser

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "model_analysis.ipynb"
ARTIFACTS = pathlib.Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "outputs" / "test-artifacts"))
SLICING_CELL = "tfma-widget"  # the tag of render_slicing_metrics(..., slicing_column="label")
ROBUSTNESS_CELL = "robustness-widget"  # ... of the robustness Evaluator, slicing_column="transform"
WIDGET_CELLS = [SLICING_CELL, ROBUSTNESS_CELL]  # every cell that shows a TFMA widget, in order


def widget_first(cells, widget_tag, static_tag):
    """The cell tagged `widget_tag` comes right before the one tagged `static_tag`."""
    tags = [c.metadata.get("tags", []) for c in cells]
    i = next(i for i, t in enumerate(tags) if widget_tag in t)
    return i + 1 < len(cells) and static_tag in tags[i + 1]


def test_the_slicing_cells_show_tfmas_widget_first_then_the_static_chart_and_table():
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert widget_first(nb.cells, SLICING_CELL, "per-digit")
    assert widget_first(nb.cells, ROBUSTNESS_CELL, "robustness-plot")
    for tag in WIDGET_CELLS:
        assert "render_slicing_metrics" in next(
            c.source for c in nb.cells if tag in c.metadata.get("tags", []))


@pytest.fixture(scope="module")
def evaluation(runs):
    """The pipeline root of the session's smoke runs and the latest Evaluator output under it
    (the one the notebook finds through ML Metadata)."""
    pipeline_root = str(runs["out"] / "pipeline_root")
    store = analysis.open_store(pipeline_root)
    evaluator = analysis.latest_execution(store, pipeline_root, "Evaluator")
    robustness = analysis.latest_robustness(store, pipeline_root)
    return {"pipeline_root": pipeline_root, "uri": evaluator.output("evaluation").uri,
            "robustness_uri": robustness.output("evaluation").uri}


@pytest.fixture(scope="session")
def chromium_installed():
    browser.require_chromium()  # before `evaluation`, which may start the smoke runs


@pytest.fixture(scope="module")
def page(chromium_installed, evaluation, tmp_path_factory):
    """Chromium on the analysis notebook in `make notebooks`' server, cells run through the
    last TFMA widget cell."""
    tmp = tmp_path_factory.mktemp("tfma_widget")
    contents = tmp / "contents"
    contents.mkdir()
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    first.source = (f"PIPELINE_ROOT = {evaluation['pipeline_root']!r}\n"
                    "METADATA_PATH = None\nMAX_MISCLASSIFIED = 100")
    nbformat.write(nb, str(contents / NOTEBOOK.name))
    with browser.notebook_server(contents, kernel_dir=NOTEBOOK.parent,
                                 log_path=tmp / "server.log") as (base, token):
        with browser.chromium(tmp / "chromium-profile") as driver:
            browser.open_notebook(driver,
                                  f"{base}{server.NOTEBOOK_URL}{NOTEBOOK.name}?token={token}")
            browser.run_cells_through(driver, WIDGET_CELLS[-1])
            yield driver


def screenshot(widget, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    widget["cell"].screenshot(str(path))
    print(f"screenshot: {path}")
    return path


@pytest.mark.e2e
def test_slicing_metrics_widget_carries_the_runs_per_digit_slices(page, evaluation):
    widget = browser.tfma_widget(page, SLICING_CELL, browser.TFMA_ELEMENTS["slicing"])
    per_digit = analysis.per_digit(evaluation["uri"])
    assert list(per_digit.index) == list(range(10))
    expected = {f"label:{digit}": {"example_count": row.example_count, ACCURACY: row.accuracy}
                for digit, row in per_digit.iterrows()}
    browser.check_slicing_metrics(widget, expected)
    assert page.execute_script("return arguments[0].getBoundingClientRect().height",
                               widget["element"]) > 100
    assert screenshot(widget, "tfma_slicing_metrics.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_robustness_widget_carries_each_transform_familys_slice(page, evaluation):
    """The second TFMA widget of the page draws too (notebooks/tfma_loader.js: without it,
    "Could not create a model" and "Error displaying widget"), with the CapsNet's accuracy per
    transform family and its difference to the CNN's."""
    from pipeline import robustness

    widget = browser.tfma_widget(page, ROBUSTNESS_CELL, browser.TFMA_ELEMENTS["slicing"])
    results = robustness.accuracies(evaluation["robustness_uri"])
    families = {key[0]: result for key, result in results.items() if len(key) == 1}
    assert set(families) == {"identity", "translate", "rotate", "scale", "shear", "affine"}
    # The CapsNet's own metrics, and TFMA's differences against its baseline, the CNN.
    expected = {f"transform:{family}": {
        "example_count": result.examples, "example_count_diff": 0.0,
        ACCURACY: result.accuracy[robustness.CANDIDATE],
        f"{ACCURACY}_diff": (result.accuracy[robustness.CANDIDATE]
                             - result.accuracy[robustness.BASELINE])}
        for family, result in families.items()}
    browser.check_slicing_metrics(widget, expected, abs=1e-6)
    assert screenshot(widget, "tfma_robustness.png").stat().st_size > 10_000


@pytest.mark.e2e
def test_no_widget_error_and_no_javascript_error_but_googles_offline_requests(page):
    for tag in WIDGET_CELLS:
        browser.tfma_widget(page, tag)  # waits until each has drawn
    outputs = page.execute_script("return Array.from(document.querySelectorAll("
                                  "'#notebook .output_area'), o => o.innerText)")
    assert outputs and not [o for o in outputs if "Error displaying widget" in o]
    unexpected, offline = browser.unexpected_console_errors(page)
    assert not unexpected, "\n".join(unexpected)
    print("expected offline:\n" + "\n".join(offline))
