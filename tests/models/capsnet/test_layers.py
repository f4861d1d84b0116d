"""Unit tests for models/capsnet/layers.py: values, shapes, gradients, serialisation."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import layers
from models.capsnet.layers import (
    DigitCaps,
    Length,
    Mask,
    PrimaryCaps,
    dynamic_routing,
    safe_length,
    squash,
)

RNG = np.random.default_rng(0)


def value_and_grad(fn, x):
    """(fn(x), d fn / dx) as numpy for a scalar-valued fn, on the active Keras backend."""
    backend = keras.backend.backend()
    x = np.asarray(x, dtype="float32")
    if backend == "tensorflow":
        import tensorflow as tf
        xv = tf.Variable(x)
        with tf.GradientTape() as tape:
            y = fn(xv)
        return np.asarray(y), np.asarray(tape.gradient(y, xv))
    if backend == "jax":
        import jax
        y, g = jax.value_and_grad(fn)(x)
        return np.asarray(y), np.asarray(g)
    pytest.skip(f"no gradient helper for backend {backend}")


def np_squash(s):
    n = np.linalg.norm(s, axis=-1, keepdims=True)
    return n ** 2 / (1 + n ** 2) * s / np.maximum(n, 1e-30)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_routing(u_hat, routings):
    """Procedure 1 of the paper, written out literally: b = 0, r passes, r - 1 logit updates."""
    b = np.zeros(u_hat.shape[:3])
    for r in range(routings):
        c = np_softmax(b, axis=-1)
        v = np_squash(np.einsum("bij,bijd->bjd", c, u_hat))
        if r < routings - 1:
            b = b + np.einsum("bijd,bjd->bij", u_hat, v)
    return v, c


# ------------------------------------------------------------------------------- squash / length

def test_squash_norm_below_one_and_direction_kept():
    scales = np.array([1e-3, 0.1, 1.0, 10.0, 1e3], dtype="float32")[:, None, None]
    s = (RNG.normal(size=(5, 7, 8)) * scales).astype("float32")
    v = ops.convert_to_numpy(squash(s))
    assert v.shape == s.shape
    norm_v, norm_s = np.linalg.norm(v, axis=-1), np.linalg.norm(s, axis=-1)
    assert np.all(norm_v[:4] < 1.0)
    assert np.all(norm_v <= 1.0)  # |s| = 1e3: n2 / (1 + n2) rounds to 1 in float32
    cosine = np.sum(v * s, axis=-1) / (norm_v * norm_s)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
    n2 = norm_s.astype("float64") ** 2
    np.testing.assert_allclose(norm_v, n2 / (1 + n2) * np.sqrt(n2 / (n2 + 1e-7)), rtol=1e-4)


@pytest.mark.parametrize("norm, expected", [(0.0, 0.0), (1.0, 0.5), (2.0, 0.8), (3.0, 0.9)])
def test_squash_known_values(norm, expected):
    direction = np.array([1.0, 2.0, -2.0, 4.0], dtype="float32") / 5.0  # unit vector
    v = ops.convert_to_numpy(squash(norm * direction[None]))[0]
    np.testing.assert_allclose(np.linalg.norm(v), expected, atol=1e-6)
    np.testing.assert_allclose(v, expected * direction, atol=1e-6)


def test_squash_axis_argument():
    s = RNG.normal(size=(3, 8, 5)).astype("float32")
    v = ops.convert_to_numpy(squash(s, axis=1))
    np.testing.assert_allclose(v, np.moveaxis(np_squash(np.moveaxis(s, 1, -1)), -1, 1), rtol=1e-5,
                               atol=1e-6)


def test_squash_gradient_at_zero_is_finite_zero():
    w = RNG.normal(size=(2, 8)).astype("float32")
    _, g = value_and_grad(lambda s: ops.sum(squash(s) * w), np.zeros((2, 8)))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, 0.0)


def test_squash_gradient_finite_near_zero():
    _, g = value_and_grad(lambda s: ops.sum(squash(s)), np.full((1, 8), 1e-20))
    assert np.all(np.isfinite(g))


def test_squash_keeps_input_dtype():
    s = (RNG.normal(size=(2, 8)) * 0.5).astype("float16")
    v = squash(ops.convert_to_tensor(s))
    assert keras.backend.standardize_dtype(v.dtype) == "float16"
    np.testing.assert_allclose(ops.convert_to_numpy(v).astype("float32"),
                               np_squash(s.astype("float32")), atol=2e-3)


def test_safe_length_values():
    v = np.array([[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]], dtype="float32")
    out = ops.convert_to_numpy(safe_length(v))
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out, [[5.0, 0.0, 1.0]], atol=1e-7)
    # eps sits inside the sqrt: exactly sqrt(eps) at zero.
    np.testing.assert_allclose(ops.convert_to_numpy(safe_length(v, eps=1e-6))[0, 1], 1e-3,
                               rtol=1e-5)


def test_safe_length_gradient_at_zero_is_finite_zero():
    _, g = value_and_grad(lambda v: ops.sum(safe_length(v)), np.zeros((3, 16)))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, 0.0)


def test_safe_length_eps_does_not_swamp_initial_capsule_lengths():
    """At the spec's initialisation |v| ~ 1e-7; the length (and its gradient) must still see it."""
    v = np.zeros((1, 16), dtype="float32")
    v[0, 0] = 1e-7
    value, g = value_and_grad(lambda x: ops.sum(safe_length(x)), v)
    np.testing.assert_allclose(value, 1e-7, rtol=1e-3)
    np.testing.assert_allclose(g[0, 0], 1.0, rtol=1e-3)  # unit gradient, not 1e-7 / sqrt(eps)


