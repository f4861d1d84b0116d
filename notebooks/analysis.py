"""The logic behind model_analysis.ipynb and capsule_pictures.ipynb, importable and tested.

Everything starts from ML Metadata, as TFX's own tools do: the latest Evaluator (or Trainer)
execution that wrote under a pipeline root gives the TFMA output, the blessing, the model it judged
and the examples it read. Cached executions count: TFX records them with the outputs they reused.

  open_store(pipeline_root, metadata_path)       the SQLite store of a local run
  latest_execution(store, pipeline_root, 'Evaluator')   -> ComponentRun (inputs, outputs)
  overall / validation_table / per_digit / confusion_matrix   read the TFMA output
  misclassified(model, examples)                  the test digits the model gets wrong
  training_curves(model_run)                      the Trainer's per-epoch TensorBoard scalars
  training_history(store, trainer), epoch_table   the same across the killed runs it resumed
  latest_robustness, robustness_rows / _examples  the robustness Evaluator (--robustness): the
                                                  accuracy of both models per transform, and
                                                  examples with each model's answer
  plot_*                                          static matplotlib figures (render anywhere)
"""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from models import features
from pipeline import evaluation, mlmd

_FIGURE_DPI = 100


# --------------------------------------------------------------------------------------------
# ML Metadata
# --------------------------------------------------------------------------------------------

def default_metadata_path(pipeline_root: str) -> str:
    """local_runner.py's layout: <output dir>/pipeline_root beside <output dir>/metadata.sqlite."""
    return os.path.join(os.path.dirname(os.path.abspath(pipeline_root)), "metadata.sqlite")


def open_store(pipeline_root: str, metadata_path: Optional[str] = None):
    """The ML Metadata store of a local run (SQLite); read-only use, nothing is created."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    path = metadata_path or default_metadata_path(pipeline_root)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no ML Metadata at {path}; run the pipeline first (make run) or set METADATA_PATH")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return metadata_store.MetadataStore(config)


# The runs themselves: pipeline/mlmd.py, the reader the end-of-run summary uses too.
ComponentRun = mlmd.ComponentRun
latest_execution = mlmd.latest_execution
producer = mlmd.producer


def serving_model_dir(model) -> str:
    """The SavedModel dir of a Model artifact (MLMD proto), as TFX's own components find it."""
    from tfx.types import standard_artifacts
    from tfx.utils import path_utils

    artifact = standard_artifacts.Model()
    artifact.set_mlmd_artifact(model)
    return path_utils.serving_model_path(artifact.uri, path_utils.is_old_model_artifact(artifact))


def split_dir(examples, split: str) -> str:
    """The directory of one split of an Examples artifact (MLMD proto)."""
    from tfx.types import artifact_utils, standard_artifacts

    artifact = standard_artifacts.Examples()
    artifact.set_mlmd_artifact(examples)
    return artifact_utils.get_split_uri([artifact], split)


# --------------------------------------------------------------------------------------------
# TFMA output
# --------------------------------------------------------------------------------------------

def overall(evaluation_uri: str) -> Dict[str, float]:
    """Test accuracy, error, example count and number of errors on the whole test split."""
    from pipeline.evaluation import ACCURACY

    metrics = mlmd.slice_metrics(evaluation_uri)[()]
    count = int(metrics["example_count"])
    return {"accuracy": metrics[ACCURACY], "error": 1.0 - metrics[ACCURACY],
            "example_count": count, "errors": round((1.0 - metrics[ACCURACY]) * count)}


