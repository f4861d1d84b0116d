"""notebooks/analysis.py without a pipeline run: paths, similarity measures, figures.
(The ML Metadata and TFMA readers run in test_notebooks.py, against a real run.)"""

import matplotlib
import numpy as np
import pandas as pd
import pytest

from notebooks import analysis

matplotlib.use("Agg")


def test_metadata_next_to_the_pipeline_root(tmp_path):
    assert analysis.default_metadata_path("/x/out/pipeline_root") == "/x/out/metadata.sqlite"
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        analysis.open_store(str(tmp_path / "pipeline_root"))


def test_reconstruction_measures_prefer_the_own_input():
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(6, 28, 28)) < 0.2).astype("uint8") * 255
    labels = np.array([0, 1, 2, 3, 4, 5])
    # A decoder that draws a blurred average plus a little of each input.
    recons = 0.8 * images.mean(0) / 255.0 + 0.2 * images / 255.0
    own, others = analysis.reconstruction_distances(images, labels, recons)
    assert own.shape == others.shape == (6,) and np.all(own < others)
    own, others = analysis.reconstruction_similarity(images, labels, recons)
    np.testing.assert_allclose(own, 1.0, atol=1e-6)  # exactly its own input, once centred
    assert np.all(others < 0.5)
    same = np.zeros(6, int)  # no other digit in the batch: nothing to compare with
    with np.errstate(invalid="ignore", divide="ignore"):
        assert np.isnan(analysis.reconstruction_similarity(images, same, recons)[1]).all()


def test_figures():
    table = pd.DataFrame({"example_count": [5, 4], "accuracy": [0.8, 1.0]},
                         index=pd.Index([0, 1], name="digit"))
    table["errors"] = [1, 0]
    fig = analysis.plot_per_digit(table, 0.9)
    assert [t.get_text() for t in fig.axes[0].texts] == ["1/5", "0/4"]
    matrix = np.array([[4, 1], [0, 4]])
    fig = analysis.plot_confusion_matrix(matrix)
    assert "9 test examples" in fig.axes[0].get_title()
    wrong = {"label": np.array([4]), "predicted": np.array([9]), "score": np.array([0.61])}
    assert analysis.misclassified_titles(wrong) == ["4 → 9 (0.61)"]
    fig = analysis.plot_digits(np.zeros((13, 28, 28), "uint8"), ["t"] * 13, cols=10)
    assert len(fig.axes) == 20 and sum(len(ax.images) for ax in fig.axes) == 13
    curves = pd.DataFrame([{"run": r, "epoch": e, "metric": m, "value": 1.0 / e}
                           for r in ("train", "validation") for e in (1, 2)
                           for m in analysis.CURVES])
    fig = analysis.plot_training_curves(curves)
    assert [ax.get_title() for ax in fig.axes] == list(analysis.CURVES)
    assert all(len(ax.lines) == 2 for ax in fig.axes)
