"""CapsNet layers (Sabour et al. 2017) in `keras.ops` only, so any Keras 3 backend runs them.

Shapes for MNIST (B = dynamic batch, never baked into a shape):
  Conv2D 256@9x9 ReLU   [B,28,28,1]   -> [B,20,20,256]
  PrimaryCaps           [B,20,20,256] -> [B,1152,8]      (32 types x 6x6 positions, 8D, squashed)
  DigitCaps             [B,1152,8]    -> [B,10,16]       (u_hat = W u, dynamic routing)
  Length                [B,10,16]     -> [B,10]
  Mask                  [B,10,16] (+ one-hot [B,10]) -> [B,160]
"""

import keras
import numpy as np
from keras import ops

if not keras.__version__.startswith("3"):
    raise ImportError(
        f"models.capsnet needs Keras 3 (`import keras`), found keras {keras.__version__}. "
        "Install keras>=3 (see requirements.in); tf.keras / tf_keras (Keras 2) is not supported.")

_PACKAGE = "capsnet"
SQUASH_EPS = 1e-7
LENGTH_EPS = 1e-20  # see safe_length: 1e-7 here stalls training at the spec's initialisation


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------

def squash(s, axis=-1, eps=SQUASH_EPS):
    """Capsule non-linearity, paper eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|.

    Written as v = n2 / (1 + n2) * s / sqrt(n2 + eps), n2 = sum(s^2): eps sits inside the sqrt, so
    the value and gradient at s = 0 are finite (both 0) instead of 0/0. Computed in float32 (the sum
    of squares underflows in bf16/fp16) and returned in the dtype of `s`.
    [..., D] -> [..., D]; |v| < 1 and v is parallel to s.
    """
    dtype = s.dtype
    s = ops.cast(s, "float32")
    n2 = ops.sum(ops.square(s), axis=axis, keepdims=True)
    scale = n2 / (1.0 + n2) * ops.rsqrt(n2 + eps)
    return ops.cast(scale * s, dtype)


def safe_length(v, axis=-1, eps=LENGTH_EPS):
    """Capsule length sqrt(sum(v^2) + eps), eps inside the sqrt so the gradient at v = 0 is finite.

    The gradient v / sqrt(|v|^2 + eps) has norm < 1 for ANY eps > 0, so eps only needs to keep the
    sqrt away from 0 -- and it must stay far below |v|^2. At the spec's initialisation (glorot
    everywhere) the DigitCaps outputs have |v| ~ 1e-7, so eps = 1e-7 would swamp |v|^2 ~ 1e-14:
    every length reads sqrt(1e-7) and the margin-loss gradient shrinks ~3000x, which stalls
    training at chance (measured: 60 Adam steps on MNIST, margin loss frozen at 0.80943). Hence
    the default LENGTH_EPS = 1e-20 (a normal float32). Computed in float32. [..., D] -> [...].
    """
    v = ops.cast(v, "float32")
    return ops.sqrt(ops.sum(ops.square(v), axis=axis) + eps)