def validation_table(evaluation_uri: str):
    """One row per threshold of the evaluation: what it asks, the value, passed or not, by how
    much (margin = value - bound, negative when failed), and for the accuracy bar the allowed
    and actual number of misclassified test examples. A pandas DataFrame.

    TFX's Evaluator drops change thresholds when there is no blessed baseline model yet (the first
    blessed model); a row says so.
    """
    import pandas as pd
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.writers import eval_config_writer

    eval_config = eval_config_writer.load_eval_run(evaluation_uri)[0]
    failures = {(f.metric_key.name, f.metric_key.is_diff): f
                for per_slice in tfma.load_validation_result(evaluation_uri)
                .metric_validations_per_slice for f in per_slice.failures}
    total = overall(evaluation_uri)
    values = mlmd.slice_metrics(evaluation_uri)[()]
    regression = "no regression vs. the latest blessed model"
    rows, has_change = [], False
    for spec in eval_config.metrics_specs:
        for metric in spec.metrics:
            name = _metric_name(metric.class_name)
            for per_slice in metric.per_slice_thresholds:
                threshold = per_slice.threshold
                if threshold.HasField("value_threshold"):
                    rows.append(_value_row(name, threshold.value_threshold, values.get(name),
                                           failures.get((name, False)), total))
                if threshold.HasField("change_threshold"):
                    has_change = True
                    failure = failures.get((name, True))
                    rows.append({"metric": name, "threshold": regression,
                                 "value": failure.metric_value.double_value.value
                                 if failure else None, "passed": failure is None})
    if not has_change:
        rows.append({"metric": "", "threshold": f"{regression}: not applied (no blessed "
                     "baseline model to compare with)", "value": None, "passed": None})
    table = pd.DataFrame(rows)
    for column in ("errors", "allowed_errors"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def _metric_name(class_name: str) -> str:
    import re
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def _value_row(name, bounds, value, failure, total) -> dict:
    if failure is not None:
        value = failure.metric_value.double_value.value
    lower = bounds.lower_bound.value if bounds.HasField("lower_bound") else None
    upper = bounds.upper_bound.value if bounds.HasField("upper_bound") else None
    margins = ([value - lower] if lower is not None else []) + \
        ([upper - value] if upper is not None else [])
    row = {"metric": name,
           "threshold": " and ".join(([f">= {lower:.6g}"] if lower is not None else []) +
                                     ([f"<= {upper:.6g}"] if upper is not None else [])),
           "value": value, "passed": failure is None, "margin": min(margins)}
    if name == "sparse_categorical_accuracy" and lower is not None:
        row["errors"] = total["errors"]
        row["allowed_errors"] = evaluation.allowed_errors(lower, total["example_count"])
    return row


def per_digit(evaluation_uri: str):
    """Per-digit slices (the label): example_count, accuracy, error, errors; index = digit."""
    import pandas as pd
    from pipeline.evaluation import ACCURACY

    rows = {key[0][1]: m for key, m in mlmd.slice_metrics(evaluation_uri).items()
            if len(key) == 1 and key[0][0] == features.LABEL_KEY}
    table = pd.DataFrame(
        [{"digit": d, "example_count": int(m["example_count"]), "accuracy": m[ACCURACY]}
         for d, m in sorted(rows.items())]).set_index("digit")
    table["error"] = 1.0 - table["accuracy"]
    table["errors"] = (table["error"] * table["example_count"]).round().astype(int)
    return table


def confusion_matrix(evaluation_uri: str, n_class: int = features.NUM_CLASSES) -> np.ndarray:
    """TFMA's MultiClassConfusionMatrixPlot on the overall slice: [true digit, predicted digit]
    counts (argmax of the scores, as the threshold 0 matrix defines it)."""
    import tensorflow_model_analysis as tfma

    for plots in tfma.load_plots(evaluation_uri):
        if plots.slice_key.single_slice_keys:
            continue
        for kv in plots.plot_keys_and_values:
            if kv.key.model_name not in ("", "candidate"):
                continue
            matrices = kv.value.multi_class_confusion_matrix_at_thresholds.matrices
            if not matrices:
                continue
            matrix = np.zeros((n_class, n_class + 1), dtype=np.int64)  # last column: no class
            for entry in matrices[0].entries:
                matrix[entry.actual_class_id, entry.predicted_class_id] += round(
                    entry.num_weighted_examples)
            if matrix[:, -1].any():
                raise ValueError(f"{matrix[:, -1].sum()} test examples got no predicted class")
            return matrix[:, :n_class]
    raise LookupError(f"no multi-class confusion matrix in {evaluation_uri}; "
                      "the EvalConfig needs MultiClassConfusionMatrixPlot")


# --------------------------------------------------------------------------------------------
# The digits the model gets wrong
# --------------------------------------------------------------------------------------------

def read_split(examples_dir: str):
    """(images uint8 [N, 28, 28], labels int [N]) from one split's gzipped TFRecords of raw
    tf.Examples (as MnistExampleGen wrote them), in file order."""
    import glob

    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(examples_dir, "*.gz")))
    if not files:
        raise FileNotFoundError(f"no TFRecord files in {examples_dir}")
    images, labels = [], []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        images.append(np.frombuffer(feature[features.IMAGE_KEY].bytes_list.value[0], np.uint8))
        labels.append(feature[features.LABEL_KEY].int64_list.value[0])
    side = features.IMAGE_SIZE
    return np.stack(images).reshape(-1, side, side), np.asarray(labels)


