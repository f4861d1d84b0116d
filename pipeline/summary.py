"""What the latest run produced, read back from ML Metadata (pipeline/mlmd.py): test error,
blessing, push, paths, how the Trainer computed and how long it took."""

import dataclasses
import json
import math
import os
import statistics
from typing import Dict, List, Optional

import tensorflow as tf

import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.writers import eval_config_writer
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx.utils import path_utils

from models import serving
from models.capsnet import hardware
from pipeline import console, mlmd, robustness
from pipeline.evaluation import ACCURACY

def overall_metrics(evaluation_uri: str) -> Dict[str, float]:
    """{metric name: value} of the candidate model on the overall (unsliced) test split."""
    metrics = mlmd.slice_metrics(evaluation_uri)
    if () not in metrics:
        raise LookupError(f"no overall slice in the TFMA metrics at {evaluation_uri}")
    return metrics[()]


def threshold_report(evaluation_uri: str) -> List[str]:
    """One line per metric threshold of the evaluation: which passed, which failed and by how much.

    TFX's Evaluator drops change thresholds when there is no baseline model yet (the first
    blessed model); the line says so.
    """
    eval_config = eval_config_writer.load_eval_run(evaluation_uri)[0]
    failures = [f for per_slice in tfma.load_validation_result(evaluation_uri)
                .metric_validations_per_slice for f in per_slice.failures]
    lines = [_describe_failure(f) for f in failures]
    thresholds = [t.threshold for spec in eval_config.metrics_specs for m in spec.metrics
                  for t in m.per_slice_thresholds]
    if not failures:
        lines += [f"passed: value threshold, {_bounds(t.value_threshold)}"
                  for t in thresholds if t.HasField("value_threshold")]
    if any(t.HasField("change_threshold") for t in thresholds):
        if not failures:
            lines.append("passed: change threshold, no regression against the latest blessed model")
    else:
        lines.append("change threshold: not applied (no blessed baseline model to compare with)")
    return lines


def _bounds(threshold) -> str:
    parts = []
    if threshold.HasField("lower_bound"):
        parts.append(f">= {threshold.lower_bound.value:.6g}")
    if threshold.HasField("upper_bound"):
        parts.append(f"<= {threshold.upper_bound.value:.6g}")
    return " and ".join(parts)


def _describe_failure(failure) -> str:
    name, value = failure.metric_key.name, failure.metric_value.double_value.value
    if failure.metric_key.is_diff:
        return (f"FAILED: change threshold, {name} changed by {value:+.6g} against the latest "
                f"blessed model")
    return (f"FAILED: value threshold, {name} = {value:.6g}, needs "
            f"{_bounds(failure.metric_threshold.value_threshold)}")


@dataclasses.dataclass
class RunSummary:
    test_error: float
    test_examples: int
    blessed: bool
    thresholds: List[str]
    pushed_to: Optional[str]   # versioned dir under the serving dir; None if nothing was pushed
    evaluation_uri: str
    tensorboard_uri: str
    cached_nodes: List[str]
    trained_with: Dict[str, str] = dataclasses.field(default_factory=dict)  # hardware.describe
    training_time: Optional["TrainingTime"] = None
    robustness: List[str] = dataclasses.field(default_factory=list)  # with --robustness

    def format(self) -> str:
        errors = round(self.test_error * self.test_examples)
        return "\n".join([
            f"Test error: {self.test_error:.2%} ({errors} of {self.test_examples} test examples)",
            f"Model: {'BLESSED' if self.blessed else 'NOT BLESSED'}",
            *[f"  {line}" for line in self.thresholds],
            f"Pushed to: {self.pushed_to}" if self.pushed_to
            else "Pushed: nothing (only blessed models are pushed)",
            f"TFMA output: {self.evaluation_uri}",
            f"Trained with: {hardware.format_description(self.trained_with)}"
            if self.trained_with else "Trained with: not recorded",
            *([f"Training: {self.trained_with['start']}"] if "start" in self.trained_with
              else []),
            *([f"Workers: {workers_line(self.trained_with)}"] if "workers" in self.trained_with
              else []),
            *([self.training_time.format()] if self.training_time else []),
            f"TensorBoard logs: {self.tensorboard_uri}",
            f"Served from cache: {', '.join(self.cached_nodes) or 'nothing'}",
            *self.robustness,
        ])


