"""The notebooks as committed: valid, without outputs, parameters first (no kernel is started).

Strip them before committing: .venv/bin/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_both_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["capsule_pictures.ipynb", "model_analysis.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_come_first_as_plain_assignments(path):
    nb = nbformat.read(str(path), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.metadata.get("tags") == ["parameters"]
    assert "PIPELINE_ROOT = " in first.source
    for line in first.source.splitlines():
        assert " = " in line and not line.startswith((" ", "import", "from")), line
    assert nb.metadata["kernelspec"]["name"] == "python3"