def predict(saved_model_dir: str, images: np.ndarray, batch_size: int = 100):
    """(classes [N], scores [N, 10]) from the SavedModel's serving_images signature."""
    from models import serving

    return serving.classify(saved_model_dir, images, batch_size)


def misclassified(saved_model_dir: str, examples_dir: str) -> dict:
    """The test digits the model gets wrong: {'index', 'image', 'label', 'predicted', 'score'}
    arrays (score = the predicted capsule's length), plus 'n' = examples read."""
    images, labels = read_split(examples_dir)
    classes, scores = predict(saved_model_dir, images)
    wrong = np.flatnonzero(classes != labels)
    return {"index": wrong, "image": images[wrong], "label": labels[wrong],
            "predicted": classes[wrong], "score": scores[wrong, classes[wrong]], "n": len(labels)}


# --------------------------------------------------------------------------------------------
# Static figures (matplotlib: they render on GitHub and in exported HTML, unlike widgets)
# --------------------------------------------------------------------------------------------

def plot_per_digit(table, overall_accuracy: float):
    """Bar chart of per-digit test accuracy, 'errors/examples' on each bar, overall as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=_FIGURE_DPI)
    bars = ax.bar(table.index.astype(str), table["accuracy"], color="tab:blue")
    ax.axhline(overall_accuracy, color="tab:red", linestyle="--",
               label=f"overall {overall_accuracy:.2%}")
    for bar, errors, count in zip(bars, table["errors"], table["example_count"]):
        ax.annotate(f"{errors}/{count}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="digit (slice: label)", ylabel="test accuracy",
           ylim=(min(0.0, table["accuracy"].min()), 1.08),
           title="Test accuracy per digit (errors/examples on each bar)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray):
    """Heat map of counts [true, predicted] with the count in every non-empty cell."""
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6, 5.4), dpi=_FIGURE_DPI)
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > matrix.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted digit", ylabel="true digit",
           title=f"Confusion matrix, {matrix.sum()} test examples")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_digits(images: np.ndarray, titles: Sequence[str], cols: int = 10, max_digits: int = 100):
    """Grid of up to max_digits images, each with its title (e.g. 'true 4 → 9')."""
    import matplotlib.pyplot as plt

    n = min(len(images), max_digits)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), dpi=_FIGURE_DPI,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images[:n], titles[:n]):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def misclassified_titles(wrong: dict) -> List[str]:
    return [f"{t} → {p} ({s:.2f})"
            for t, p, s in zip(wrong["label"], wrong["predicted"], wrong["score"])]


# --------------------------------------------------------------------------------------------
# Robustness: the CapsNet against the baseline CNN on the affine split (--robustness)
# --------------------------------------------------------------------------------------------

ROBUSTNESS_NODE = "RobustnessEvaluator"


def latest_robustness(store, pipeline_root: str) -> Optional[ComponentRun]:
    """The newest robustness Evaluator execution under the pipeline root, or None when no run
    there had --robustness."""
    try:
        return mlmd.latest_execution(store, pipeline_root, "Evaluator", node_id=ROBUSTNESS_NODE)
    except LookupError:
        return None


def robustness_rows(evaluation_uri: str) -> List[dict]:
    """A row per (family, magnitude) of the affine split, in data.affine.FAMILIES order and by
    magnitude: {'transform', 'magnitude', 'shown' (as people read it), 'examples', 'capsnet',
    'cnn'} (the accuracies)."""
    from data import affine
    from pipeline import robustness

    results = robustness.accuracies(evaluation_uri)
    keys = sorted((k for k in results if len(k) == 2),
                  key=lambda k: (affine.FAMILIES.index(k[0]), k[1]))
    return [{"transform": family, "magnitude": magnitude,
             "shown": affine.format_magnitude(family, magnitude),
             "examples": results[(family, magnitude)].examples,
             **results[(family, magnitude)].accuracy} for family, magnitude in keys]


def robustness_curve(rows: List[dict], family: str) -> List[dict]:
    """One family's rows from no transform on: the identity first (as magnitude 0, or 100 % for
    scale, where it sits between 90 % and 110 %), then the family's magnitudes in order."""
    identity = [dict(r, magnitude=100 if family == "scale" else 0, shown="none")
                for r in rows if r["transform"] == "identity"]
    return sorted(identity + [r for r in rows if r["transform"] == family],
                  key=lambda r: r["magnitude"])


