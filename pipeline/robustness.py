"""The robustness evaluation: the CapsNet against the paper's baseline CNN on the affine split.

`make_eval_config` is the robustness Evaluator's configuration: the CapsNet as the candidate, the
CNN as the baseline, both through their `serving_default` signature; accuracy and example count
overall, per transform family and per family x magnitude (TFMA computes each for both models and
their difference). No thresholds: it gates nothing, and TFX writes no blessing for it.

`accuracies` reads its TFMA output back; `summary_lines` are the lines the run's summary adds.
"""

import dataclasses
from typing import Dict, List, Tuple

import tensorflow_model_analysis as tfma

from components.affine_example_gen import MAGNITUDE_KEY, TRANSFORM_KEY
from data import affine
from models import features
from pipeline.evaluation import ACCURACY

CANDIDATE = "capsnet"
BASELINE = "cnn"
NAMES = {CANDIDATE: "CapsNet", BASELINE: "CNN"}
SLICES = ((), (TRANSFORM_KEY,), (TRANSFORM_KEY, MAGNITUDE_KEY))


def make_eval_config() -> tfma.EvalConfig:
    """EvalConfig of the robustness Evaluator (module docstring)."""
    spec = dict(signature_name="serving_default", label_key=features.LABEL_KEY,
                prediction_key=features.SCORES)
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(name=CANDIDATE, **spec),
                     tfma.ModelSpec(name=BASELINE, is_baseline=True, **spec)],
        slicing_specs=[tfma.SlicingSpec(feature_keys=list(keys)) for keys in SLICES],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy")])])


def slice_value(single_slice_key):
    """A TFMA SingleSliceKey's value as Python: str, int or float."""
    kind = single_slice_key.WhichOneof("kind")
    value = getattr(single_slice_key, kind)
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class SliceResult:
    """One slice of the affine split: its examples and each model's accuracy."""
    examples: int
    accuracy: Dict[str, float]  # model name (CANDIDATE, BASELINE) -> accuracy


def accuracies(evaluation_uri: str) -> Dict[Tuple, SliceResult]:
    """{slice: SliceResult} of a robustness Evaluator's output; slices are () (the whole
    split), (family,) and (family, magnitude)."""
    results = {}
    for metrics in tfma.load_metrics(evaluation_uri):
        key = tuple(slice_value(k) for k in metrics.slice_key.single_slice_keys)
        values = {(kv.key.model_name, kv.key.name): kv.value.double_value.value
                  for kv in metrics.metric_keys_and_values if not kv.key.is_diff}
        results[key] = SliceResult(
            examples=int(values[(CANDIDATE, "example_count")]),
            accuracy={model: values[(model, ACCURACY)] for model in NAMES})
    return results


def headline_slices(results: Dict[Tuple, SliceResult]) -> List[Tuple]:
    """The slices the summary shows: the identity, each family at its largest magnitude, and
    the affine mix, in data.affine.FAMILIES order."""
    largest = {}
    for key in results:
        if len(key) == 2:
            family, magnitude = key
            if family not in largest or abs(magnitude) > abs(largest[family]):
                largest[family] = magnitude
    return [(family, largest[family]) for family in affine.FAMILIES if family in largest]


def describe_slice(family: str, magnitude: int) -> str:
    """'rotate 45 degrees', 'identity', 'affine mix'."""
    if family == "identity":
        return "identity"
    if family == "affine":
        return "affine mix"
    return f"{family} {magnitude} {affine.UNITS[family]}"


def summary_lines(evaluation_uri: str) -> List[str]:
    """The run summary's robustness lines: each headline slice's accuracy, CapsNet against CNN,
    and where the TFMA output is."""
    results = accuracies(evaluation_uri)
    lines = ["Robustness (accuracy on the affine split, CapsNet against CNN):"]
    for key in headline_slices(results):
        result = results[key]
        capsnet, cnn = result.accuracy[CANDIDATE], result.accuracy[BASELINE]
        lines.append(f"  {describe_slice(*key):<22} CapsNet {capsnet:7.2%}  CNN {cnn:7.2%}  "
                     f"({100 * (capsnet - cnn):+.2f} points, {result.examples} examples)"
                     .replace("%", " %"))
    lines.append(f"Robustness TFMA output: {evaluation_uri}")
    return lines
