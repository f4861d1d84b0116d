"""build_capsnet(dtype_policy=...): 16-bit compute where it is safe, float32 where it is not
(squash, routing, lengths, losses), loss scaling for float16. Runs on the CPU with a tiny batch:
it checks the dtypes and that training works, not the speed (mixed precision is for GPUs)."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import build_capsnet, compile_capsnet


def batch(n=2):
    rng = np.random.default_rng(0)
    x = (rng.uniform(size=(n, 28, 28, 1)) < 0.2).astype("float32")
    y = np.eye(10, dtype="float32")[np.arange(n) % 10]
    return {"image": x, "label": y}, {"lengths": y, "recon": x.reshape(n, 784)}


@pytest.mark.parametrize("policy, half", [("mixed_float16", "float16"),
                                          ("mixed_bfloat16", "bfloat16")])
def test_mixed_policy_dtypes(policy, half):
    keras.utils.set_random_seed(0)
    train_model, inference_model = build_capsnet(dtype_policy=policy)
    for name in ("conv1", "primary_caps", "digit_caps"):
        layer = train_model.get_layer(name)
        assert layer.compute_dtype == half and layer.variable_dtype == "float32"
    assert all(w.dtype == "float32" for w in train_model.weights)  # master weights
    assert train_model.get_layer("lengths").compute_dtype == "float32"
    out = inference_model(batch()[0]["image"])
    assert keras.backend.standardize_dtype(out["lengths"].dtype) == "float32"
    lengths = ops.convert_to_numpy(out["lengths"])
    assert np.all(np.isfinite(lengths)) and np.all((lengths >= 0) & (lengths < 1))
    compile_capsnet(train_model)
    is_scaled = isinstance(train_model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_scaled == (half == "float16")  # bfloat16 has float32's range: no loss scaling


def test_mixed_bfloat16_trains():
    keras.utils.set_random_seed(0)
    train_model, _ = build_capsnet(dtype_policy="mixed_bfloat16")
    compile_capsnet(train_model)
    inputs, targets = batch()
    before = [w.copy() for w in train_model.get_weights()]
    logs = train_model.train_on_batch(inputs, targets, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.5 < logs["loss"] < 1.5
    after = train_model.get_weights()
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_float32_is_the_default():
    train_model, _ = build_capsnet()
    assert {layer.compute_dtype for layer in train_model.layers
            if layer.weights} == {"float32"}
    compile_capsnet(train_model)
    assert not isinstance(train_model.optimizer, keras.optimizers.LossScaleOptimizer)
