"""notebooks/recipe_search.py on history files in the standalone trainer's own format."""

import csv

import pytest

from models.capsnet.train import HISTORY_FIELDS
from notebooks import recipe_search


def write_history(run_dir, valid_errors, seconds=100.0):
    run_dir.mkdir()
    with open(run_dir / recipe_search.HISTORY, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for epoch, errors in enumerate(valid_errors, start=1):
            writer.writerow({"epoch": epoch, "learning_rate": 1e-3, "loss": 0.1,
                             "lengths_loss": 0.05, "recon_loss": 0.1, "train_accuracy": 0.99,
                             "valid_errors": errors, "valid_error": errors / 5000,
                             "seconds": seconds + epoch})
    return str(run_dir)


def test_the_table_the_summaries_and_the_plot(tmp_path):
    a = write_history(tmp_path / "a", [70, 31, 18])
    b = write_history(tmp_path / "b", [60, 40])  # still going: a blank cell at epoch 3
    out = tmp_path / "fig" / "curves.png"
    text = recipe_search.report([f"cosine={a}", b], str(out))
    lines = text.splitlines()
    assert lines[0] == "| epoch | cosine | b |"
    assert lines[2] == "| 1 | 70 (1.40 %) | 60 (1.20 %) |"
    assert lines[4] == "| 3 | 18 (0.36 %) |  |"
    assert ("- cosine: 3 epochs; last 18 valid errors; fewest 18 (epoch 3); "
            "median 102 s an epoch") in lines
    assert ("- b: 2 epochs; last 40 valid errors; fewest 40 (epoch 2); "
            "median 102 s an epoch") in lines
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dir_without_a_history_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history.csv"):
        recipe_search.report([str(tmp_path)], str(tmp_path / "x.png"))
