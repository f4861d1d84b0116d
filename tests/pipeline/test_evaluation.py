"""The 0.4 % blessing bar is exact: 40 errors in 10,000 pass, 41 fail, with TFMA's float32 math."""

import numpy as np
import pytest
import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.evaluators import metrics_validator
from tensorflow_model_analysis.metrics import metric_types

from pipeline import evaluation


def tfma_accuracy(errors: int, n: int) -> np.float32:
    """Accuracy as TFMA's SparseCategoricalAccuracy computes it: float32 total / float32 count."""
    return np.float32(np.float32(n - errors) / np.float32(n))


def validate(accuracy, config) -> bool:
    key = metric_types.MetricKey(name=evaluation.ACCURACY)
    result = metrics_validator.validate_metrics(((), {key: accuracy}), config)
    return result.validation_ok


@pytest.mark.parametrize("errors, ok", [(0, True), (39, True), (40, True), (41, False),
                                        (100, False)])
def test_blessing_boundary_on_the_official_test_set(errors, ok):
    config = evaluation.make_eval_config(0.004, 10000, compare_to_baseline=False)
    assert validate(tfma_accuracy(errors, 10000), config) is ok


def test_naive_bound_would_reject_exactly_40_errors():
    # Why the half-example margin exists: the float32 accuracy of 40 errors is below 0.996.
    assert float(tfma_accuracy(40, 10000)) < 0.996


@pytest.mark.parametrize("max_error, n, allowed", [(0.004, 10000, 40), (0.004, 500, 2),
                                                   (0.0, 10000, 0), (1.0, 500, 500)])
def test_allowed_errors_on_any_test_size(max_error, n, allowed):
    config = evaluation.make_eval_config(max_error, n, compare_to_baseline=False)
    assert evaluation.max_test_errors(max_error, n) == allowed
    assert validate(tfma_accuracy(allowed, n), config)
    if allowed < n:
        assert not validate(tfma_accuracy(allowed + 1, n), config)


def test_eval_config_slices_per_digit_and_reads_serving_scores():
    config = evaluation.make_eval_config(0.004, 10000, compare_to_baseline=True)
    spec, = config.model_specs
    assert (spec.signature_name, spec.label_key, spec.prediction_key) == (
        "serving_default", "label", "scores")
    assert [list(s.feature_keys) for s in config.slicing_specs] == [[], ["label"]]
    names = [m.class_name for m in config.metrics_specs[0].metrics]
    assert names == ["ExampleCount", "SparseCategoricalAccuracy", "MultiClassConfusionMatrixPlot"]
    per_slice, = config.metrics_specs[0].metrics[1].per_slice_thresholds
    assert list(per_slice.slicing_specs) == [tfma.SlicingSpec()]  # overall only, not per digit
    assert per_slice.threshold.change_threshold.direction == tfma.MetricDirection.HIGHER_IS_BETTER
    without = evaluation.make_eval_config(0.004, 10000, compare_to_baseline=False)
    assert not without.metrics_specs[0].metrics[1].per_slice_thresholds[0].threshold.HasField(
        "change_threshold")