def plot_robustness(rows: List[dict], families=("translate", "rotate", "scale", "shear")):
    """Accuracy against magnitude, one panel per family, the CapsNet against the CNN; a last
    panel for the affine mix."""
    import matplotlib.pyplot as plt

    from pipeline import robustness

    fig, axes = plt.subplots(1, len(families) + 1, figsize=(3.2 * (len(families) + 1), 3.2),
                             dpi=_FIGURE_DPI, squeeze=False)
    for ax, family in zip(axes[0], families):
        curve = robustness_curve(rows, family)
        for model, style in (("capsnet", "o-"), ("cnn", "s--")):
            ax.plot([r["magnitude"] for r in curve], [r[model] for r in curve], style,
                    label=robustness.NAMES[model])
        ax.set_xticks([r["magnitude"] for r in curve], [r["shown"] for r in curve],
                      fontsize=8)
        ax.set(title=family, ylim=(_floor(curve), 1.0),
               ylabel="accuracy" if family == families[0] else "")
        ax.grid(alpha=0.3)
    mix = [r for r in rows if r["transform"] == "affine"]
    ax = axes[0][-1]
    if mix:
        values = [mix[0][m] for m in ("capsnet", "cnn")]
        bars = ax.bar([robustness.NAMES[m] for m in ("capsnet", "cnn")], values,
                      color=["tab:blue", "tab:orange"])
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.1%}", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=8)
    ax.set(title="affine mix", ylim=(_floor(mix), 1.0))
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _floor(rows: List[dict]) -> float:
    """A y-axis floor under both models' accuracies in `rows`: the next 0.05 below, 0.02 of
    room, so that small differences show; 0 for no rows."""
    values = [r[m] for r in rows for m in ("capsnet", "cnn")]
    return max(0.0, np.floor((min(values) - 0.02) * 20) / 20) if values else 0.0


