"""Both notebooks, executed headless (nbclient) against a smoke pipeline run.

The run is the shared `runs` fixture's (tests/conftest.py) right after its third run, which blessed
and pushed the smoke model (bar 1.0). If other tests have added runs to that output dir already,
the module makes a blessed smoke run of its own instead. Then:
  model_analysis.ipynb    against the pipeline root: values equal TFMA's, figures are drawn;
  capsule_pictures.ipynb  against the pushed model: the PNGs exist with their pixel sizes;
and the pushed model's reconstructions are closer to their own inputs than to other digits'.
"""

import base64
import io
import json
import os
import pathlib

import matplotlib.image
import nbformat
import numpy as np
import pytest
from ml_metadata.metadata_store import metadata_store
from nbclient import NotebookClient
from tfx import v1 as tfx

from models.capsnet import visualize
from pipeline import configs, mlmd, summary
from pipeline.evaluation import ACCURACY
from tests.conftest import latest_nodes, run_local

pytestmark = pytest.mark.e2e
NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
N_TEST = configs.PRESETS["smoke"].split_sizes()["test"]
# The test appends a cell that prints the values the notebook computed, as JSON, after this.
REPORT_PREFIX = "NOTEBOOK_VALUES "


def latest_evaluator_execution(out) -> int:
    config = tfx.orchestration.metadata.sqlite_metadata_connection_config(
        str(out / "metadata.sqlite"))
    store = metadata_store.MetadataStore(config)
    return mlmd.latest_execution(store, str(out / "pipeline_root"), "Evaluator").execution.id


@pytest.fixture(scope="module")
def run(runs, tmp_path_factory):
    out, nodes = runs["out"], runs["nodes"][2]
    if latest_evaluator_execution(out) != nodes["Evaluator"].execution.id:
        out = tmp_path_factory.mktemp("notebook_run")
        run_local(out, *runs["flags"], "--max-test-error", "1.0")
        nodes = latest_nodes(out)
    pushed = nodes["Pusher"].output("pushed_model").custom_properties
    assert pushed["pushed"].int_value == 1
    return {"out": out, "nodes": nodes, "pushed": pushed["pushed_destination"].string_value}


def execute(name, parameters, report, cwd):
    """Runs notebooks/<name> with its first (parameters) cell replaced, plus a last cell that
    prints `report` (an expression over the notebook's variables) as JSON. Returns the
    executed notebook and the reported values."""
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    first.source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json\n"
        "def _plain(value):  # numpy and pandas scalars; pandas' NA\n"
        "    return value.item() if hasattr(value, 'item') else None\n"
        f"print({REPORT_PREFIX!r} + json.dumps({report}, default=_plain))"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    line = next(l for l in text.splitlines() if l.startswith(REPORT_PREFIX))
    return nb, json.loads(line[len(REPORT_PREFIX):])


def tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, tag
    return cells[0]


def png_sizes(cell):
    """(height, width) of every PNG the cell displayed."""
    sizes = []
    for output in cell.outputs:
        data = output.get("data", {})
        if "image/png" in data:
            image = matplotlib.image.imread(io.BytesIO(base64.b64decode(data["image/png"])))
            sizes.append(image.shape[:2])
    return sizes


def text_of(cell):
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   + o.get("data", {}).get("text/markdown", "") for o in cell.outputs)


@pytest.fixture(scope="module")
def analysis_nb(run, tmp_path_factory):
    report = ("{'evaluation_uri': EVALUATION_URI, 'model_dir': MODEL_DIR, 'overall': overall, "
              "'blessed': blessed, 'validation': validation.to_dict('records'), "
              "'per_digit': per_digit['example_count'].to_dict(), "
              "'confusion': confusion.tolist(), 'misclassified': len(wrong['index']), "
              "'robustness_uri': ROBUSTNESS_URI, 'robustness_rows': robustness_rows, "
              "'robustness_examples': {k: v.tolist() for k, v in robustness_examples.items() "
              "if k != 'image'}}")
    return execute("model_analysis.ipynb",
                   {"PIPELINE_ROOT": str(run["out"] / "pipeline_root"), "METADATA_PATH": None,
                    "MAX_MISCLASSIFIED": 100},
                   report, cwd=NOTEBOOKS)


