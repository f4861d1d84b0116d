"""MirroredStrategy, proven on the CPU: the real CapsNet, trained through the Trainer's own code
(models.trainer.build_models), gives the same losses and weights with 2 replicas (2 logical CPU
devices, set up before TensorFlow starts, in a child process) as with 1, for the same global
batch and the same initial weights. Also: local_runner.py's --cpu-replicas flag."""

import keras
import numpy as np
import pytest

import local_runner
from models.capsnet import build_capsnet
from tests.models import children


def test_two_cpu_replicas_train_like_one(tmp_path, mnist_cache_dir):
    keras.utils.set_random_seed(3)
    train_model, _ = build_capsnet()
    train_model.save_weights(str(tmp_path / "initial.weights.h5"))
    started = [children.start("mirrored_child.py", tmp_path, mnist_cache_dir,
                              f"weights_after_{n}.npz", "--replicas", str(n))
               for n in (1, 2)]  # concurrently
    (one, w_one, _), (two, w_two, _) = [children.finish(*child) for child in started]

    assert one["replicas"] == 1
    assert two["replicas"] == 2
    assert len(set(two["devices"])) == 2 and all("CPU" in d for d in two["devices"])
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert all(np.isfinite(one["losses"])) and all(np.isfinite(two["losses"]))
    # Same global batch, same initial weights: the per-replica halves' gradients, summed across
    # replicas, are the full batch's gradient, so every step (and the losses after the first,
    # which depend on the updated weights) agree up to float32 summation order.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    assert len(w_one) == len(w_two) == 11
    initial = train_model.get_weights()
    for a, b, w0 in zip(w_two, w_one, initial):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 + 1e-4 * np.abs(b).max())
        assert not np.array_equal(b, w0)  # every weight was trained


@pytest.mark.parametrize("value, ok", [("2", True), ("1", True), ("0", False), ("-1", False)])
def test_local_runner_cpu_replicas_flag(value, ok):
    if ok:
        args, _ = local_runner.parse_args(["--cpu-replicas", value])
        assert args.cpu_replicas == int(value)
    else:
        with pytest.raises(SystemExit) as exc:
            local_runner.parse_args(["--cpu-replicas", value])
        assert exc.value.code == 2
    args, _ = local_runner.parse_args([])
    assert args.cpu_replicas is None  # opt-in