def robustness_examples(examples_dir: str, model_dirs: Dict[str, str], per_transform: int = 5,
                        largest_only: bool = True) -> dict:
    """Examples of the affine split with each model's answer: for every family (at its largest
    magnitude when `largest_only`), its first `per_transform` examples in file order.
    model_dirs: {'capsnet': SavedModel dir, 'cnn': ...}. Returns {'image', 'label',
    'transform', 'magnitude', <model>: classes} arrays."""
    import glob

    import tensorflow as tf

    from components.affine_example_gen import MAGNITUDE_KEY, TRANSFORM_KEY, parse_example

    files = sorted(glob.glob(os.path.join(examples_dir, "*.gz")))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        image, label = parse_example(record.numpy())
        rows.append((feature[TRANSFORM_KEY].bytes_list.value[0].decode(),
                     feature[MAGNITUDE_KEY].int64_list.value[0], image, label))
    largest = {}
    for family, magnitude, _, _ in rows:
        largest[family] = max(largest.get(family, magnitude), magnitude)
    chosen, taken = [], {}
    for family, magnitude, image, label in rows:
        if largest_only and magnitude != largest[family]:
            continue
        if taken.get((family, magnitude), 0) < per_transform:
            taken[(family, magnitude)] = taken.get((family, magnitude), 0) + 1
            chosen.append((family, magnitude, image, label))
    from data import affine

    chosen.sort(key=lambda r: (affine.FAMILIES.index(r[0]), r[1]))
    images = np.stack([r[2] for r in chosen])
    result = {"image": images, "label": np.array([r[3] for r in chosen]),
              "transform": np.array([r[0] for r in chosen]),
              "magnitude": np.array([r[1] for r in chosen])}
    for name, model_dir in model_dirs.items():
        result[name] = predict(model_dir, images)[0]
    return result


def robustness_titles(examples: dict) -> List[str]:
    """'rotate ±45°\n7: C 7 · N 1' per example: the transform, the true digit and each model's
    answer (C: the CapsNet, N: the CNN)."""
    from data import affine

    return [f"{family} {affine.format_magnitude(family, magnitude)}\n{label}: C {c} · N {n}"
            for family, magnitude, label, c, n in zip(
                examples["transform"], examples["magnitude"], examples["label"],
                examples["capsnet"], examples["cnn"])]


# --------------------------------------------------------------------------------------------
# Training curves, from the Trainer's TensorBoard logs
# --------------------------------------------------------------------------------------------

CURVES = ("loss", "lengths_loss", "recon_loss", "lengths_accuracy")


def training_curves(model_run_uri: str):
    """The per-epoch scalars Keras' TensorBoard callback wrote under the Trainer's model_run:
    a DataFrame with columns run ('train' or 'validation'), epoch (1-based), metric (e.g.
    'loss'), value and wall_time (when it was written, at the end of the epoch).
    Read by mlmd.epoch_events."""
    import pandas as pd

    rows = [{"run": run, "epoch": epoch + 1, "metric": tag[len("epoch_"):], "value": value,
             "wall_time": wall}
            for run in ("train", "validation")
            for tag, epoch, wall, value in mlmd.epoch_events(model_run_uri, run)]
    if not rows:
        raise FileNotFoundError(f"no per-epoch TensorBoard scalars under {model_run_uri}")
    return pd.DataFrame(rows)


def resumed_from(store, trainer: ComponentRun) -> List[ComponentRun]:
    """The Trainer executions that `trainer` continued, oldest first: the unbroken line of
    unfinished (killed) executions just before it with the same recipe, code and steps (their
    custom_config and train_args); a resumed execution carries on from their checkpoints."""
    from ml_metadata.proto import metadata_store_pb2

    same = ("custom_config", "train_args")
    finished = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
    earlier = sorted((e for e in store.get_executions_by_type(trainer.execution.type)
                      if e.id < trainer.execution.id), key=lambda e: e.id, reverse=True)
    chain = []
    for execution in earlier:
        if execution.last_known_state in finished or any(
                execution.custom_properties[k] != trainer.execution.custom_properties[k]
                for k in same):
            break
        chain.append(mlmd.component_run(store, execution))
    return chain[::-1]


