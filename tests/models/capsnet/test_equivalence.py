"""The fast paths (models/capsnet/kernels.py) against the plain formulations (layers.py): same
weights, same inputs -> same outputs and the same gradients, within float32 tolerance.

DigitCaps: the chunked parent-major routing with its hand-written backward
(kernels.predict_and_route, in the chunkings it chooses) against layers.dynamic_routing (paper
Procedure 1, as written) over layers.predictions, differentiated by the backend's autodiff.
PrimaryCaps: kernels.conv2d_valid's matmul backward against the backend's own convolution
gradient."""

import numpy as np
import pytest

import keras
from keras import ops

from models.capsnet import hardware, kernels, layers
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

# (batch, N_in, D_in, N_out, D, chunks): MNIST's DigitCaps in the chunking its batch chooses
# (one chunk at batch 3) and in 32 chunks of 36 (batch 100's); a small one whose N_in is no
# multiple of its 3 chunks (77 children as 3 x 26: the last chunk is padded).
CASES = [(3, 1152, 8, 10, 16, None), (3, 1152, 8, 10, 16, 32),
         (2, 2 * kernels.ROUTING_CHUNK + 5, 3, 4, 5, 3)]


@pytest.mark.parametrize("case", CASES, ids=["mnist", "mnist-32-chunks", "ragged"])
@pytest.mark.parametrize("routings", [1, 2, 3, 4])
@pytest.mark.parametrize("stop_gradient", [False, True], ids=["grad", "stopgrad"])
def test_predict_and_route_matches_reference(case, routings, stop_gradient):
    batch, n_in, d_in, n_out, dim, chunks = case
    u = ops.convert_to_numpy(layers.squash(RNG.normal(size=(batch, n_in, d_in)).astype("float32")))
    kernel = RNG.normal(scale=0.3, size=(n_in, d_in, n_out * dim)).astype("float32")
    w_v, w_c = probes(batch, n_out, dim), probes(batch, n_in, n_out)

    def loss(route):
        def fn(u, kernel):
            v, c = route(u, kernel)
            return ops.sum(v * w_v) + ops.sum(c * w_c)
        return fn

    fast = loss(lambda u, k: predict_and_route(u, k, n_out, dim, routings, stop_gradient,
                                               return_couplings=True, n_chunks=chunks))
    slow = loss(lambda u, k: ref_digit_caps(u, k, n_out, dim, routings, stop_gradient))
    y, (du, dk) = value_and_grads(fast, u, kernel)
    y_ref, (du_ref, dk_ref) = value_and_grads(slow, u, kernel)
    assert_close(y, y_ref, what="loss")
    assert_close(du, du_ref, what="d u")
    assert_close(dk, dk_ref, what="d kernel")
    assert np.abs(dk_ref).max() > 0 and np.abs(du_ref).max() > 0

    v = ops.convert_to_numpy(predict_and_route(u, kernel, n_out, dim, routings, stop_gradient,
                                               n_chunks=chunks))
    v_ref, _ = ref_digit_caps(u, kernel, n_out, dim, routings)
    assert_close(v, ops.convert_to_numpy(v_ref), rtol=1e-5, what="v")


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