# ------------------------------------------------------------------------------------ PrimaryCaps

@pytest.mark.parametrize("batch", [1, 3])
def test_primary_caps_shape(batch):
    layer = PrimaryCaps()
    out = layer(np.zeros((batch, 20, 20, 256), dtype="float32"))
    assert tuple(out.shape) == (batch, 1152, 8)
    assert layer.compute_output_shape((None, 20, 20, 256)) == (None, 1152, 8)
    assert tuple(layer.kernel.shape) == (9, 9, 256, 256)
    assert tuple(layer.bias.shape) == (256,)
    assert layer.count_params() == 5_308_672


def test_primary_caps_groups_consecutive_channels_and_squashes():
    """1x1 output position, 2 capsule types of 3 dims: capsule t = squash(channels 3t..3t+2)."""
    layer = PrimaryCaps(n_channels=2, dim=3, kernel_size=9, strides=2,
                        bias_initializer="random_normal")
    x = RNG.uniform(size=(2, 9, 9, 4)).astype("float32")
    out = ops.convert_to_numpy(layer(x))
    assert out.shape == (2, 2, 3)
    kernel, bias = (ops.convert_to_numpy(w) for w in (layer.kernel, layer.bias))
    conv = np.einsum("bhwc,hwcf->bf", x, kernel) + bias  # [2, 6]
    np.testing.assert_allclose(out, np_squash(conv.reshape(2, 2, 3)), rtol=1e-4, atol=1e-6)