def dynamic_routing(u_hat, routings=3, stop_gradient=False):
    """Routing-by-agreement (paper Procedure 1) between children i and parents j.

    u_hat: [B, N_in, N_out, D] predictions u_hat_{j|i} = W_ij u_i.
    Per example, logits b = 0 [B, N_in, N_out]; then `routings` passes of
        c = softmax(b over the N_out parents);  s_j = sum_i c_ij u_hat_{j|i};  v = squash(s)
    with b += <u_hat_{j|i}, v_j> between passes (routings - 1 updates).

    stop_gradient=False: gradients flow through every pass (XifengGuo/CapsNet-Keras master and the
    official code). stop_gradient=True: u_hat is seen through stop_gradient in every pass except
    the last (its weighted sum and all logit updates), so c carries no gradient (the variant of
    XifengGuo/CapsNet-Pytorch). The forward value is the same either way.

    Returns (v [B, N_out, D], c [B, N_in, N_out]) where c are the couplings of the last pass.
    Computed in float32 by `_route_forward`, differentiated by `_route_backward` (the same values
    as differentiating the loop above; see "Routing internals").
    """
    if routings < 1:
        raise ValueError(f"routings must be >= 1, got {routings}")
    u_hat = ops.cast(u_hat, "float32")
    _, n_in, n_out, dim = u_hat.shape
    n_chunks, size, pad = _chunking(n_in)

    @ops.custom_gradient
    def route(u_hat):
        # Chunks of children, parent-major: [n_chunks, B, N_out, size, D] (zero-padded children
        # add nothing to any sum; their couplings are dropped).
        x = ops.pad(u_hat, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else u_hat
        x = ops.reshape(x, (-1, n_chunks, size, n_out, dim))
        chunks = ops.transpose(x, (1, 0, 3, 2, 4))
        v, c, saved = _route_forward(lambda chunk: chunk, chunks, n_out, routings)
        c = _unchunk_couplings(c, v, n_in)

        def grad(*args, upstream=None):
            g_v, g_c = _upstream(args, upstream, 2)
            if g_c is not None:
                g_c = _chunk_couplings(ops.transpose(g_c, (0, 2, 1)), n_chunks, size, pad)
            coefs, vecs, g_s1 = _route_backward(lambda chunk: chunk, chunks, saved, g_v, g_c,
                                                stop_gradient)
            if g_s1 is not None:  # pass 1: c = 1/N_out for every child
                coefs.append(ops.ones_like(chunks[..., 0]) / n_out)
                vecs.append(g_s1)
            coef = ops.stack(coefs, axis=3)  # [n_chunks, B, N_out, K, size]
            vec = ops.stack(vecs, axis=2)  # [B, N_out, K, D]
            d = ops.matmul(ops.transpose(coef, (0, 1, 2, 4, 3)), vec)  # [n, B, N_out, size, D]
            d = ops.reshape(ops.transpose(d, (1, 0, 3, 2, 4)), (-1, n_chunks * size, n_out, dim))
            return d[:, :n_in] if pad else d

        return (v, ops.transpose(c, (0, 2, 1))), grad

    return route(u_hat)


# --------------------------------------------------------------------------------------------
# Routing internals: parent-major chunks of u_hat, recomputed, hand-written backward
# --------------------------------------------------------------------------------------------
#
# Why: at batch 100, u_hat is 1152 x 160 floats per example, 74 MB, while routing's FLOPs are
# tiny. On a 2-core CPU the cost is memory traffic, and above all WRITING big tensors (TF's
# allocator hands out fresh pages: ~1 ms per MB written, ~0.15 ms per MB read). Einsum on the
# spec's layout [B, N_in, N_out, D] transposes u_hat for every product and its gradient, and
# autodiff writes one u_hat-sized gradient per pass plus their sum: ~15 such writes a step.
# Here:
#   * DigitCaps never materialises u_hat whole. A loop (ops.map) over chunks of ROUTING_CHUNK
#     children produces each chunk in the parent-major layout [B, N_out, n, D], where every
#     routing product is a batched matrix-vector product over contiguous [n, D] blocks, and
#     recomputes it (one small batched matmul) whenever a pass needs it: a chunk (2.3 MB at
#     batch 100) dies young, stays in cache and its memory is reused. Being a loop, not
#     unrolled, it keeps the graph small (fast tracing and export).
#   * the backward is written out (`_route_backward`): the 2 * routings - 1 contributions to
#     d u_hat are gathered per chunk as ONE batched matmul of small factors.
#   * DigitCaps' first pass (uniform couplings) needs no u_hat at all: sum_i W_ij u_i is one
#     dense matmul, and so are its gradients (`predict_and_route`).
# Equivalence with the plain formulation (values and gradients, same weights and inputs) is
# tested in tests/models/capsnet/test_equivalence.py.

ROUTING_CHUNK = 36  # children per chunk at most: 1152 = 32 x 36


def _chunking(n_in):
    """(n_chunks, size, pad): n_in children as n_chunks equal chunks, padded by `pad`."""
    n_chunks = -(-n_in // ROUTING_CHUNK)
    size = -(-n_in // n_chunks)
    return n_chunks, size, n_chunks * size - n_in


def _chunk_couplings(c, n_chunks, size, pad):
    """Couplings-shaped [B, N_out, N_in] -> [n_chunks, B, N_out, size] (zero-padded)."""
    if pad:
        c = ops.pad(c, ((0, 0), (0, 0), (0, pad)))
    return ops.transpose(ops.reshape(c, (-1, c.shape[1], n_chunks, size)), (2, 0, 1, 3))


def _unchunk_couplings(c, v, n_in):
    """[n_chunks, B, N_out, size] (or None: pass 1's uniform 1/N_out) -> [B, N_out, N_in]."""
    if c is None:
        return ops.ones_like(v[..., :1]) * ops.ones((n_in,), dtype=v.dtype) / v.shape[1]
    n_chunks, _, n_out, size = c.shape
    c = ops.reshape(ops.transpose(c, (1, 2, 0, 3)), (-1, n_out, n_chunks * size))
    return c[:, :, :n_in]


def _squash_parts(s, eps=SQUASH_EPS):
    """(squash(s), what its vector-Jacobian product needs); float32 s [..., D], squash's formula.

    v = f(n2) s with f = n2 / (1 + n2) / sqrt(n2 + eps), n2 = |s|^2, and
    f'(n2) = r q (q - n2 r^2 / 2) with r = 1 / sqrt(n2 + eps), q = 1 / (1 + n2): finite at 0.
    """
    n2 = ops.sum(ops.square(s), axis=-1, keepdims=True)
    r = ops.rsqrt(n2 + eps)
    scale = n2 / (1.0 + n2) * r
    q = 1.0 / (1.0 + n2)
    return scale * s, (s, scale, r * q * (q - 0.5 * n2 * ops.square(r)))


def _squash_vjp(parts, g):
    """d loss / d s from g = d loss / d squash(s): f g + 2 f'(n2) <s, g> s."""
    s, scale, dscale = parts
    return scale * g + (2.0 * dscale * ops.sum(s * g, axis=-1, keepdims=True)) * s


def _weighted_sum(c, uh):
    """s_j = sum_i c_ji uh_ji: c [B, J, n], uh [B, J, n, D] -> [B, J, D] (batched vec-mat)."""
    return ops.squeeze(ops.matmul(ops.expand_dims(c, 2), uh), 2)


def _agreement(uh, v):
    """<uh_ji, v_j>: uh [B, J, n, D], v [B, J, D] -> [B, J, n] (batched mat-vec)."""
    return ops.squeeze(ops.matmul(uh, ops.expand_dims(v, -1)), -1)


def _over_chunks(fn, xs):
    """ops.map over the chunk axis; fn's first output is a partial sum, added up here."""
    partial, rest = ops.map(fn, xs)
    return ops.sum(partial, axis=0), rest


def _route_forward(make, chunks, n_out, routings, first_sum=None):
    """Procedure 1 over u_hat in chunks: make(chunks[k]) -> [B, N_out, size, D] float32.

    chunks: a tensor or tuple of tensors with the chunk index as their first axis.
    first_sum: sum_i u_hat_ji [B, N_out, D] when the caller has it cheaper; else summed.
    Returns (v [B, N_out, D], last couplings [n_chunks, B, N_out, size] or None when
    routings == 1 (uniform), saved tensors for `_route_backward`).
    """
    if first_sum is None:
        first_sum = ops.sum(ops.map(lambda x: ops.sum(make(x), axis=2), chunks), axis=0)
    # Pass 1: b = 0 gives c = 1/N_out exactly, so s_j = sum_i uh_ji / N_out (no softmax).
    v, parts = _squash_parts(first_sum / n_out)
    squashed, outputs, couplings = [parts], [v], []
    logits = None  # [n_chunks, B, N_out, size]
    for _ in range(1, routings):
        def step(inputs, v=v, first=logits is None):
            x, previous = (inputs, None) if first else inputs
            uh = make(x)
            agreement = _agreement(uh, v)
            b = agreement if first else previous + agreement
            c = ops.softmax(b, axis=1)  # over the parents
            return _weighted_sum(c, uh), (b, c)

        s, (logits, c) = _over_chunks(step, chunks if logits is None else (chunks, logits))
        v, parts = _squash_parts(s)
        squashed.append(parts)
        outputs.append(v)
        couplings.append(c)
    return v, (couplings[-1] if couplings else None), (squashed, outputs, couplings)


def _route_backward(make, chunks, saved, g_v, g_c=None, stop_gradient=False):
    """Factors of d loss / d u_hat from g_v = d loss / d v [B, N_out, D] (and g_c
    [n_chunks, B, N_out, size] on the last couplings):
        d u_hat (chunk k) = sum_m coefs[m][k] (x) vecs[m]  (+ 1/N_out (x) g_s1 for pass 1).

    Every path from u_hat to the loss goes through a weighted sum s_r = sum_i c_r uh (gradient
    c_r (x) g_s_r) or an agreement a_r = <uh, v_r> (gradient g_a_r (x) v_r). Walking the passes
    backwards: g_s_r = squash'(s_r) g_v_r; g_c_r = <uh, g_s_r>; g_b_r = softmax'(c_r) g_c_r;
    the logits of pass r sum a_1 .. a_(r-1), so g_a_(r-1) = g_b_r + ... + g_b_R; and
    g_v_(r-1) = sum_i g_a_(r-1) uh. stop_gradient: only c_R (x) g_s_R; c carries no gradient.

    Returns (coefs: list of [n_chunks, B, N_out, size], vecs: list of [B, N_out, D],
    g_s1: pass 1's vector, or None when pass 1 gets no gradient).
    """
    squashed, outputs, couplings = saved
    routings = len(squashed)
    g_s = _squash_vjp(squashed[-1], g_v)
    if routings == 1:
        return [], [], g_s
    if stop_gradient:
        return [couplings[-1]], [g_s], None
    coefs, vecs = [], []
    g_logits = None  # g_b_r + ... + g_b_R, [n_chunks, B, N_out, size]
    for r in range(routings - 1, 0, -1):  # 0-based pass r, couplings[r - 1]
        extra = g_c if r == routings - 1 else None

        def step(inputs, g_s=g_s, has_sum=g_logits is not None, has_extra=extra is not None):
            x, c, *rest = inputs
            g_sum = rest.pop(0) if has_sum else None
            uh = make(x)
            g_c_r = _agreement(uh, g_s)
            if has_extra:
                g_c_r = g_c_r + rest.pop(0)
            g_b = c * (g_c_r - ops.sum(c * g_c_r, axis=1, keepdims=True))
            g_sum = g_b if g_sum is None else g_sum + g_b
            return _weighted_sum(g_sum, uh), g_sum

        inputs = (chunks, couplings[r - 1], *([g_logits] if g_logits is not None else []),
                  *([extra] if extra is not None else []))
        g_v_prev, g_logits = _over_chunks(step, inputs)
        coefs += [couplings[r - 1], g_logits]
        vecs += [g_s, outputs[r - 1]]
        g_s = _squash_vjp(squashed[r - 1], g_v_prev)
    return coefs, vecs, g_s


def _read(variable, dtype):
    """The variable's value as a plain tensor in `dtype`, for functions with a custom gradient:
    TF's custom_gradient must not see a variable read inside (the gradient reaches the variable
    through this read instead)."""
    return ops.copy(ops.cast(variable, dtype))


def _upstream(args, upstream, n_outputs):
    """The output gradients handed to an `ops.custom_gradient` grad function, as a list."""
    if upstream is None:
        upstream = args[0] if len(args) == 1 else args
    if n_outputs == 1:
        return [upstream[0] if isinstance(upstream, (list, tuple)) else upstream]
    return list(upstream)


def predict_and_route(u, kernel, n_caps, dim, routings=3, stop_gradient=False,
                      return_couplings=False):
    """DigitCaps' whole computation: u [B, N_in, D_in], kernel [N_in, D_in, n_caps * dim] ->
    v [B, n_caps, dim] (and the last couplings c [B, N_in, n_caps] if return_couplings).

    Equal to dynamic_routing(einsum('bid,idk->bik', u, kernel) reshaped, ...). A chunk of u_hat
    is one batched matmul over its children ([n, B, D_in] x [n, D_in, n_caps * dim]) and a
    transpose into the parent-major layout. Pass 1 is the dense matmul
    u [B, N_in * D_in] x kernel [N_in * D_in, n_caps * dim]. The backward turns each chunk's
    d u_hat into d u and d kernel with two batched matmuls over its children. u_hat is cast to
    float32 for routing; the gradients come back in the dtypes of u and kernel.
    """
    if routings < 1:
        raise ValueError(f"routings must be >= 1, got {routings}")
    n_in, d_in = kernel.shape[0], kernel.shape[1]
    n_chunks, size, pad = _chunking(n_in)

    def make(x):  # one chunk of u_hat: [B, n_caps, size, dim] float32
        u_c, kernel_c = x  # [size, B, D_in], [size, D_in, n_caps * dim]
        y = ops.transpose(ops.reshape(ops.matmul(u_c, kernel_c), (size, -1, dim)), (1, 0, 2))
        return ops.cast(ops.reshape(y, (-1, n_caps, size, dim)), "float32")

    @ops.custom_gradient
    def fused(u, kernel):
        dtype = u.dtype
        u_flat = ops.reshape(u, (-1, n_in * d_in))
        kernel_flat = ops.reshape(kernel, (n_in * d_in, n_caps * dim))
        u_t, kernel_p = ops.transpose(u, (1, 0, 2)), kernel  # [N_in, B, D_in]
        if pad:  # zero children: u_hat = 0, they add nothing
            u_t = ops.pad(u_t, ((0, pad), (0, 0), (0, 0)))
            kernel_p = ops.pad(kernel, ((0, pad), (0, 0), (0, 0)))
        chunks = (ops.reshape(u_t, (n_chunks, size, -1, d_in)),
                  ops.reshape(kernel_p, (n_chunks, size, d_in, n_caps * dim)))
        first_sum = ops.reshape(ops.cast(ops.matmul(u_flat, kernel_flat), "float32"),
                                (-1, n_caps, dim))
        v, c, saved = _route_forward(make, chunks, n_caps, routings, first_sum)

        def grad(*args, upstream=None):
            if return_couplings:
                g_v, g_c = _upstream(args, upstream, 2)
                g_c = None if g_c is None else _chunk_couplings(g_c, n_chunks, size, pad)
            else:
                (g_v,), g_c = _upstream(args, upstream, 1), None
            coefs, vecs, g_s1 = _route_backward(make, chunks, saved, g_v, g_c, stop_gradient)
            d_u = d_kernel = None
            if coefs:
                vec = ops.stack(vecs, axis=2)  # [B, n_caps, K, dim]

                def chunk_grads(inputs):
                    (u_c, kernel_c), coef = inputs  # coef [B, n_caps, K, size]
                    d_uh = ops.cast(ops.matmul(ops.transpose(coef, (0, 1, 3, 2)), vec), dtype)
                    d_uh = ops.transpose(ops.reshape(d_uh, (-1, size, dim)), (1, 0, 2))
                    d_uh = ops.reshape(d_uh, (size, -1, n_caps * dim))  # [size, B, n_caps*dim]
                    return (ops.matmul(d_uh, ops.transpose(kernel_c, (0, 2, 1))),
                            ops.matmul(ops.transpose(u_c, (0, 2, 1)), d_uh))

                d_u, d_kernel = ops.map(chunk_grads, (chunks, ops.stack(coefs, axis=3)))
                d_u = ops.reshape(d_u, (n_chunks * size, -1, d_in))[:n_in]
                d_u = ops.transpose(d_u, (1, 0, 2))
                d_kernel = ops.reshape(d_kernel, (n_chunks * size, d_in, n_caps * dim))[:n_in]
            if g_s1 is not None:  # pass 1: s_1 = (u_flat kernel_flat) / n_caps
                g1 = ops.cast(ops.reshape(g_s1, (-1, n_caps * dim)) / n_caps, dtype)
                d_u1 = ops.reshape(ops.matmul(g1, ops.transpose(kernel_flat)), (-1, n_in, d_in))
                d_k1 = ops.reshape(ops.matmul(ops.transpose(u_flat), g1), kernel.shape)
                d_u = d_u1 if d_u is None else d_u + d_u1
                d_kernel = d_k1 if d_kernel is None else d_kernel + d_k1
            return d_u, d_kernel

        if not return_couplings:
            return v, grad
        return (v, _unchunk_couplings(c, v, n_in)), grad

    out = fused(u, kernel)
    if return_couplings:
        v, c = out
        return v, ops.transpose(c, (0, 2, 1))
    return out


# --------------------------------------------------------------------------------------------
# Empty batches: answered without asking the backend
# --------------------------------------------------------------------------------------------

def unless_empty(fn, x, output_shape):
    """fn(x) for a batch x [B, ...]; for B = 0 the empty [0, *output_shape[1:]] result in x's
    dtype, without calling fn.

    Why: how a backend treats a zero-size batch is its own affair. TensorFlow's oneDNN convolution
    (its default on x86) returns a tensor shaped like its INPUT for B = 0, so the layers after it
    fail; a serving signature must still answer an empty request with empty outputs. The batch is
    checked statically where it is known (eager, JAX's jit), else with ops.cond in the graph.
    """
    def empty():
        return ops.zeros((0, *output_shape[1:]), dtype=x.dtype)

    batch = x.shape[0]
    if batch is not None:
        return fn(x) if batch > 0 else empty()
    return ops.cond(ops.shape(x)[0] > 0, lambda: fn(x), empty)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D whose convolution answers an empty batch itself (`unless_empty`)."""

    def convolution_op(self, inputs, kernel):
        convolve = super().convolution_op
        return unless_empty(lambda x: convolve(x, kernel), inputs,
                            self.compute_output_shape(inputs.shape))


# --------------------------------------------------------------------------------------------
# PrimaryCaps' convolution: the backend's forward, a batched-matmul backward
# --------------------------------------------------------------------------------------------
#
# Why: at batch 100, TensorFlow's CPU input gradient of the 9x9 stride-2 PrimaryCaps convolution
# (Conv2DBackpropInput, which works image by image: a [36, 256] x [256, 9*9*256] matmul and a
# col2im each) took ~650 ms of a ~1,650 ms training step. The same matmul done ONCE for the whole
# batch, then a segment sum that adds every patch tap back onto its pixel (col2im), takes ~250 ms;
# the kernel gradient as a dilated convolution of the input with the output gradient ~320 ms
# instead of ~360. Same FLOPs, same values (tests/models/capsnet/test_equivalence.py); timed by
# `python -m bench.train_throughput --mode primarycaps`. In bfloat16 under oneDNN (AMD EPYC with
# AVX512_BF16, batch 100): input gradient 77 ms against oneDNN's 82, kernel gradient as the
# dilated convolution 67 ms against oneDNN's Conv2DBackpropFilter 200 ms; the whole training step
# ~320 img/s against ~235. Measured with float32 and bfloat16 on TensorFlow's CPU kernels only, so
# elsewhere (GPUs, other backends, float16) the backend's own gradient stays.


def matmul_conv_backward_pays(dtype):
    """True where `conv2d_valid`'s hand-written backward was measured faster than the
    backend's: float32 or bfloat16 on TensorFlow with no GPU visible (cuDNN's gradients are kept
    on GPUs; float16 was never measured)."""
    if (keras.backend.backend() != "tensorflow"
            or keras.backend.standardize_dtype(dtype) not in ("float32", "bfloat16")):
        return False
    return not keras.distribution.list_devices("gpu")


def _patch_pixels(out_h, out_w, width, kernel_size, strides):
    """Flat pixel index (row * width + col) of every patch tap, in the order of a patch matrix:
    [H' * W' * k * k] int32 for output positions (i, j) and taps (ki, kj), row = strides*i + ki."""
    taps = np.arange(kernel_size)
    rows = strides * np.arange(out_h)[:, None, None, None] + taps[None, None, :, None]
    cols = strides * np.arange(out_w)[None, :, None, None] + taps[None, None, None, :]
    return (rows * width + cols).reshape(-1).astype("int32")


def conv2d_valid(x, kernel, strides):
    """'valid' convolution, channels last: x [B, H, W, C], kernel [k, k, C, F] ->
    [B, H', W', F] with H' = (H - k) // strides + 1 (likewise W'). B > 0: the backward
    convolves over the batch as channels, which fails for B = 0 (PrimaryCaps guards with
    `unless_empty`).

    The forward is ops.conv. Where `matmul_conv_backward_pays`, the backward is written out:
      d x = col2im(d y [B*H'*W', F] x kernel^T [F, k*k*C]): one matmul, then a segment sum of
            each patch tap onto its pixel;
      d kernel = ops.conv(x^T [C, H_used, W_used, B], d y^T [H', W', B, F], dilation = strides),
            transposed back, where H_used = strides * (H' - 1) + k rows are the ones any patch
            reads (the others get no gradient).
    """
    if not matmul_conv_backward_pays(x.dtype):
        return ops.conv(x, kernel, strides=strides, padding="valid", data_format="channels_last")
    k, _, c_in, c_out = kernel.shape
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = (height - k) // strides + 1, (width - k) // strides + 1
    pixels = _patch_pixels(out_h, out_w, width, k, strides)
    used_h, used_w = strides * (out_h - 1) + k, strides * (out_w - 1) + k

    @ops.custom_gradient
    def conv(x, kernel):
        y = ops.conv(x, kernel, strides=strides, padding="valid", data_format="channels_last")

        def grad(*args, upstream=None):
            (g,) = _upstream(args, upstream, 1)  # [B, H', W', F]
            batch = ops.shape(g)[0]
            patches = ops.matmul(ops.reshape(g, (-1, c_out)),
                                 ops.transpose(ops.reshape(kernel, (-1, c_out))))
            ids = ops.arange(batch, dtype="int32")[:, None] * (height * width) + pixels[None, :]
            # Up to ceil(k / strides)^2 taps land on a pixel: summed in float32 (in bfloat16 the
            # sum's rms error was 3x that of oneDNN's own bf16 input gradient; now equal).
            d_x = ops.segment_sum(ops.cast(ops.reshape(patches, (-1, c_in)), "float32"),
                                  ops.reshape(ids, (-1,)), num_segments=batch * height * width)
            d_x = ops.cast(d_x, x.dtype)
            d_kernel = ops.transpose(ops.conv(  # [C, k, k, F] -> [k, k, C, F]
                ops.transpose(x[:, :used_h, :used_w], (3, 1, 2, 0)),
                ops.transpose(g, (1, 2, 0, 3)), dilation_rate=strides,
                data_format="channels_last"), (1, 2, 0, 3))
            return ops.reshape(d_x, (-1, height, width, c_in)), d_kernel

        return y, grad

    return conv(x, kernel)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package=_PACKAGE)
class PrimaryCaps(keras.layers.Layer):
    """Convolutional capsules: ONE Conv2D with n_channels * dim filters (linear, bias), grouped into
    capsules of `dim` consecutive channels, then squashed.

    [B, H, W, C] -> [B, H' * W' * n_channels, dim]; MNIST: [B,20,20,256] -> [B,1152,8]
    (capsule index = (row, col, type), type t = conv channels t*dim .. t*dim+dim-1).
    """

    def __init__(self, n_channels=32, dim=8, kernel_size=9, strides=2, padding="valid",
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.n_channels = int(n_channels)
        self.dim = int(dim)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding.lower()
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _spatial_out(self, size):
        if size is None:
            return None
        if self.padding == "same":
            return -(-size // self.strides)
        return (size - self.kernel_size) // self.strides + 1

    def _n_caps(self, input_shape):
        h, w = self._spatial_out(input_shape[1]), self._spatial_out(input_shape[2])
        if h is None or w is None:
            raise ValueError(f"PrimaryCaps needs static spatial dims, got {input_shape}")
        return h * w * self.n_channels

    def build(self, input_shape):
        filters = self.n_channels * self.dim
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, input_shape[-1], filters),
            initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(filters,),
                                    initializer=self.bias_initializer)
        self.n_caps = self._n_caps(input_shape)

    def call(self, inputs):
        kernel = _read(self.kernel, self.compute_dtype)
        if self.padding == "valid":
            def convolve(x):
                return conv2d_valid(x, kernel, self.strides)
        else:
            def convolve(x):
                return ops.conv(x, kernel, strides=self.strides, padding="same",
                                data_format="channels_last")
        shape = inputs.shape
        x = unless_empty(convolve, inputs, (shape[0], self._spatial_out(shape[1]),
                                            self._spatial_out(shape[2]), self.kernel.shape[-1]))
        x = x + self.bias
        return squash(ops.reshape(x, (-1, self.n_caps, self.dim)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self._n_caps(input_shape), self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_channels=self.n_channels,
            dim=self.dim,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DigitCaps(keras.layers.Layer):
    """Fully connected capsule layer with dynamic routing, no bias.

    W is stored as [N_in, D_in, n_caps * dim] (glorot_uniform on that shape) so that all
    predictions come from one batched matmul: u_hat = einsum('bid,idk->bik', u, W), reshaped to
    [B, N_in, n_caps, dim]; then `dynamic_routing`. `call` computes exactly that through
    `predict_and_route` (same values, a fraction of the memory traffic).
    [B, N_in, D_in] -> [B, n_caps, dim]; MNIST: [B,1152,8] -> [B,10,16].
    """

    def __init__(self, n_caps=10, dim=16, routings=3, stop_gradient_routing=False,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if int(routings) < 1:
            raise ValueError(f"routings must be >= 1, got {routings}")
        self.n_caps = int(n_caps)
        self.dim = int(dim)
        self.routings = int(routings)
        self.stop_gradient_routing = bool(stop_gradient_routing)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        n_in, d_in = input_shape[-2], input_shape[-1]
        if n_in is None or d_in is None:
            raise ValueError(f"DigitCaps needs static [N_in, D_in], got input shape {input_shape}")
        self.kernel = self.add_weight(
            name="kernel", shape=(n_in, d_in, self.n_caps * self.dim),
            initializer=self.kernel_initializer)

    def predictions(self, inputs):
        """u_hat_{j|i} = W_ij u_i: [B, N_in, D_in] -> [B, N_in, n_caps, dim]."""
        u_hat = ops.einsum("bid,idk->bik", inputs, self.kernel)
        return ops.reshape(u_hat, (-1, self.kernel.shape[0], self.n_caps, self.dim))

    def route(self, inputs):
        """(v [B, n_caps, dim], coupling coefficients c [B, N_in, n_caps]) for capsules `inputs`."""
        return predict_and_route(inputs, _read(self.kernel, self.compute_dtype), self.n_caps,
                                 self.dim, self.routings, self.stop_gradient_routing,
                                 return_couplings=True)

    def call(self, inputs):
        return predict_and_route(inputs, _read(self.kernel, self.compute_dtype), self.n_caps,
                                 self.dim, self.routings, self.stop_gradient_routing)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_caps, self.dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_caps=self.n_caps,
            dim=self.dim,
            routings=self.routings,
            stop_gradient_routing=self.stop_gradient_routing,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Length(keras.layers.Layer):
    """Capsule lengths (class probabilities): safe_length on the last axis, [B,N,D] -> [B,N]."""

    def __init__(self, eps=LENGTH_EPS, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, inputs):
        return safe_length(inputs, axis=-1, eps=self.eps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1])

    def get_config(self):
        config = super().get_config()
        config.update(eps=self.eps)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Mask(keras.layers.Layer):
    """Keeps one capsule per example, zeroes the others, flattens: the decoder's input.

    inputs = v [B, N, D]            -> mask by the longest capsule (argmax length; inference)
    inputs = [v [B, N, D], y [B, N]] -> mask by the one-hot y (the true label; training)
    Output [B, N * D].
    """

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            v, y = inputs
            y = ops.cast(y, v.dtype)
        else:
            v = inputs
            # argmax of |v|^2 == argmax of |v|; no sqrt needed and nothing to differentiate.
            longest = ops.argmax(ops.sum(ops.square(v), axis=-1), axis=-1)
            y = ops.one_hot(longest, v.shape[1], dtype=v.dtype)
        masked = v * ops.expand_dims(y, -1)
        return ops.reshape(masked, (-1, v.shape[1] * v.shape[2]))

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        n, d = input_shape[-2], input_shape[-1]
        return (input_shape[0], None if n is None or d is None else n * d)

