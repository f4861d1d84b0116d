"""The Evaluator's configuration: test accuracy, per-digit slices, and the blessing thresholds.

TFMA computes accuracy in float32, and float32(9960 / 10000) = 0.99599999 < 0.996: a naive lower
bound of 1 - 0.004 would reject a model with exactly 40 errors in 10,000. The bound used here sits
half an example below the allowed error count, so it is exact for any test-set size.
"""

import math

import tensorflow_model_analysis as tfma

from models import features

ACCURACY = "sparse_categorical_accuracy"


def max_test_errors(max_test_error: float, n_test: int) -> int:
    """Most misclassified test examples a blessed model may have: floor(rate * n)."""
    return math.floor(max_test_error * n_test + 1e-9)


def accuracy_lower_bound(max_test_error: float, n_test: int) -> float:
    """Accuracy bound that passes max_test_errors(...) errors and fails one more, in float32 too.

    1 - (k + 0.5) / n lies half an example between the accuracies of k and k + 1 errors, far from
    either in float32 (its resolution near 1 is 6e-8; half an example of 10k is 5e-5).
    """
    return 1.0 - (max_test_errors(max_test_error, n_test) + 0.5) / n_test


def allowed_errors(lower_bound: float, n_test: int) -> int:
    """The error count an accuracy bound made by `accuracy_lower_bound` allows (its inverse)."""
    return round((1.0 - lower_bound) * n_test - 0.5)


def make_eval_config(max_test_error: float, n_test: int, compare_to_baseline: bool
                     ) -> tfma.EvalConfig:
    """EvalConfig on the serving signature's capsule lengths, against the raw label.

    Args:
      max_test_error: the blessing bar, e.g. 0.004 for 0.4 %.
      n_test: examples in the test split (10,000 for the official set).
      compare_to_baseline: also require no regression against the latest blessed model (needs a
        baseline model channel; on the first run there is none and TFMA skips the check).
    """
    threshold = tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(
        lower_bound={"value": accuracy_lower_bound(max_test_error, n_test)}))
    if compare_to_baseline:
        threshold.change_threshold.CopyFrom(tfma.GenericChangeThreshold(
            direction=tfma.MetricDirection.HIGHER_IS_BETTER, absolute={"value": -1e-10}))
    return tfma.EvalConfig(
        # One spec: with a baseline model, TFX's Evaluator derives the candidate/baseline pair.
        model_specs=[tfma.ModelSpec(signature_name="serving_default",
                                    label_key=features.LABEL_KEY, prediction_key=features.SCORES)],
        slicing_specs=[tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[features.LABEL_KEY])],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            # The bar applies to the whole test set, not to each digit's slice.
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy", per_slice_thresholds=[
                tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()],
                                             threshold=threshold)]),
            tfma.MetricConfig(class_name="MultiClassConfusionMatrixPlot"),
        ])])
