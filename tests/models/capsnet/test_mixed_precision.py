"""build_capsnet(dtype_policy=...): 16-bit compute where it is safe, float32 where it is not
(squash, routing, lengths, losses), loss scaling for float16. Runs on the CPU with tiny batches:
it checks the dtypes, the values against float32 and that training works, not the speed
(bfloat16 is fast only on CPUs with native bf16, docs/results.md)."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import build_capsnet, compile_capsnet
from models.capsnet.layers import DigitCaps, squash
from models import networks
from models.capsnet.recipe import Recipe
from models.networks import policy_of


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


def test_bfloat16_outputs_equal_float32_with_the_same_weights(mnist_arrays):
    """The same weights, computed with bfloat16 and with float32, on 32 real test digits.

    Tolerance: bfloat16 keeps 8 significant bits, unit roundoff u = 2^-9 (0.2 %). conv1 and
    PrimaryCaps each round their inputs and weights to bf16 and accumulate in float32, so each
    adds a relative error of about u * sqrt(2) per output (independent roundings over long dot
    products average out); DigitCaps (u_hat and routing), squash and the lengths run in float32
    and pass the relative error on. Two layers give ~0.4 % rms; at initialisation the largest
    difference measured 0.42 % of the largest length (0.49 % when u_hat was bf16 as well).
    2 % of the largest length bounds it with room for trained weights. The
    decoder's sigmoid outputs lie in [0, 1], each within 0.02 (a few bf16 roundings of 1).
    """
    keras.utils.set_random_seed(0)
    _, float32_model = build_capsnet()
    bf16_model = networks.with_dtype_policy(networks.CAPSNET, Recipe(routings=3), float32_model,
                                         "mixed_bfloat16")
    assert policy_of(bf16_model) == "mixed_bfloat16" and policy_of(float32_model) is None
    for a, b in zip(float32_model.weights, bf16_model.weights):
        assert b.dtype == "float32" and np.array_equal(a.numpy(), b.numpy())
    x = mnist_arrays.x_test[:32, ..., None].astype("float32") / 255.0
    ref, out = float32_model(x), bf16_model(x)
    lengths, lengths_ref = (ops.convert_to_numpy(o["lengths"]) for o in (out, ref))
    assert np.abs(lengths - lengths_ref).max() <= 0.02 * np.abs(lengths_ref).max()
    recon, recon_ref = (ops.convert_to_numpy(ops.cast(o["recon"], "float32")) for o in (out, ref))
    assert np.abs(recon - recon_ref).max() <= 0.02
    assert networks.with_dtype_policy(networks.CAPSNET, Recipe(), float32_model,
                                      None) is float32_model


def test_digit_caps_computes_in_float32_under_a_bfloat16_policy():
    """DigitCaps is memory-bound (kernels.predict_and_route): under mixed_bfloat16 it still
    computes u_hat and routes in float32, from the float32 master kernel. So on inputs that
    bfloat16 represents exactly (as PrimaryCaps hands them over), it equals the float32 layer
    to float32 rounding, values and kernel gradient, instead of bf16's 0.2 %."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape on the layers' variables")
    import tensorflow as tf
    rng = np.random.default_rng(3)
    u = ops.cast(ops.cast(squash(rng.normal(size=(4, 1152, 8)).astype("float32")), "bfloat16"),
                 "float32")
    w = rng.normal(size=(4, 10, 16)).astype("float32")
    float32_layer = DigitCaps(routings=3)
    bf16_layer = DigitCaps(routings=3, dtype="mixed_bfloat16")
    for layer in (float32_layer, bf16_layer):
        layer.build(u.shape)
    bf16_layer.kernel.assign(float32_layer.kernel)

    def value_and_kernel_grad(layer):
        with tf.GradientTape() as tape:
            v = layer(u)
            loss = tf.reduce_sum(v * w)
        assert keras.backend.standardize_dtype(v.dtype) == "float32"
        (grad,) = tape.gradient(loss, [layer.kernel.value])
        return ops.convert_to_numpy(v), ops.convert_to_numpy(grad)

    (v32, g32), (v16, g16) = map(value_and_kernel_grad, (float32_layer, bf16_layer))
    np.testing.assert_allclose(v16, v32, rtol=1e-5, atol=1e-6 * np.abs(v32).max())
    np.testing.assert_allclose(g16, g32, rtol=1e-4, atol=1e-5 * np.abs(g32).max())
