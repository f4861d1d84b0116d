"""The fast paths (models/capsnet/kernels.py) against the plain formulations (layers.py): same
weights, same inputs -> same outputs and the same gradients, within float32 tolerance.

DigitCaps: the chunked parent-major routing with its hand-written backward (kernels.route,
kernels.predict_and_route) against layers.dynamic_routing (paper Procedure 1, as written) over
layers.predictions, differentiated by the backend's autodiff. PrimaryCaps: kernels.conv2d_valid's
matmul backward against the backend's own convolution gradient.
"""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import kernels, layers
from models.capsnet.layers import DigitCaps, PrimaryCaps, dynamic_routing

RNG = np.random.default_rng(7)
EPS = layers.SQUASH_EPS


def predict_and_route(u, kernel, n_caps, dim, routings, stop_gradient=False, **kwargs):
    return kernels.predict_and_route(u, kernel, n_caps, dim, routings, stop_gradient, EPS,
                                     **kwargs)


# ------------------------------------------------------------------------------ the reference

def ref_routing(u_hat, routings, stop_gradient=False):
    """Procedure 1, literally (layers.dynamic_routing): (v [B, N_out, D], c [B, N_in, N_out])."""
    return dynamic_routing(u_hat, routings, stop_gradient)


def ref_digit_caps(u, kernel, n_caps, dim, routings, stop_gradient=False):
    return ref_routing(layers.predictions(u, kernel, n_caps, dim), routings, stop_gradient)


# ---------------------------------------------------------------------------------- helpers

def value_and_grads(fn, *args):
    """(fn(*args), [d fn / d arg]) as numpy for a scalar fn, on the active Keras backend."""
    args = [np.asarray(a, dtype="float32") for a in args]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf
        xs = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = fn(*xs)
        return np.asarray(y), [np.asarray(g) for g in tape.gradient(y, xs)]
    if backend == "jax":
        import jax
        y, gs = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
        return np.asarray(y), [np.asarray(g) for g in gs]
    pytest.skip(f"no gradient helper for backend {backend}")


def assert_close(actual, expected, rtol=2e-4, what=""):
    """Elementwise within rtol of the tensor's own scale (float32 sums of ~10^3 terms)."""
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    assert actual.shape == expected.shape, what
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def probes(*shape):
    """A random linear functional's weights: the loss sum(w * out) sees every output element."""
    return RNG.normal(size=shape).astype("float32")


# ------------------------------------------------------------------------------------ tests