@pytest.fixture(scope="module")
def pictures_nb(run, tmp_path_factory, mnist_cache_dir):
    out_dir = tmp_path_factory.mktemp("pictures")
    nb, values = execute(
        "capsule_pictures.ipynb",
        {"PIPELINE_ROOT": str(run["out"] / "pipeline_root"), "METADATA_PATH": None,
         "MODEL": run["pushed"], "OUT_DIR": str(out_dir), "DIGITS": [3, 8],
         "N_RECONSTRUCTED": 50, "MNIST_CACHE_DIR": mnist_cache_dir},
        "{'model': MODEL, 'out_dir': OUT_DIR}", cwd=NOTEBOOKS)
    return nb, values, out_dir


def test_analysis_finds_the_latest_evaluator_output_through_ml_metadata(run, analysis_nb):
    _, values = analysis_nb
    nodes = run["nodes"]
    assert values["evaluation_uri"] == nodes["Evaluator"].output("evaluation").uri
    assert values["model_dir"] == os.path.join(nodes["Trainer"].output("model").uri,
                                               "Format-Serving")


def test_analysis_shows_tfma_overall_metrics_and_the_blessing(run, analysis_nb):
    nb, values = analysis_nb
    evaluation = run["nodes"]["Evaluator"].output("evaluation").uri
    tfma_overall = summary.overall_metrics(evaluation)
    assert values["overall"]["example_count"] == N_TEST == tfma_overall["example_count"]
    assert values["overall"]["accuracy"] == pytest.approx(tfma_overall[ACCURACY], abs=1e-9)
    assert values["overall"]["error"] == pytest.approx(1 - tfma_overall[ACCURACY], abs=1e-9)
    assert values["blessed"] is True
    shown = text_of(tagged(nb, "overall"))
    assert f"Test accuracy {tfma_overall[ACCURACY]:.2%}" in shown and "BLESSED" in shown
    accuracy_bar = [r for r in values["validation"] if r["metric"] == ACCURACY][0]
    assert accuracy_bar["passed"] is True and accuracy_bar["allowed_errors"] == N_TEST
    assert accuracy_bar["errors"] == values["overall"]["errors"]
    assert accuracy_bar["margin"] == pytest.approx(
        tfma_overall[ACCURACY] - (1 - (N_TEST + 0.5) / N_TEST), abs=1e-6)
    assert any("not applied" in r["threshold"] for r in values["validation"])  # first blessing