def test_a_chunk_holds_about_as_many_pairs_at_every_batch():
    """The chunking follows the batch: the fewest chunks that hold at most CHUNK_PAIRS
    (example, child) pairs each (one long chunk at batch 1, where loop overhead dominates; 36
    children at batch 100, training's best), the most chunks when none does. The graph's
    version (a tensor batch) chooses the same."""
    counts = kernels._chunk_counts(1152)
    assert counts == (1, 4, 16, 32)
    assert kernels._chunk_counts(36) == (1,) and kernels._chunk_counts(77) == (1, 3)
    chosen = {b: counts[kernels._chunk_count(1152, b)] for b in (0, 1, 3, 4, 10, 30, 100, 1000)}
    assert chosen == {0: 1, 1: 1, 3: 1, 4: 4, 10: 4, 30: 16, 100: 32, 1000: 32}
    for batch in range(1, 101):
        i = kernels._chunk_count(1152, batch)
        assert batch * -(-1152 // counts[i]) <= kernels.CHUNK_PAIRS
        assert i == 0 or batch * -(-1152 // counts[i - 1]) > kernels.CHUNK_PAIRS
        in_graph = kernels._chunk_count(1152, ops.convert_to_tensor(batch, "int32"))
        assert int(ops.convert_to_numpy(in_graph)) == i


@pytest.mark.edge_batch
def test_a_graph_of_unknown_batch_routes_right_in_every_chunking_it_switches_to():
    """A serving signature's batch is unknown when it is traced, so ops.switch picks the
    chunking when it runs: at batches 1, 10, 30 and 100 (1, 4, 16 and 32 chunks) the graph's
    values and gradients are the reference's, and the empty batch answers with empty outputs."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a graph of unknown batch is TensorFlow's (JAX traces static shapes)")
    import tensorflow as tf
    kernel = tf.constant(RNG.normal(scale=0.3, size=(1152, 8, 160)).astype("float32"))

    def outputs_and_grads(route):
        def fn(u):
            with tf.GradientTape() as tape:
                tape.watch([u, kernel])
                v, c = route(u, kernel)
                loss = tf.reduce_sum(v * v) + tf.reduce_sum(c * c)
            return (v, c, *tape.gradient(loss, [u, kernel]))
        return fn

    graph = tf.function(outputs_and_grads(lambda u, k: predict_and_route(
        u, k, 10, 16, 3, return_couplings=True)),
        input_signature=[tf.TensorSpec((None, 1152, 8), tf.float32)])
    reference = outputs_and_grads(lambda u, k: ref_digit_caps(u, k, 10, 16, 3))
    traced = graph.get_concrete_function().graph.get_operations()
    assert {"Case", "StatelessCase"} & {op.type for op in traced}  # the switch is in the graph
    for batch in (1, 10, 30, 100):
        u = tf.constant(layers.squash(RNG.normal(size=(batch, 1152, 8)).astype("float32")))
        for got, want, what in zip(graph(u), reference(u), ("v", "c", "d u", "d kernel")):
            assert_close(got.numpy(), want.numpy(), what=f"{what} at batch {batch}")
    v, c, d_u, d_kernel = graph(tf.zeros((0, 1152, 8)))
    assert (v.shape, c.shape, d_u.shape) == ((0, 10, 16), (0, 1152, 10), (0, 1152, 8))
    assert not np.any(d_kernel.numpy())


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


@pytest.mark.parametrize("col2im", [True, False], ids=["col2im", "transposed"])
@pytest.mark.parametrize("x_shape, size, strides", CONV_CASES,
                         ids=["mnist", "unread-edge", "stride1", "non-square"])
def test_conv2d_valid_matches_the_backend_convolution(x_shape, size, strides, col2im):
    """Both forms of the input gradient, whichever the chooser picks on this runtime."""
    require_matmul_backward()
    x = RNG.normal(size=x_shape).astype("float32")
    kernel = RNG.normal(scale=0.05, size=(size, size, x_shape[-1], 7)).astype("float32")
    out_shape = (x_shape[0], (x_shape[1] - size) // strides + 1,
                 (x_shape[2] - size) // strides + 1, 7)
    w = probes(*out_shape)

    y, (dx, dk) = value_and_grads(
        lambda x, k: ops.sum(kernels.conv2d_valid(x, k, strides, col2im) * w), x, kernel)
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


@pytest.mark.parametrize("col2im", [True, False], ids=["col2im", "transposed"])
def test_bfloat16_backward_equals_the_float32_one_within_bf16_rounding(col2im):
    """conv2d_valid's bfloat16 backward (bf16 matmuls, the col2im sum in float32; or the
    backend's bf16 transposed convolution) against the
    float32 backward of the same bf16-rounded inputs. bfloat16 keeps 8 significant bits (unit
    roundoff 2^-9 = 0.2 %); each gradient is a float32-accumulated sum rounded once to bf16, so
    its error relative to the largest entry is a few roundoffs: 1 % bounds the largest, 0.5 % the
    rms. (Summing the col2im taps in bf16 instead measured 1.2 % max, 0.47 % rms at MNIST's
    shape: the float32 sum is what keeps this within the bounds.)"""
    if not kernels.use_fast_path("conv_backward", "bfloat16"):
        pytest.skip("the backend's own convolution gradient is in use here")
    if not col2im and hardware.runtime_name() == "Eigen":
        # Measured: Eigen's bf16 transposed convolution sums in bf16, 2.3 % max error at this
        # shape; the chooser never takes it there.
        pytest.skip("under Eigen the input gradient is always col2im's")
    x = RNG.normal(size=(4, 20, 20, 256)).astype("float32")
    kernel = RNG.normal(scale=0.01, size=(9, 9, 256, 256)).astype("float32")
    w = probes(4, 6, 6, 256)
    x, kernel = (ops.convert_to_numpy(ops.cast(ops.cast(a, "bfloat16"), "float32"))
                 for a in (x, kernel))

    def loss_of(dtype):
        return lambda x, k: ops.sum(ops.cast(kernels.conv2d_valid(
            ops.cast(x, dtype), ops.cast(k, dtype), 2, col2im), "float32") * w)

    _, grads16 = value_and_grads(loss_of("bfloat16"), x, kernel)
    _, grads32 = value_and_grads(loss_of("float32"), x, kernel)
    for g16, g32, what in zip(grads16, grads32, ("d x", "d kernel")):
        scale = np.abs(g32).max()
        assert np.abs(g16 - g32).max() <= 1e-2 * scale, what
        assert np.sqrt(np.mean((g16 - g32) ** 2)) <= 5e-3 * np.sqrt(np.mean(g32 ** 2)), what


AMX = frozenset({"amx_bf16", "avx512_bf16", "avx512f"})
AVX512_BF16 = frozenset({"avx512_bf16", "avx512f"})


@pytest.mark.parametrize("onednn, flags, col2im", [
    ("0", AVX512_BF16, True), ("0", AMX, True),
    ("1", AVX512_BF16, False), (None, AVX512_BF16, False),
    ("1", AMX, True), (None, AMX, True)])
def test_col2im_input_gradient_under_eigen_and_on_amx(monkeypatch, onednn, flags, col2im):
    """TF_ENABLE_ONEDNN_OPTS=0 is Eigen (its own input gradient works image by image): col2im on
    any CPU. Unset or 1 is oneDNN on x86: its transposed convolution, except on AMX-BF16, where
    col2im's one large matmul is the faster."""
    require_matmul_backward()
    if onednn is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    monkeypatch.setattr(hardware, "this_cpu", lambda: hardware.Cpu("a CPU", flags))
    for dtype in ("float32", "bfloat16"):
        assert kernels.use_fast_path("col2im", dtype) == col2im
    assert not kernels.use_fast_path("col2im", "float16")


def test_matmul_backward_never_for_float16():
    assert not kernels.use_fast_path("conv_backward", "float16")
    assert kernels.use_fast_path("routing", "float16")
    with pytest.raises(ValueError, match="unknown fast path 'einsum'"):
        kernels.use_fast_path("einsum", "float32")
