"""notebooks/recipe_search.py on history files in the standalone trainer's own format."""

import csv

import pytest

from models.train import HISTORY_FIELDS
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


def test_a_record_is_drawn_with_the_runs_and_saved_back(tmp_path):
    record = tmp_path / "record.csv"
    record.write_text("epoch,old,seed\n1,90,70\n2,48,60\n3,,50\n")
    new = write_history(tmp_path / "new", [80, 30, 20, 15])
    text = recipe_search.report([f"new={new}"], str(tmp_path / "c.png"), str(record), save=True)
    lines = text.splitlines()
    assert lines[0] == "| epoch | old | seed | new |"
    assert lines[4] == "| 3 |  | 50 (1.00 %) | 20 (0.40 %) |"
    assert lines[5] == "| 4 |  |  | 15 (0.30 %) |"
    assert "- old: 2 epochs; last 48 valid errors; fewest 48 (epoch 2)" in lines  # no seconds
    assert record.read_text() == ("epoch,old,seed,new\n1,90,70,80\n2,48,60,30\n3,,50,20\n"
                                  "4,,,15\n")
    # drawn again from the record alone, as from a clone: the same table
    assert recipe_search.report([], str(tmp_path / "d.png"), str(record)) == text.replace(
        "; median 102 s an epoch", "")


def test_nothing_to_draw_and_a_save_without_a_record_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no runs"):
        recipe_search.report([], str(tmp_path / "x.png"))
    with pytest.raises(SystemExit):
        recipe_search.main(["--out", str(tmp_path / "x.png"), "--save-record"])