def workers_line(trained_with: dict) -> str:
    """'2 worker processes, 2 replicas in sync' from the model's training record."""
    workers, replicas = trained_with["workers"], trained_with.get("replicas", "?")
    return (f"{workers} worker process{'es' if workers != 1 else ''}, "
            f"{replicas} replica{'s' if replicas != 1 else ''} in sync")


@dataclasses.dataclass(frozen=True)
class TrainingTime:
    """How long the Trainer execution that made the model trained, from its start (MLMD) to its
    last epoch (TensorBoard): epochs first..last of `epochs`, and training images a second over
    the median epoch (its validation pass included)."""
    seconds: float
    first_epoch: int    # 1-based; > 1 when the execution resumed
    last_epoch: int
    epochs: int
    images_per_second: float

    def format(self) -> str:
        return (f"Training time: {console.duration(self.seconds)} for epochs "
                f"{self.first_epoch}-{self.last_epoch} of {self.epochs}, "
                f"{self.images_per_second:.0f} img/s (median epoch, validation included)")


def training_time(store, trainer: mlmd.ComponentRun) -> Optional[TrainingTime]:
    """The TrainingTime of the Trainer execution that produced `trainer`'s model (itself, or the
    execution a cached one reused); None where its TensorBoard events hold no epoch."""
    made = mlmd.producer(store, trainer.output("model"))
    events = mlmd.epoch_scalars(trainer.output("model_run").uri, "epoch_loss")
    if not events:
        return None
    epochs = sorted(events)
    ends = [events[epoch][0] for epoch in epochs]
    start = made.execution.create_time_since_epoch / 1000
    recipe = json.loads(made.execution.custom_properties["custom_config"].string_value)
    steps = json.loads(made.execution.custom_properties["train_args"].string_value)["num_steps"]
    images_per_epoch = math.ceil(steps / recipe["epochs"]) * recipe["batch_size"]
    seconds = [b - a for a, b in zip([start] + ends, ends)]
    return TrainingTime(seconds=ends[-1] - start, first_epoch=epochs[0] + 1,
                        last_epoch=epochs[-1] + 1, epochs=recipe["epochs"],
                        images_per_second=images_per_epoch / statistics.median(seconds))


def summarize(connection_config: metadata_store_pb2.ConnectionConfig, pipeline_name: str
              ) -> RunSummary:
    """Summary of the pipeline's latest run."""
    store = metadata_store.MetadataStore(connection_config)
    nodes = mlmd.latest_run(store, pipeline_name)
    evaluation = nodes["Evaluator"].output("evaluation").uri
    metrics = overall_metrics(evaluation)
    pushed = nodes["Pusher"].output("pushed_model").custom_properties
    return RunSummary(
        test_error=1.0 - metrics[ACCURACY],
        test_examples=int(metrics["example_count"]),
        blessed=nodes["Evaluator"].output("blessing").custom_properties["blessed"].int_value == 1,
        thresholds=threshold_report(evaluation),
        pushed_to=(pushed["pushed_destination"].string_value
                   if pushed["pushed"].int_value == 1 else None),
        evaluation_uri=evaluation,
        tensorboard_uri=nodes["Trainer"].output("model_run").uri,
        cached_nodes=[node for node, run in nodes.items() if run.cached],
        trained_with=trained_with(nodes["Trainer"].output("model").uri),
        training_time=training_time(store, nodes["Trainer"]),
        robustness=robustness_lines(nodes))


def robustness_lines(nodes: Dict[str, mlmd.ComponentRun]) -> List[str]:
    """The robustness evaluation's lines (pipeline/robustness.py) when the run had one: the
    affine split's size, what keeping the digits in the frame cost, and the accuracies."""
    if "RobustnessEvaluator" not in nodes:
        return []
    split = nodes["AffineExampleGen"].output("affine_examples").custom_properties
    kept, resampled, rejected = (split[name].int_value
                                 for name in ("kept", "resampled", "rejected"))
    return [f"Affine split: {kept} examples; {resampled} transforms redrawn and {rejected} "
            f"examples left out to keep the digit in the frame",
            *robustness.summary_lines(nodes["RobustnessEvaluator"].output("evaluation").uri)]


def trained_with(model_uri: str) -> Dict[str, str]:
    """How the Trainer computed (CPU, its bf16 support, runtime, dtype), from the model's
    assets.extra/model_info.json; {} when the file or the record is missing."""
    path = os.path.join(path_utils.serving_model_dir(model_uri), "assets.extra",
                        serving.MODEL_INFO_FILE)
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f).get("training", {})
    except (tf.errors.NotFoundError, ValueError):
        return {}
