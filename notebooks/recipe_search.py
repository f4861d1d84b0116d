"""The record of a recipe search for docs/results.md: the per-epoch valid curves of standalone
trainer runs (`python -m models.capsnet.train`, each in its own --output-dir) side by side.

    python -m notebooks.recipe_search --out docs/images/recipe-search/valid_curves.png \
        cos2e-3_w1=~/capsnet-runs/cos2e-3_w1 exp0.75=~/capsnet-runs/exp0.75

NAME=DIR names a run (a bare DIR is named after its last path component). Reads DIR/history.csv
(models.capsnet.train.HISTORY_FIELDS), prints a Markdown table of the valid errors per epoch (one
column a run; a run still going has blank cells past its last epoch) and each run's summary
(last epoch, fewest valid errors and where, median seconds an epoch), and draws the valid error
of every run against the epoch into one PNG. Reads only the valid split's figures: the test split
plays no part in choosing a recipe.
"""

import argparse
import os
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

import pandas as pd

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
    best = errors.idxmin()
    seconds = statistics.median(history["seconds"])
    return (f"- {name}: {len(history)} epochs; last {int(errors.iloc[-1])} valid errors; fewest "
            f"{int(errors.min())} (epoch {best}); median {seconds:.0f} s an epoch")


def plot(histories: Dict[str, pd.DataFrame], out: str) -> None:
    """Valid error (%) against the epoch, one line per run, into the PNG `out`."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot(history.index, 100 * history["valid_error"], marker="o", label=name)
    ax.axhline(0.4, color="grey", linestyle=":", label="0.4 % (the blessing bar on test)")
    ax.set(xlabel="epoch", ylabel="valid error (%, log scale)",
           title="Recipe search: valid error by epoch")
    ax.set_yscale("log")  # the end of the curves, 0.3-0.6 %, is what a search compares
    ax.grid(alpha=0.3)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(runs: Sequence[str], out: str) -> str:
    histories = dict(read_history_of(spec) for spec in runs)
    plot(histories, out)
    lines: List[str] = [errors_table(histories), ""]
    lines += [summary(name, history) for name, history in histories.items()]
    return "\n".join(lines)


def read_history_of(spec: str) -> Tuple[str, pd.DataFrame]:
    name, path = parse_run(spec)
    return name, read_history(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=DIR or DIR: a standalone trainer's --output-dir")
    p.add_argument("--out", required=True, help="the PNG to draw")
    args = p.parse_args(argv)
    print(report(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