# (batch, N_in, D_in, N_out, D): MNIST's DigitCaps, and a small one whose N_in is no multiple of
# the routing chunk (so the last chunk is short).
SHAPES = [(3, 1152, 8, 10, 16), (2, 2 * kernels.ROUTING_CHUNK + 5, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=["mnist", "ragged"])
@pytest.mark.parametrize("routings", [1, 2, 3, 4])
@pytest.mark.parametrize("stop_gradient", [False, True], ids=["grad", "stopgrad"])
def test_predict_and_route_matches_reference(shape, routings, stop_gradient):
    batch, n_in, d_in, n_out, dim = shape
    u = ops.convert_to_numpy(layers.squash(RNG.normal(size=(batch, n_in, d_in)).astype("float32")))
    kernel = RNG.normal(scale=0.3, size=(n_in, d_in, n_out * dim)).astype("float32")
    w_v, w_c = probes(batch, n_out, dim), probes(batch, n_in, n_out)

    def loss(route):
        def fn(u, kernel):
            v, c = route(u, kernel)
            return ops.sum(v * w_v) + ops.sum(c * w_c)
        return fn

    fast = loss(lambda u, k: predict_and_route(u, k, n_out, dim, routings, stop_gradient,
                                               return_couplings=True))
    slow = loss(lambda u, k: ref_digit_caps(u, k, n_out, dim, routings, stop_gradient))
    y, (du, dk) = value_and_grads(fast, u, kernel)
    y_ref, (du_ref, dk_ref) = value_and_grads(slow, u, kernel)
    assert_close(y, y_ref, what="loss")
    assert_close(du, du_ref, what="d u")
    assert_close(dk, dk_ref, what="d kernel")
    assert np.abs(dk_ref).max() > 0 and np.abs(du_ref).max() > 0

    v = ops.convert_to_numpy(predict_and_route(u, kernel, n_out, dim, routings, stop_gradient))
    v_ref, _ = ref_digit_caps(u, kernel, n_out, dim, routings)
    assert_close(v, ops.convert_to_numpy(v_ref), rtol=1e-5, what="v")


@pytest.mark.parametrize("routings", [1, 3])
@pytest.mark.parametrize("stop_gradient", [False, True], ids=["grad", "stopgrad"])
def test_dynamic_routing_matches_reference(routings, stop_gradient):
    u_hat = RNG.normal(scale=0.2, size=(2, 1152, 10, 16)).astype("float32")
    w_v, w_c = probes(2, 10, 16), probes(2, 1152, 10)

    def loss(route):
        def fn(u_hat):
            v, c = route(u_hat)
            return ops.sum(v * w_v) + ops.sum(c * w_c)
        return fn

    y, (g,) = value_and_grads(loss(lambda x: kernels.route(x, routings, stop_gradient, EPS)),
                              u_hat)
    y_ref, (g_ref,) = value_and_grads(loss(lambda x: ref_routing(x, routings, stop_gradient)),
                                      u_hat)
    assert_close(y, y_ref, what="loss")
    assert_close(g, g_ref, what="d u_hat")


def test_digit_caps_layer_matches_reference_with_its_own_weights():
    """The layer as the model uses it: call() and route() against the reference on its kernel."""
    layer = DigitCaps(routings=3)
    u = ops.convert_to_numpy(layers.squash(RNG.normal(size=(4, 1152, 8)).astype("float32")))
    v = ops.convert_to_numpy(layer(u))
    kernel = ops.convert_to_numpy(layer.kernel)
    v_ref, c_ref = (ops.convert_to_numpy(t) for t in ref_digit_caps(u, kernel, 10, 16, 3))
    assert_close(v, v_ref, rtol=1e-5, what="call")
    v2, c = (ops.convert_to_numpy(t) for t in layer.route(u))
    assert_close(v2, v_ref, rtol=1e-5, what="route v")
    assert_close(c, c_ref, rtol=1e-5, what="route c")


def test_trainable_gradient_reaches_the_kernel_variable():
    """Through the layer (a variable, not a tensor argument): the kernel's gradient is the
    reference's, so an optimizer step moves the weights exactly as the spec's formulation would."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape on the layer's variable")
    import tensorflow as tf
    layer = DigitCaps(routings=3)
    u = ops.convert_to_numpy(layers.squash(RNG.normal(size=(3, 1152, 8)).astype("float32")))
    w = probes(3, 10, 16)
    layer.build(u.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(u) * w)
    (grad,) = tape.gradient(loss, [layer.kernel.value])
    _, (_, grad_ref) = value_and_grads(
        lambda u, k: ops.sum(ref_digit_caps(u, k, 10, 16, 3)[0] * w),
        u, ops.convert_to_numpy(layer.kernel))
    assert_close(grad, grad_ref, what="d kernel (variable)")


@pytest.mark.edge_batch
@pytest.mark.parametrize("batch", [0, 1])
def test_edge_batches(batch):
    u = RNG.normal(size=(batch, 1152, 8)).astype("float32")
    kernel = RNG.normal(scale=0.05, size=(1152, 8, 160)).astype("float32")
    v = ops.convert_to_numpy(predict_and_route(u, kernel, 10, 16, 3))
    assert v.shape == (batch, 10, 16)
    if batch:
        v_ref, _ = ref_digit_caps(u, kernel, 10, 16, 3)
        assert_close(v, ops.convert_to_numpy(v_ref), rtol=1e-5)


def test_half_precision_inputs_route_in_float32():
    """Mixed precision: u_hat may be computed in float16; routing still runs in float32."""
    u = ops.convert_to_numpy(layers.squash(RNG.normal(size=(2, 1152, 8)).astype("float32")))
    kernel = RNG.normal(scale=0.05, size=(1152, 8, 160)).astype("float32")
    v16 = predict_and_route(ops.cast(u, "float16"), ops.cast(kernel, "float16"), 10, 16, 3)
    assert keras.backend.standardize_dtype(v16.dtype) == "float32"
    v_ref, _ = ref_digit_caps(u, kernel, 10, 16, 3)
    v_ref = ops.convert_to_numpy(v_ref)
    np.testing.assert_allclose(ops.convert_to_numpy(v16), v_ref, atol=2e-3 * np.abs(v_ref).max())


# --------------------------------------------------- PrimaryCaps' convolution (conv2d_valid)

def require_matmul_backward():
    """conv2d_valid only differs from ops.conv where its own backward is in use."""
    if not kernels.use_fast_path("conv_backward", "float32"):
        pytest.skip("the backend's own convolution gradient is in use here")


# (x shape, kernel size, strides): PrimaryCaps on MNIST; a stride that leaves the last rows and
# columns unread (they get zero gradient); stride 1; a non-square image.
CONV_CASES = [((2, 20, 20, 256), 9, 2), ((3, 11, 11, 5), 3, 3), ((2, 7, 7, 4), 3, 1),
              ((2, 9, 6, 3), 2, 2)]


@pytest.mark.parametrize("x_shape, size, strides", CONV_CASES,
                         ids=["mnist", "unread-edge", "stride1", "non-square"])
def test_conv2d_valid_matches_the_backend_convolution(x_shape, size, strides):
    require_matmul_backward()
    x = RNG.normal(size=x_shape).astype("float32")
    kernel = RNG.normal(scale=0.05, size=(size, size, x_shape[-1], 7)).astype("float32")
    out_shape = (x_shape[0], (x_shape[1] - size) // strides + 1,
                 (x_shape[2] - size) // strides + 1, 7)
    w = probes(*out_shape)

    y, (dx, dk) = value_and_grads(
        lambda x, k: ops.sum(kernels.conv2d_valid(x, k, strides) * w), x, kernel)
    y_ref, (dx_ref, dk_ref) = value_and_grads(
        lambda x, k: ops.sum(ops.conv(x, k, strides=strides, padding="valid") * w), x, kernel)
    assert_close(y, y_ref, rtol=1e-5, what="loss")
    assert_close(dx, dx_ref, rtol=1e-5, what="d x")
    assert_close(dk, dk_ref, rtol=1e-5, what="d kernel")
    assert np.abs(dx_ref).max() > 0 and np.abs(dk_ref).max() > 0


@pytest.mark.edge_batch
@pytest.mark.parametrize("batch", [0, 1])
def test_primary_caps_gradient_at_edge_batches(batch):
    """An empty batch never reaches a backend convolution (`unless_empty`): its gradients are
    empty for x and zero for the weights. The reference for batch 1 is ops.conv + autodiff."""
    require_matmul_backward()
    import tensorflow as tf  # require_matmul_backward: TensorFlow is the backend
    layer = PrimaryCaps(n_channels=4, dim=2, kernel_size=9, strides=2)
    x = tf.constant(RNG.normal(size=(batch, 20, 20, 3)).astype("float32"))
    layer.build(x.shape)
    weights = [layer.kernel.value, layer.bias.value]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = layer(x)
        loss = tf.reduce_sum(out)
        if batch:
            loss_ref = tf.reduce_sum(layers.squash(ops.reshape(
                ops.conv(x, layer.kernel, strides=2) + layer.bias, (-1, 144, 2))))
    assert out.shape == (batch, 144, 2)
    dx, dk, db = tape.gradient(loss, [x, *weights], unconnected_gradients="zero")
    assert dx.shape == x.shape and dk.shape == layer.kernel.shape
    if not batch:
        assert not np.any(dk) and not np.any(db)
        return
    dx_ref, dk_ref = tape.gradient(loss_ref, [x, layer.kernel.value])
    assert_close(dx, dx_ref, rtol=1e-5)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5 * max(np.abs(dk_ref).max(), 1))


def test_bfloat16_backward_equals_the_float32_one_within_bf16_rounding():
    """conv2d_valid's bfloat16 backward (bf16 matmuls, the col2im sum in float32) against the
    float32 backward of the same bf16-rounded inputs. bfloat16 keeps 8 significant bits (unit
    roundoff 2^-9 = 0.2 %); each gradient is a float32-accumulated sum rounded once to bf16, so
    its error relative to the largest entry is a few roundoffs: 1 % bounds the largest, 0.5 % the
    rms. (Summing the col2im taps in bf16 instead measured 1.2 % max, 0.47 % rms at MNIST's
    shape: the float32 sum is what keeps this within the bounds.)"""
    if not kernels.use_fast_path("conv_backward", "bfloat16"):
        pytest.skip("the backend's own convolution gradient is in use here")
    x = RNG.normal(size=(4, 20, 20, 256)).astype("float32")
    kernel = RNG.normal(scale=0.01, size=(9, 9, 256, 256)).astype("float32")
    w = probes(4, 6, 6, 256)
    x, kernel = (ops.convert_to_numpy(ops.cast(ops.cast(a, "bfloat16"), "float32"))
                 for a in (x, kernel))

    def loss_of(dtype):
        return lambda x, k: ops.sum(ops.cast(kernels.conv2d_valid(
            ops.cast(x, dtype), ops.cast(k, dtype), 2), "float32") * w)

    _, grads16 = value_and_grads(loss_of("bfloat16"), x, kernel)
    _, grads32 = value_and_grads(loss_of("float32"), x, kernel)
    for g16, g32, what in zip(grads16, grads32, ("d x", "d kernel")):
        scale = np.abs(g32).max()
        assert np.abs(g16 - g32).max() <= 1e-2 * scale, what
        assert np.sqrt(np.mean((g16 - g32) ** 2)) <= 5e-3 * np.sqrt(np.mean(g32 ** 2)), what


def test_matmul_backward_never_for_float16():
    assert not kernels.use_fast_path("conv_backward", "float16")
    assert kernels.use_fast_path("routing", "float16")
    with pytest.raises(ValueError, match="unknown fast path 'einsum'"):
        kernels.use_fast_path("einsum", "float32")