def test_analysis_draws_per_digit_slices_and_the_confusion_matrix(analysis_nb, mnist_arrays):
    nb, values = analysis_nb
    per_digit = {int(k): v for k, v in values["per_digit"].items()}
    assert per_digit == dict(enumerate(np.bincount(mnist_arrays.y_test[:N_TEST]).tolist()))
    confusion = np.array(values["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == N_TEST
    assert confusion.sum(axis=1).tolist() == [per_digit[d] for d in range(10)]
    assert np.trace(confusion) == N_TEST - values["overall"]["errors"]
    assert len(png_sizes(tagged(nb, "per-digit"))) == 1
    assert len(png_sizes(tagged(nb, "confusion-matrix"))) == 1
    widget = tagged(nb, "tfma-widget")
    assert not [o for o in widget.outputs if o.output_type == "error"]


def test_analysis_shows_the_misclassified_digits(analysis_nb):
    nb, values = analysis_nb
    assert values["misclassified"] == values["overall"]["errors"] > 0
    assert len(png_sizes(tagged(nb, "misclassified"))) == 1
    assert f"{values['misclassified']} of {N_TEST} test digits misclassified" in text_of(
        tagged(nb, "misclassified"))


def test_analysis_shows_the_robustness_of_both_models_per_transform(run, analysis_nb):
    """The run had --robustness (the third of the `runs` fixture): the notebook finds its
    Evaluator through ML Metadata, plots and tabulates every slice of TFMA's output, and shows
    examples with each model's answer, the answers the Evaluator scored."""
    from pipeline import robustness

    nb, values = analysis_nb
    uri = run["nodes"]["RobustnessEvaluator"].output("evaluation").uri
    assert values["robustness_uri"] == uri
    results = robustness.accuracies(uri)
    rows = values["robustness_rows"]
    assert {(r["transform"], r["magnitude"]) for r in rows} == {k for k in results
                                                                if len(k) == 2}
    for r in rows:
        result = results[(r["transform"], r["magnitude"])]
        assert (r["capsnet"], r["cnn"], r["examples"]) == pytest.approx(
            (result.accuracy["capsnet"], result.accuracy["cnn"], result.examples))
    assert len(png_sizes(tagged(nb, "robustness-plot"))) == 1
    examples = values["robustness_examples"]
    assert set(examples["transform"]) == {r["transform"] for r in rows}
    assert len(examples["capsnet"]) == len(examples["cnn"]) == len(examples["label"]) > 0
    assert len(png_sizes(tagged(nb, "robustness-examples"))) == 1
    widget = tagged(nb, "robustness-widget")
    assert not [o for o in widget.outputs if o.output_type == "error"]


def test_pictures_notebook_writes_and_shows_the_pngs(run, pictures_nb):
    nb, values, out_dir = pictures_nb
    assert values["model"] == run["pushed"]
    assert sorted(os.listdir(out_dir)) == ["manipulate-3.png", "manipulate-8.png",
                                           "real_and_recon.png"]
    # Default --scale 2: 50 digits in 5 rows of 10, each row above its reconstructions.
    assert matplotlib.image.imread(str(out_dir / "real_and_recon.png")).shape[:2] == (560, 560)
    for digit in (3, 8):  # 16 dimensions x 11 perturbations
        image = matplotlib.image.imread(str(out_dir / f"manipulate-{digit}.png"))
        assert image.shape[:2] == (16 * 56, 11 * 56)
    assert png_sizes(tagged(nb, "real-and-recon")) == [(560, 560)]
    assert png_sizes(tagged(nb, "manipulate")) == [(896, 616)] * 2
    assert "centred cosine similarity" in text_of(tagged(nb, "closeness"))


def test_reconstructions_of_the_pushed_model_match_their_own_inputs(run, mnist_arrays):
    """The pictures come from the trained decoder: each reconstruction looks more like its own
    input than like the other digits' inputs. A 40-step smoke decoder draws mostly the average
    digit, so compare what each picture adds to the average (centred cosine similarity).

    Pictures unrelated to their inputs would beat the other digits' average for about half of
    the images, and the mean margin own - others, in units of its standard error, would be a
    standard normal draw. So: a majority, and that margin over 5 standard errors. (The share
    alone is noisy on a 40-step model: 0.586, 0.644 and 0.68 in three runs; a fixed 0.6 failed.)"""
    model = visualize.load_inference_model(run["pushed"])
    images, labels = mnist_arrays.x_test[:N_TEST], mnist_arrays.y_test[:N_TEST]
    _, recons = visualize.reconstruct(model, images)
    x = images.reshape(N_TEST, -1) / 255.0
    r = recons.reshape(N_TEST, -1).astype("float64")
    x, r = x - x.mean(0), r - r.mean(0)
    similarity = (r / np.linalg.norm(r, axis=1, keepdims=True)) @ \
        (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    other = labels[:, None] != labels[None, :]
    own, others = np.diag(similarity), (similarity * other).sum(1) / other.sum(1)
    margin = own - others
    standard_errors = margin.mean() / (margin.std(ddof=1) / np.sqrt(N_TEST))
    assert np.mean(own > others) > 0.5 and standard_errors > 5, (np.mean(own > others),
                                                                 standard_errors)


def test_run_report_writes_the_figures_and_the_record(run, tmp_path):
    """notebooks/run_report.py, the maker of docs/results.md's record: its PNGs, and numbers
    equal to the Evaluator's and the TensorBoard events'."""
    from notebooks import analysis, run_report
    text = run_report.report(str(run["out"] / "pipeline_root"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(run_report.FIGURES)
    for name in run_report.FIGURES:
        assert matplotlib.image.imread(str(tmp_path / name)).shape[0] > 200
    total = analysis.overall(run["nodes"]["Evaluator"].output("evaluation").uri)
    assert (f"Test error (Evaluator): {total['error']:.2%} ({total['errors']} of {N_TEST}; "
            f"the bar allows {N_TEST})") in text
    assert "Model: BLESSED" in text and f"Pushed to: {run['pushed']}" in text
    valid = configs.PRESETS["smoke"].split_sizes()["valid"]
    assert f"First epoch with valid error <= 100.00%: 1 (valid split: {valid} examples)" in text
    curves = analysis.training_curves(run["nodes"]["Trainer"].output("model_run").uri)
    accuracy = curves.query("run == 'validation' and metric == 'lengths_accuracy'")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 2 |")]
    assert len(rows) == 2
    for row, value in zip(rows, accuracy.sort_values("epoch")["value"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5] == f"{value:.2%}" and int(cells[7]) == round((1 - value) * valid)