def test_primary_caps_capsule_order_is_position_then_type():
    layer = PrimaryCaps(n_channels=2, dim=2, kernel_size=1, strides=1,
                        bias_initializer="random_normal")
    x = RNG.normal(size=(1, 2, 3, 5)).astype("float32")
    out = ops.convert_to_numpy(layer(x))
    assert out.shape == (1, 2 * 3 * 2, 2)
    conv = np.einsum("bhwc,cf->bhwf", x, ops.convert_to_numpy(layer.kernel)[0, 0])
    conv = conv + ops.convert_to_numpy(layer.bias)
    np.testing.assert_allclose(out, np_squash(conv.reshape(1, 12, 2)), rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------------- DigitCaps

@pytest.mark.parametrize("batch", [1, 3])
def test_digit_caps_shape_and_weights(batch):
    layer = DigitCaps()
    out = layer(RNG.normal(size=(batch, 1152, 8)).astype("float32"))
    assert tuple(out.shape) == (batch, 10, 16)
    assert tuple(layer.kernel.shape) == (1152, 8, 160)
    assert len(layer.trainable_weights) == 1  # no bias
    assert layer.count_params() == 1_474_560
    assert layer.compute_output_shape((None, 1152, 8)) == (None, 10, 16)


def test_digit_caps_kernel_is_glorot_uniform_on_stored_shape():
    layer = DigitCaps()
    layer.build((None, 1152, 8))
    w = ops.convert_to_numpy(layer.kernel)
    # glorot on [1152, 8, 160]: receptive field 1152, fan_in 8 * 1152, fan_out 160 * 1152.
    limit = np.sqrt(6.0 / (1152 * (8 + 160)))
    assert np.abs(w).max() <= limit * (1 + 1e-6)  # float32 rounding of the bound
    assert np.abs(w).max() > 0.95 * limit


def test_digit_caps_predictions_are_per_capsule_matmul():
    layer = DigitCaps(n_caps=4, dim=2, routings=2)
    u = RNG.normal(size=(3, 5, 3)).astype("float32")
    layer.build(u.shape)
    u_hat = ops.convert_to_numpy(layers.predictions(u, layer.kernel, 4, 2))
    assert u_hat.shape == (3, 5, 4, 2)
    w = ops.convert_to_numpy(layer.kernel)  # [5, 3, 8]
    for i in range(5):
        for j in range(4):
            w_ij = w[i, :, j * 2:(j + 1) * 2]  # [d_in, dim]
            np.testing.assert_allclose(u_hat[:, i, j], u[:, i] @ w_ij, rtol=1e-5, atol=1e-6)


def test_digit_caps_output_matches_reference_routing():
    layer = DigitCaps(n_caps=4, dim=2, routings=3, kernel_initializer="random_normal")
    u = RNG.normal(size=(2, 6, 3)).astype("float32")
    v = ops.convert_to_numpy(layer(u))
    u_hat = layers.predictions(u, layer.kernel, 4, 2)
    v_ref, _ = np_routing(ops.convert_to_numpy(u_hat).astype("float64"), 3)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------- routing

@pytest.mark.parametrize("routings", [1, 2, 3, 4])
def test_routing_matches_procedure_1_and_couplings_sum_to_one(routings):
    u_hat = RNG.normal(size=(3, 7, 10, 4)).astype("float32")
    v, c = (ops.convert_to_numpy(t) for t in dynamic_routing(u_hat, routings))
    assert v.shape == (3, 10, 4) and c.shape == (3, 7, 10)
    assert np.all(c >= 0)
    np.testing.assert_allclose(c.sum(axis=-1), 1.0, atol=1e-6)
    v_ref, c_ref = np_routing(u_hat.astype("float64"), routings)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(c, c_ref, rtol=1e-4, atol=1e-6)


def test_one_routing_iteration_gives_uniform_couplings():
    u_hat = RNG.normal(size=(2, 5, 10, 3)).astype("float32")
    v, c = (ops.convert_to_numpy(t) for t in dynamic_routing(u_hat, routings=1))
    np.testing.assert_allclose(c, 0.1, rtol=1e-6)
    np.testing.assert_allclose(v, np_squash(u_hat.sum(axis=1) / 10), rtol=1e-5, atol=1e-7)


def test_routing_is_per_example():
    """Logits are reset per example: an example's output does not depend on its batch mates."""
    u_hat = RNG.normal(size=(4, 6, 10, 3)).astype("float32")
    v_all, _ = dynamic_routing(u_hat, 3)
    v_one, _ = dynamic_routing(u_hat[2:3], 3)
    np.testing.assert_allclose(ops.convert_to_numpy(v_all)[2:3], ops.convert_to_numpy(v_one),
                               rtol=1e-5, atol=1e-7)


def test_routing_rejects_zero_iterations():
    with pytest.raises(ValueError):
        dynamic_routing(np.zeros((1, 2, 10, 3), dtype="float32"), 0)
    with pytest.raises(ValueError):
        DigitCaps(routings=0)


def test_stop_gradient_changes_gradients_not_forward_value():
    u_hat = RNG.normal(size=(2, 6, 10, 4)).astype("float32")
    w = RNG.normal(size=(2, 10, 4)).astype("float32")
    results = {}
    for sg in (False, True):
        for routings in (1, 3):
            value, grad = value_and_grad(
                lambda x: ops.sum(dynamic_routing(x, routings, stop_gradient=sg)[0] * w), u_hat)
            assert np.all(np.isfinite(grad))
            results[sg, routings] = value, grad
    for routings in (1, 3):
        np.testing.assert_allclose(results[True, routings][0], results[False, routings][0],
                                   rtol=1e-6)
    # One pass has no inner iterations: nothing to stop.
    np.testing.assert_allclose(results[True, 1][1], results[False, 1][1], rtol=1e-6)
    diff = np.abs(results[True, 3][1] - results[False, 3][1]).max()
    assert diff > 1e-4 * np.abs(results[False, 3][1]).max()


def test_digit_caps_stop_gradient_flag_reaches_routing():
    u = RNG.normal(size=(2, 6, 3)).astype("float32")
    grads = {}
    for sg in (False, True):
        layer = DigitCaps(n_caps=4, dim=2, routings=3, stop_gradient_routing=sg,
                          kernel_initializer=keras.initializers.RandomNormal(seed=1))
        value, grads[sg] = value_and_grad(lambda x: ops.sum(ops.square(layer(x))), u)
    assert not np.allclose(grads[True], grads[False])


# ------------------------------------------------------------------------------- Length and Mask

@pytest.mark.parametrize("batch", [1, 3])
def test_length_layer(batch):
    v = RNG.normal(size=(batch, 10, 16)).astype("float32")
    out = ops.convert_to_numpy(Length()(v))
    assert out.shape == (batch, 10)
    np.testing.assert_allclose(out, np.linalg.norm(v, axis=-1), rtol=1e-5)
    assert Length().compute_output_shape((None, 10, 16)) == (None, 10)


def _capsules_with_lengths(lengths):
    """[B, 10, 16] capsules with the given lengths [B, 10] in random directions."""
    d = RNG.normal(size=lengths.shape + (16,))
    return (d / np.linalg.norm(d, axis=-1, keepdims=True) * lengths[..., None]).astype("float32")


@pytest.mark.parametrize("batch", [1, 3])
def test_mask_with_labels_keeps_exactly_the_label_capsule(batch):
    lengths = RNG.uniform(0.1, 0.9, size=(batch, 10))
    v = _capsules_with_lengths(lengths)
    labels = RNG.integers(0, 10, size=batch)
    onehot = np.eye(10, dtype="float32")[labels]
    out = ops.convert_to_numpy(Mask()([v, onehot]))
    assert out.shape == (batch, 160)
    out = out.reshape(batch, 10, 16)
    for b in range(batch):
        np.testing.assert_array_equal(out[b, labels[b]], v[b, labels[b]])
        others = np.delete(out[b], labels[b], axis=0)
        np.testing.assert_array_equal(others, 0.0)
    assert Mask().compute_output_shape([(None, 10, 16), (None, 10)]) == (None, 160)


@pytest.mark.parametrize("batch", [1, 3])
def test_mask_without_labels_keeps_the_longest_capsule(batch):
    lengths = RNG.uniform(0.1, 0.5, size=(batch, 10))
    longest = RNG.integers(0, 10, size=batch)
    lengths[np.arange(batch), longest] = 0.8
    v = _capsules_with_lengths(lengths)
    out = ops.convert_to_numpy(Mask()(v)).reshape(batch, 10, 16)
    expected = np.zeros_like(v)
    expected[np.arange(batch), longest] = v[np.arange(batch), longest]
    np.testing.assert_array_equal(out, expected)
    assert Mask().compute_output_shape((None, 10, 16)) == (None, 160)


def test_mask_by_length_ignores_direction_and_component_size():
    """Longest by Euclidean norm, not by the largest single component."""
    v = np.zeros((1, 10, 16), dtype="float32")
    v[0, 2, 0] = 0.6                      # length 0.6, one big component
    v[0, 7, :] = 0.2                      # length 0.8, small components
    out = ops.convert_to_numpy(Mask()(v)).reshape(10, 16)
    np.testing.assert_array_equal(out[7], v[0, 7])
    np.testing.assert_array_equal(np.delete(out, 7, axis=0), 0.0)


# ------------------------------------------------------------------------------------ Conv2D

@pytest.mark.edge_batch
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_conv2d_is_keras_conv2d_with_the_whole_layer_guarded_against_the_empty_batch(batch):
    """layers.Conv2D answers B = 0 itself, and the guard holds the convolution, the bias and the
    ReLU together (so TensorFlow's oneDNN can fuse them): for B > 0 the values of
    keras.layers.Conv2D with the same weights, for B = 0 an empty [0, 20, 20, F]; eagerly and,
    on TensorFlow, in a graph whose batch is unknown (where the guard is an ops.cond)."""
    ours = layers.Conv2D(8, 9, activation="relu", bias_initializer="random_normal")
    theirs = keras.layers.Conv2D(8, 9, activation="relu")
    ours.build((None, 28, 28, 1))
    theirs.build((None, 28, 28, 1))
    theirs.set_weights(ours.get_weights())
    x = RNG.normal(size=(batch, 28, 28, 1)).astype("float32")
    got = ops.convert_to_numpy(ours(x))
    assert got.shape == (batch, 20, 20, 8)
    if batch:
        assert (got == 0).any() and (got > 0).any()  # the ReLU acted
        np.testing.assert_allclose(got, ops.convert_to_numpy(theirs(x)), rtol=1e-5, atol=1e-5)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        graph = tf.function(ours, input_signature=[tf.TensorSpec((None, 28, 28, 1))])
        np.testing.assert_allclose(graph(x).numpy(), got, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ dynamic batch, serialisation

def test_layers_keep_batch_dynamic_in_a_functional_graph():
    x = keras.Input(shape=(20, 20, 256))
    u = PrimaryCaps()(x)
    v = DigitCaps()(u)
    assert tuple(u.shape) == (None, 1152, 8)
    assert tuple(v.shape) == (None, 10, 16)
    assert tuple(Length()(v).shape) == (None, 10)
    assert tuple(Mask()(v).shape) == (None, 160)
    assert tuple(Mask()([v, keras.Input(shape=(10,))]).shape) == (None, 160)


LAYER_CASES = [
    (PrimaryCaps, dict(n_channels=4, dim=3, kernel_size=3, strides=1, padding="same",
                       bias_initializer="ones"), (2, 5, 5, 6)),
    (DigitCaps, dict(n_caps=3, dim=4, routings=2, stop_gradient_routing=True,
                     kernel_initializer="random_normal"), (2, 7, 5)),
    (Length, dict(eps=1e-9), (2, 10, 16)),
    (Mask, dict(), (2, 10, 16)),
]


@pytest.mark.parametrize("cls, kwargs, shape", LAYER_CASES,
                         ids=[case[0].__name__ for case in LAYER_CASES])
def test_get_config_round_trip(cls, kwargs, shape):
    layer = cls(name="probe", **kwargs)
    x = RNG.normal(size=shape).astype("float32")
    y = ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    for key, value in kwargs.items():
        if not key.endswith("initializer"):
            assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    # The registered name lets Keras deserialise without custom_objects.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is cls and revived.get_config() == config
    for other in (clone, revived):
        if not other.built:
            other.build(x.shape)
        other.set_weights(layer.get_weights())
        np.testing.assert_allclose(ops.convert_to_numpy(other(x)), y, rtol=1e-6)


def test_layers_are_registered_under_the_capsnet_package():
    for cls in (PrimaryCaps, DigitCaps, Length, Mask):
        assert keras.saving.get_registered_name(cls) == f"capsnet>{cls.__name__}"
    assert layers.LENGTH_EPS <= 1e-14 < layers.SQUASH_EPS
