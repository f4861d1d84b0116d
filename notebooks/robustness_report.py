"""The robustness evaluation's figures and table for the docs, from a run's ML Metadata: the
latest robustness Evaluator under a pipeline root (a `local_runner.py --robustness` run, or the
output dir of `python -m pipeline.robustness`), the models it compared and the examples it read.

    python -m notebooks.robustness_report --pipeline-root $OUT/pipeline_root \\
        --out docs/images/robustness [--digit 4]

Writes to --out:
  by_transform.png  accuracy against magnitude, one panel per family, CapsNet against CNN, and
                    the affine mix (notebooks/analysis.py's plot_robustness, as in the notebook)
  rotation.png      the README's picture: accuracy against the rotation angle for both models,
                    above one typical test digit rotated from -45° to +45° with each model's
                    answer under it
and prints the Markdown table of every slice (pipeline/robustness.py's `table`).

"Typical": of the official test images of --digit that both models classify right, the one
whose CapsNet score (its capsule's length) is the median.
"""

import argparse
import os
import sys
from typing import Dict

import numpy as np

from notebooks import analysis

STRIP_ANGLES = (-45, -30, -15, 0, 15, 30, 45)


def typical_digit(images: np.ndarray, labels: np.ndarray, digit: int,
                  model_dirs: Dict[str, str]) -> np.ndarray:
    """The test image of `digit` both models classify right whose CapsNet score is the median
    of theirs (module docstring)."""
    mine = images[labels == digit]
    answers = {name: analysis.predict(path, mine) for name, path in model_dirs.items()}
    right = np.all([classes == digit for classes, _ in answers.values()], axis=0)
    scores = answers["capsnet"][1][right, digit]
    return mine[right][np.argsort(scores)[len(scores) // 2]]


def rotation_strip(image: np.ndarray, model_dirs: Dict[str, str]) -> dict:
    """The image rotated by each of STRIP_ANGLES (data/affine.py's warp), and each model's
    answer: {'angle', 'image', <model>: classes}."""
    from data import affine

    rotated = np.stack([affine.warp(image, affine.rotation(a)) for a in STRIP_ANGLES])
    return {"angle": np.array(STRIP_ANGLES), "image": rotated,
            **{name: analysis.predict(path, rotated)[0] for name, path in model_dirs.items()}}


def plot_rotation(rows, strip: dict, digit: int):
    """Accuracy against the rotation angle (both models) above the rotated digit's strip."""
    import matplotlib.pyplot as plt

    from pipeline import robustness

    curve = analysis.robustness_curve(rows, "rotate")
    n = len(strip["angle"])
    fig = plt.figure(figsize=(1.15 * n, 4.6), dpi=100)
    grid = fig.add_gridspec(2, n, height_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[0, :])
    for model, style in (("capsnet", "o-"), ("cnn", "s--")):
        ax.plot([r["magnitude"] for r in curve], [r[model] for r in curve], style,
                label=robustness.NAMES[model])
    ax.set(xlabel="rotation (degrees, either direction)", ylabel="test accuracy",
           ylim=(min(0.5, min(min(r["capsnet"], r["cnn"]) for r in curve) - 0.05), 1.0),
           title="Rotated test digits (28×28): the CapsNet against the paper's CNN")
    ax.set_xticks([r["magnitude"] for r in curve])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    for i in range(n):
        cell = fig.add_subplot(grid[1, i])
        cell.imshow(strip["image"][i], cmap="gray_r", vmin=0, vmax=255)
        cell.set_title(f"{strip['angle'][i]:+d}°", fontsize=8)
        cell.set_xlabel(f"C {strip['capsnet'][i]} · N {strip['cnn'][i]}", fontsize=8,
                        color="black" if strip["capsnet"][i] == strip["cnn"][i] == digit
                        else "tab:red")
        cell.set_xticks([])
        cell.set_yticks([])
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m notebooks.robustness_report",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-root", required=True, help="the run's pipeline root")
    p.add_argument("--metadata-path",
                   help="its ML Metadata (default: metadata.sqlite beside the pipeline root)")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--digit", type=int, default=4, choices=range(10),
                   help="the digit of the rotation strip (default: 4)")
    p.add_argument("--data-cache-dir", help="MNIST cache, as local_runner.py --data-cache-dir")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    import matplotlib
    matplotlib.use("Agg")

    from components.affine_example_gen import read_counts
    from data import mnist
    from pipeline import robustness

    store = analysis.open_store(args.pipeline_root, args.metadata_path)
    run = analysis.latest_robustness(store, args.pipeline_root)
    if run is None:
        p.error(f"no robustness evaluation under {args.pipeline_root}: run with --robustness "
                f"or python -m pipeline.robustness")
    uri = run.output("evaluation").uri
    model_dirs = {"capsnet": analysis.serving_model_dir(run.input("model")),
                  "cnn": analysis.serving_model_dir(run.input("baseline_model"))}
    rows = analysis.robustness_rows(uri)
    os.makedirs(args.out, exist_ok=True)
    analysis.plot_robustness(rows).savefig(os.path.join(args.out, "by_transform.png"))
    data = mnist.load(cache_dir=args.data_cache_dir, allow_network=False)[0]
    digit = typical_digit(data.x_test, data.y_test, args.digit, model_dirs)
    plot_rotation(rows, rotation_strip(digit, model_dirs), args.digit).savefig(
        os.path.join(args.out, "rotation.png"))
    counts = read_counts(run.input("examples").uri)
    print("\n".join([*robustness.summary_lines(uri), "",
                     *robustness.table(robustness.accuracies(uri), counts)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
