"""The record of a recipe search for docs/results.md: the per-epoch valid curves of standalone
trainer runs (`python -m models.train`, each in its own --output-dir) side by side.

    python -m notebooks.recipe_search --record docs/data/recipe_search_valid_errors.csv \
        --out docs/images/recipe-search/valid_curves.png [NAME=DIR ...] [--save-record]

NAME=DIR names a run (a bare DIR is named after its last path component). Reads DIR/history.csv
(models.train.HISTORY_FIELDS), prints a Markdown table of the valid errors per epoch (one
column a run; a run still going has blank cells past its last epoch) and each run's summary
(last epoch, fewest valid errors and where, median seconds an epoch), and draws the valid error
of every run against the epoch into one PNG. Reads only the valid split's figures: the test split
plays no part in choosing a recipe.

--record CSV adds the runs recorded there (an `epoch` column, then one column of valid errors a
run): the search's record, committed, so that the table and the plot are redrawn from a clone
after the runs' own directories are gone. --save-record writes every run shown back to it.
"""

import argparse
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from data.splits import DEFAULT_VALID_SIZE

HISTORY = "history.csv"


def parse_run(spec: str) -> Tuple[str, str]:
    """'NAME=DIR' or 'DIR' -> (name, expanded dir)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = name
        name = os.path.basename(os.path.normpath(os.path.expanduser(path)))
    return name, os.path.expanduser(path)


def read_history(run_dir: str) -> pd.DataFrame:
    """The run's history.csv indexed by epoch; a clear error where there is none."""
    path = os.path.join(run_dir, HISTORY)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no history.csv (is {run_dir} a standalone trainer's "
                                "--output-dir with at least one epoch done?)")
    history = pd.read_csv(path).set_index("epoch")
    if "valid_errors" not in history.columns:
        raise ValueError(f"{path} has no valid_errors column (columns: {list(history.columns)}): "
                         "a run of the trainer from before it reported the valid split")
    return history


def read_record(path: str) -> Dict[str, pd.DataFrame]:
    """{name: history} from a record CSV (epoch, then valid errors a run). A recorded history has
    valid_errors and valid_error (of the 5,000 valid images); its seconds are not recorded."""
    record = pd.read_csv(path).set_index("epoch")
    histories = {}
    for name in record.columns:
        errors = record[name].dropna().astype(int)
        histories[name] = pd.DataFrame({"valid_errors": errors,
                                        "valid_error": errors / DEFAULT_VALID_SIZE,
                                        "seconds": float("nan")})
    return histories


def save_record(histories: Dict[str, pd.DataFrame], path: str) -> None:
    """Every run's valid errors into the record CSV `path`: an epoch column, a column a run."""
    record = pd.DataFrame({name: h["valid_errors"] for name, h in histories.items()})
    record.index.name = "epoch"
    record.astype("Int64").to_csv(path)


def errors_table(histories: Dict[str, pd.DataFrame]) -> str:
    """Valid errors per epoch, a column per run: Markdown."""
    epochs = sorted(set().union(*(h.index for h in histories.values())))
    lines = ["| epoch | " + " | ".join(histories) + " |", "|---:|" + "---:|" * len(histories)]
    for epoch in epochs:
        cells = [cell(h, epoch) for h in histories.values()]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(history: pd.DataFrame, epoch: int) -> str:
    if epoch not in history.index or pd.isna(history.loc[epoch, "valid_errors"]):
        return ""
    row = history.loc[epoch]
    return f"{int(row['valid_errors'])} ({100 * row['valid_error']:.2f} %)"


def summary(name: str, history: pd.DataFrame) -> str:
    """One line: epochs done, the last epoch's and the fewest valid errors, seconds an epoch."""
    errors = history["valid_errors"].dropna()
    line = (f"- {name}: {len(history)} epochs; last {int(errors.iloc[-1])} valid errors; fewest "
            f"{int(errors.min())} (epoch {errors.idxmin()})")
    seconds = history["seconds"].dropna()
    return line + (f"; median {statistics.median(seconds):.0f} s an epoch" if len(seconds) else "")


def plot(histories: Dict[str, pd.DataFrame], out: str) -> None:
    """Valid error (%) against the epoch, one line per run, into the PNG `out`."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, history in histories.items():
        ax.plot(history.index, 100 * history["valid_error"], marker="o", markersize=3, label=name)
    ax.axhline(0.4, color="grey", linestyle=":", label="0.4 % (the blessing bar on test)")
    ax.set(xlabel="epoch", ylabel="valid error (%, log scale)",
           title="Recipe search: valid error by epoch")
    # The end of the curves, 0.3-0.6 %, is what a search compares: the first epochs (up to 16 %
    # where the weight average starts up) run off the top.
    ax.set_yscale("log")
    ax.set_ylim(0.2, 2.0)
    ticks = [0.2, 0.3, 0.4, 0.6, 1.0, 2.0]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(runs: Sequence[str], out: str, record: Optional[str] = None,
           save: bool = False) -> str:
    """Table and summaries (Markdown) of the recorded runs, then the runs' dirs; the plot to
    `out`; with `save`, every run shown written back to `record`."""
    histories = read_record(record) if record else {}
    histories.update(read_history_of(spec) for spec in runs)
    if not histories:
        raise ValueError("no runs: give NAME=DIR arguments, --record CSV or both")
    plot(histories, out)
    if save:
        save_record(histories, record)
    lines: List[str] = [errors_table(histories), ""]
    lines += [summary(name, history) for name, history in histories.items()]
    return "\n".join(lines)


def read_history_of(spec: str) -> Tuple[str, pd.DataFrame]:
    name, path = parse_run(spec)
    return name, read_history(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="NAME=DIR or DIR: a standalone trainer's --output-dir")
    p.add_argument("--out", required=True, help="the PNG to draw")
    p.add_argument("--record", help="a record CSV of earlier runs' valid errors to add")
    p.add_argument("--save-record", action="store_true",
                   help="write every run shown back to --record")
    args = p.parse_args(argv)
    if args.save_record and not args.record:
        p.error("--save-record needs --record")
    print(report(args.runs, args.out, args.record, args.save_record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