def training_history(store, trainer: ComponentRun):
    """training_curves of a whole training, across the killed executions it resumed from
    (resumed_from), with a column `execution` (its id): one row per (run, epoch, metric), the
    latest execution's where two logged the same epoch. A killed execution's TensorBoard dir
    is its model_run dir, found beside the final one's
    (<pipeline root>/Trainer/model_run/<execution id>)."""
    import pandas as pd

    final = trainer.output("model_run").uri
    dirs = {run.execution.id: os.path.join(os.path.dirname(final.rstrip("/")),
                                           str(run.execution.id))
            for run in resumed_from(store, trainer)}
    dirs[trainer.execution.id] = final
    curves = pd.concat([training_curves(d).assign(execution=execution)
                        for execution, d in dirs.items() if os.path.isdir(d)],
                       ignore_index=True)
    return (curves.drop_duplicates(["run", "epoch", "metric"], keep="last")
            .sort_values(["run", "metric", "epoch"]).reset_index(drop=True))


def epoch_table(curves):
    """One row per epoch of training_curves or training_history: the train and validation
    values of every metric ('loss', 'val_loss', ...) and the epoch's wall-clock seconds, from
    the previous epoch's end (NaN for the first epoch of each execution: the events do not
    hold its start)."""
    train = curves[curves["run"] == "train"].pivot(index="epoch", columns="metric",
                                                   values="value")
    valid = curves[curves["run"] == "validation"].pivot(index="epoch", columns="metric",
                                                        values="value").add_prefix("val_")
    table = train.join(valid)
    ends = curves[(curves["run"] == "train") & (curves["metric"] == "loss")].set_index(
        "epoch").sort_index()
    seconds = ends["wall_time"].diff()
    # after a kill, the gap to the previous epoch's end is not this epoch's duration
    if "execution" in ends:
        seconds[ends["execution"].diff() != 0] = np.nan
    table["seconds"] = seconds
    return table


def plot_training_curves(curves, metrics: Sequence[str] = CURVES):
    """One panel per metric, train and validation against the epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), dpi=_FIGURE_DPI,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run, points in curves[curves["metric"] == metric].groupby("run"):
            ax.plot(points["epoch"], points["value"], marker="o", label=run)
        ax.set(title=metric, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Capsule pictures
# --------------------------------------------------------------------------------------------

def reconstruction_distances(images: np.ndarray, labels: np.ndarray, recons: np.ndarray):
    """(own, others) per image: mean squared pixel error of the reconstruction to its own input,
    and the mean of it over the inputs of the other digits (labels differ) in the batch."""
    x, r, other = _flat_pixels(images, recons, labels)
    distances = ((r[:, None, :] - x[None, :, :]) ** 2).mean(-1)  # [recon i, input j]
    return np.diag(distances).copy(), (distances * other).sum(1) / other.sum(1)


def reconstruction_similarity(images: np.ndarray, labels: np.ndarray, recons: np.ndarray):
    """(own, others) per image: cosine similarity of what the reconstruction adds to the batch's
    mean reconstruction with what its own input adds to the mean input, and the mean of it over
    the inputs of the other digits. A briefly trained decoder draws mostly the average digit,
    which buries in the squared error what it draws per capsule; centring shows it.
    """
    x, r, other = _flat_pixels(images, recons, labels)
    x, r = x - x.mean(0), r - r.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    r /= np.linalg.norm(r, axis=1, keepdims=True) + 1e-12
    similarity = r @ x.T  # [recon i, input j]
    return np.diag(similarity).copy(), (similarity * other).sum(1) / other.sum(1)


def _flat_pixels(images, recons, labels):
    """(inputs [N, 784] in [0, 1], reconstructions [N, 784], other-digit mask [N, N])."""
    x = np.asarray(images, "float64").reshape(len(images), -1) / 255.0
    r = np.asarray(recons, "float64").reshape(len(recons), -1)
    labels = np.asarray(labels)
    return x, r, labels[:, None] != labels[None, :]
