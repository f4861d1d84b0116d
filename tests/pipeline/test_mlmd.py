"""pipeline/mlmd.py and the error-count helpers, without a pipeline run (the readers run against
real runs in tests/pipeline and tests/notebooks)."""

import pytest

from pipeline import evaluation, mlmd


def test_under_the_pipeline_root():
    assert mlmd._under("/a/root/Evaluator/evaluation/9", "/a/root")
    assert mlmd._under("/a/root/Evaluator/evaluation/9", "/a/root/")
    assert not mlmd._under("/a/root2/Evaluator/evaluation/9", "/a/root")
    assert mlmd._under("gs://b/root/Trainer/model/3", "gs://b/root")
    assert not mlmd._under("gs://b/other/Trainer/model/3", "gs://b/root")


@pytest.mark.parametrize("rate, n", [(0.004, 10000), (0.004, 500), (0.0, 100), (0.5, 7)])
def test_allowed_errors_inverts_the_accuracy_bound(rate, n):
    bound = evaluation.accuracy_lower_bound(rate, n)
    assert evaluation.allowed_errors(bound, n) == evaluation.max_test_errors(rate, n)
