"""Fast paths for the CapsNet layers' maths, apart from the layers (`layers.py`) that read like
the paper. Each function here computes exactly what a plain formulation in `layers.py` computes,
values and gradients (tests/models/capsnet/test_equivalence.py), only faster where it runs;
`use_fast_path` alone decides where that is (the measurements behind each choice:
docs/lab/kernel-work.md).

  predict_and_route         DigitCaps: u_hat (= layers.predictions) and dynamic routing
                            (= layers.dynamic_routing) over chunks of children, with a
                            hand-written backward
  conv2d_valid              PrimaryCaps' convolution (= ops.conv 'valid') with a written-out
                            backward
  unless_empty              a layer's computation, answered without the backend for an empty batch
  read                      a variable's value for functions with a custom gradient

`keras.ops` only, like the layers: any Keras 3 backend runs them.
"""

import functools

import keras
import numpy as np
from keras import ops

from models.capsnet import hardware


# --------------------------------------------------------------------------------------------
# The one chooser
# --------------------------------------------------------------------------------------------

FAST_PATHS = ("routing", "conv_backward", "col2im")


def use_fast_path(kind, dtype):
    """Whether a layer computes `kind` with the fast path here (True) or with its plain
    reference in layers.py, for this backend, device and compute dtype. Nothing else asks.

      routing        `predict_and_route` for DigitCaps, on every backend and dtype: pure
                     keras.ops, the same values as the reference (tested on TF and JAX), and it
                     never materialises u_hat, the step's largest tensor.
      conv_backward  `conv2d_valid` for PrimaryCaps where its backward was measured faster than
                     the backend's: float32 or bfloat16 on TensorFlow with no GPU visible
                     (cuDNN's gradients stay on GPUs; float16 was never measured).
      col2im         inside `conv2d_valid`, the input gradient as one matmul and a col2im sum
                     where TensorFlow runs its Eigen CPU kernels (TF_ENABLE_ONEDNN_OPTS=0),
                     whose own works image by image, and under oneDNN on CPUs with AMX-BF16,
                     whose tiles run the one large matmul faster than oneDNN's transposed
                     convolution. Under oneDNN elsewhere (AVX512_BF16 without AMX), oneDNN's
                     transposed convolution, which is faster there (below).
    """
    if kind == "routing":
        return True
    if kind == "conv_backward":
        if (keras.backend.backend() != "tensorflow"
                or keras.backend.standardize_dtype(dtype) not in ("float32", "bfloat16")):
            return False
        return not keras.distribution.list_devices("gpu")
    if kind == "col2im":
        return use_fast_path("conv_backward", dtype) and (
            hardware.runtime_name() == "Eigen" or hardware.this_cpu().native_bf16 == "amx_bf16")
    raise ValueError(f"unknown fast path {kind!r}; expected one of {FAST_PATHS}")


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


# --------------------------------------------------------------------------------------------
# Routing: parent-major chunks of u_hat, recomputed, hand-written backward
# --------------------------------------------------------------------------------------------
#
# Why: at batch 100, u_hat is 1152 x 160 floats per example, 74 MB, while routing's FLOPs are
# tiny. On a CPU the cost is memory traffic, and above all WRITING big tensors (TF's allocator
# hands out fresh pages, and a MB written costs several times a MB read). Einsum on the
# spec's layout [B, N_in, N_out, D] transposes u_hat for every product and its gradient, and
# autodiff writes one u_hat-sized gradient per pass plus their sum: ~15 such writes a step.
# Here:
#   * DigitCaps never materialises u_hat whole. A loop (ops.map) over chunks of children
#     produces each chunk in the parent-major layout [B, N_out, n, D], where every routing
#     product is a batched matrix-vector product over contiguous [n, D] blocks, and recomputes
#     it (one small batched matmul) whenever a pass needs it: a chunk (2.3 MB) dies young, stays
#     in cache and its memory is reused. Being a loop, not unrolled, it keeps the graph small
#     (fast tracing and export).
#   * a chunk holds about the same number of (example, child) pairs at every batch size
#     (`_chunk_count`): 36 children at batch 100, all 1152 at batch 1, where a loop of 32 tiny
#     chunks would cost more in loop overhead than in memory. In a graph whose batch is unknown
#     (a serving signature), `ops.switch` picks the chunking from the batch when it runs.
#   * the backward is written out (`_route_backward`): the 2 * routings - 1 contributions to
#     d u_hat are gathered per chunk as ONE batched matmul of small factors.
#   * DigitCaps' first pass (uniform couplings) needs no u_hat at all: sum_i W_ij u_i is one
#     dense matmul, and so are its gradients (`predict_and_route`).
# Equivalence with the plain formulation (values and gradients, same weights and inputs) is
# tested in tests/models/capsnet/test_equivalence.py.

ROUTING_CHUNK = 36  # children per chunk at batch 100 and above (training's best there)
CHUNK_PAIRS = 100 * ROUTING_CHUNK  # (example, child) pairs a chunk holds: 2.3 MB of u_hat


def _chunk_counts(n_in):
    """The chunk counts that routing chooses among for n_in children: 1, 4, 16, ... (each 4x
    the last), up to the count whose chunks hold at most ROUTING_CHUNK children (1152: 1, 4, 16,
    32). In a graph of unknown batch each count is a branch of the switch, traced when a model is
    exported; steps of 4x keep the branches, and so the export's tracing time, few."""
    most = -(-n_in // ROUTING_CHUNK)
    counts = [1]
    while counts[-1] < most:
        counts.append(min(4 * counts[-1], most))
    return tuple(counts)


def _chunk_count(n_in, batch):
    """Index into _chunk_counts(n_in) of the fewest chunks that hold at most CHUNK_PAIRS
    (example, child) pairs each, the last (most chunks) when none does. `batch` is an int, or
    a scalar int32 tensor in a graph whose batch is unknown (then the index is one too).

    Why by pairs: a chunk's u_hat stays about the same size (2.3 MB) at every batch, small enough
    to stay in cache, while small batches get few chunks, whose loop overhead would otherwise
    outweigh the work (batch 1: one chunk of all children).
    """
    sizes = [-(-n_in // count) for count in _chunk_counts(n_in)][:-1]
    if isinstance(batch, int):
        return sum(batch * size > CHUNK_PAIRS for size in sizes)
    return ops.sum(ops.cast(batch * np.array(sizes, "int32") > CHUNK_PAIRS, "int32"))


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


def _squash_parts(s, eps):
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


def _softmax_over_parents(b):
    """softmax(b, axis=1) for logits b [B, N_out, n], written out: TensorFlow's softmax over an
    axis other than the last transposes there and back, slower than these ops. (`initial`
    only because Keras refuses an eager max over an empty tensor, and B = 0 is a real batch.)"""
    e = ops.exp(b - ops.max(b, axis=1, keepdims=True, initial=-np.inf))
    return e / ops.sum(e, axis=1, keepdims=True)


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


def _route_forward(make, chunks, n_out, routings, squash_eps, first_sum):
    """Procedure 1 over u_hat in chunks: make(chunks[k]) -> [B, N_out, size, D] float32.

    chunks: a tensor or tuple of tensors with the chunk index as their first axis.
    first_sum: sum_i u_hat_ji [B, N_out, D], which the caller has without u_hat.
    Returns (v [B, N_out, D], last couplings [n_chunks, B, N_out, size] or None when
    routings == 1 (uniform), saved tensors for `_route_backward`).
    """
    # Pass 1: b = 0 gives c = 1/N_out exactly, so s_j = sum_i uh_ji / N_out (no softmax).
    v, parts = _squash_parts(first_sum / n_out, squash_eps)
    squashed, outputs, couplings = [parts], [v], []
    logits = None  # [n_chunks, B, N_out, size]
    for _ in range(1, routings):
        def step(inputs, v=v, first=logits is None):
            x, previous = (inputs, None) if first else inputs
            uh = make(x)
            agreement = _agreement(uh, v)
            b = agreement if first else previous + agreement
            c = _softmax_over_parents(b)
            return _weighted_sum(c, uh), (b, c)

        s, (logits, c) = _over_chunks(step, chunks if logits is None else (chunks, logits))
        v, parts = _squash_parts(s, squash_eps)
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


def read(variable, dtype):
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


def predict_and_route(u, kernel, n_caps, dim, routings, stop_gradient, squash_eps,
                      return_couplings=False, n_chunks=None):
    """DigitCaps' whole computation: u [B, N_in, D_in], kernel [N_in, D_in, n_caps * dim] ->
    v [B, n_caps, dim] (and the last couplings c [B, N_in, n_caps] if return_couplings).
    n_chunks: how many chunks of children; by default chosen from the batch (`_chunk_count`),
    with ops.switch where the batch is unknown until the graph runs.

    Equals layers.dynamic_routing(layers.predictions(u, kernel, n_caps, dim), ...), values and
    gradients. A chunk of u_hat is one batched matmul over its children
    ([n, B, D_in] x [n, D_in, n_caps * dim]) and a transpose into the parent-major layout.
    Pass 1 is the dense matmul u [B, N_in * D_in] x kernel [N_in * D_in, n_caps * dim]. The
    backward turns each chunk's d u_hat into d u and d kernel with two batched matmuls over its
    children. All of it runs in float32, whatever the dtypes of u and kernel (cast on the way in;
    the gradients go back in theirs): it is bound by memory traffic and loop overhead, not by
    FLOPs (under 1 % of the step's), so bfloat16 would only round u_hat, not save time.
    """
    if routings < 1:
        raise ValueError(f"routings must be >= 1, got {routings}")
    u, kernel = ops.cast(u, "float32"), ops.cast(kernel, "float32")
    chunked = functools.partial(_predict_and_route, n_caps=n_caps, dim=dim, routings=routings,
                                stop_gradient=stop_gradient, squash_eps=squash_eps,
                                return_couplings=return_couplings)
    if n_chunks is not None:
        return chunked(u, kernel, n_chunks=n_chunks)
    n_in, counts = kernel.shape[0], _chunk_counts(kernel.shape[0])
    if u.shape[0] is not None:
        return chunked(u, kernel, n_chunks=counts[_chunk_count(n_in, u.shape[0])])
    if len(counts) == 1:
        return chunked(u, kernel, n_chunks=counts[0])
    return ops.switch(_chunk_count(n_in, ops.shape(u)[0]),
                      [functools.partial(chunked, n_chunks=count) for count in counts], u, kernel)


def _predict_and_route(u, kernel, n_chunks, n_caps, dim, routings, stop_gradient, squash_eps,
                       return_couplings):
    """predict_and_route over n_chunks chunks of children; u and kernel float32."""
    n_in, d_in = kernel.shape[0], kernel.shape[1]
    size = -(-n_in // n_chunks)  # children per chunk; the last chunk padded by `pad` zeros
    pad = n_chunks * size - n_in

    def make(x):  # one chunk of u_hat: [B, n_caps, size, dim]
        u_c, kernel_c = x  # [size, B, D_in], [size, D_in, n_caps * dim]
        y = ops.transpose(ops.reshape(ops.matmul(u_c, kernel_c), (size, -1, dim)), (1, 0, 2))
        return ops.reshape(y, (-1, n_caps, size, dim))

    @ops.custom_gradient
    def fused(u, kernel):
        u_flat = ops.reshape(u, (-1, n_in * d_in))
        kernel_flat = ops.reshape(kernel, (n_in * d_in, n_caps * dim))
        u_t, kernel_p = ops.transpose(u, (1, 0, 2)), kernel  # [N_in, B, D_in]
        if pad:  # zero children: u_hat = 0, they add nothing
            u_t = ops.pad(u_t, ((0, pad), (0, 0), (0, 0)))
            kernel_p = ops.pad(kernel, ((0, pad), (0, 0), (0, 0)))
        chunks = (ops.reshape(u_t, (n_chunks, size, -1, d_in)),
                  ops.reshape(kernel_p, (n_chunks, size, d_in, n_caps * dim)))
        first_sum = ops.reshape(ops.matmul(u_flat, kernel_flat), (-1, n_caps, dim))
        v, c, saved = _route_forward(make, chunks, n_caps, routings, squash_eps, first_sum)

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
                    d_uh = ops.matmul(ops.transpose(coef, (0, 1, 3, 2)), vec)
                    d_uh = ops.transpose(ops.reshape(d_uh, (-1, size, dim)), (1, 0, 2))
                    d_uh = ops.reshape(d_uh, (size, -1, n_caps * dim))  # [size, B, n_caps*dim]
                    return (ops.matmul(d_uh, ops.transpose(kernel_c, (0, 2, 1))),
                            ops.matmul(ops.transpose(u_c, (0, 2, 1)), d_uh))

                d_u, d_kernel = ops.map(chunk_grads, (chunks, ops.stack(coefs, axis=3)))
                d_u = ops.reshape(d_u, (n_chunks * size, -1, d_in))[:n_in]
                d_u = ops.transpose(d_u, (1, 0, 2))
                d_kernel = ops.reshape(d_kernel, (n_chunks * size, d_in, n_caps * dim))[:n_in]
            if g_s1 is not None:  # pass 1: s_1 = (u_flat kernel_flat) / n_caps
                g1 = ops.reshape(g_s1, (-1, n_caps * dim)) / n_caps
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
# PrimaryCaps' convolution: the backend's forward, a written-out backward
# --------------------------------------------------------------------------------------------
#
# Contract: the same values and gradients as ops.conv(x, kernel, strides, "valid") under
# autodiff (tests/models/capsnet/test_equivalence.py), with the same FLOPs; only the backward is
# written out, and only where `use_fast_path("conv_backward")` says so.
# Why: TensorFlow's Eigen input gradient of this 9x9 stride-2 convolution
# (Conv2DBackpropInput) works image by image, a [36, 256] x [256, 9*9*256] matmul and a col2im
# each; doing that matmul ONCE for the whole batch, then a segment sum that adds every patch tap
# back onto its pixel (col2im), is much faster. The kernel gradient, as a dilated
# convolution of the input with the output gradient, beats the backend's under Eigen and, by
# more, oneDNN's Conv2DBackpropFilter. Under oneDNN, oneDNN's own transposed convolution beats
# col2im for the input gradient with AVX512_BF16 and no AMX (a Zen 4), and col2im beats it where
# AMX-BF16 runs the matmul. Both forms were timed with float32 and bfloat16 on TensorFlow's CPU
# kernels only, so elsewhere (GPUs, other backends, float16) the backend's own gradient stays.
# `python -m bench.train_throughput --mode primarycaps` times each gradient in each form on the
# machine at hand; the figures: docs/lab/kernel-work.md.


def _patch_pixels(out_h, out_w, width, kernel_size, strides):
    """Flat pixel index (row * width + col) of every patch tap, in the order of a patch matrix:
    [H' * W' * k * k] int32 for output positions (i, j) and taps (ki, kj), row = strides*i + ki."""
    taps = np.arange(kernel_size)
    rows = strides * np.arange(out_h)[:, None, None, None] + taps[None, None, :, None]
    cols = strides * np.arange(out_w)[None, :, None, None] + taps[None, None, None, :]
    return (rows * width + cols).reshape(-1).astype("int32")


def conv2d_valid(x, kernel, strides, col2im=None):
    """'valid' convolution, channels last: x [B, H, W, C], kernel [k, k, C, F] ->
    [B, H', W', F] with H' = (H - k) // strides + 1 (likewise W'). B > 0: the backward
    convolves over the batch as channels, which fails for B = 0 (PrimaryCaps guards with
    `unless_empty`).

    Equals ops.conv(x, kernel, strides, "valid") with its autodiff gradients. The forward is
    ops.conv; the backward is written out:
      d x = col2im(d y [B*H'*W', F] x kernel^T [F, k*k*C]): one matmul, then a segment sum of
            each patch tap onto its pixel, when `col2im` (by default `use_fast_path("col2im")`);
            else the backend's transposed convolution of d y;
      d kernel = ops.conv(x^T [C, H_used, W_used, B], d y^T [H', W', B, F], dilation = strides),
            transposed back, where H_used = strides * (H' - 1) + k rows are the ones any patch
            reads (the others get no gradient).
    """
    if col2im is None:
        col2im = use_fast_path("col2im", x.dtype)
    k = kernel.shape[0]
    height, width = x.shape[1], x.shape[2]
    used_h, used_w = height - (height - k) % strides, width - (width - k) % strides
    input_gradient = _col2im_input_gradient if col2im else _transposed_input_gradient

    @ops.custom_gradient
    def conv(x, kernel):
        y = ops.conv(x, kernel, strides=strides, padding="valid", data_format="channels_last")

        def grad(*args, upstream=None):
            (g,) = _upstream(args, upstream, 1)  # [B, H', W', F]
            d_kernel = ops.transpose(ops.conv(  # [C, k, k, F] -> [k, k, C, F]
                ops.transpose(x[:, :used_h, :used_w], (3, 1, 2, 0)),
                ops.transpose(g, (1, 2, 0, 3)), dilation_rate=strides,
                data_format="channels_last"), (1, 2, 0, 3))
            return input_gradient(g, kernel, strides, (height, width)), d_kernel

        return y, grad

    return conv(x, kernel)


def _col2im_input_gradient(g, kernel, strides, size):
    """d x [B, H, W, C] of a 'valid' convolution from d y = g [B, H', W', F]: one matmul
    g [B*H'*W', F] x kernel^T [F, k*k*C] gives every patch's gradient, and a segment sum adds
    each patch tap onto its pixel."""
    k, _, c_in, c_out = kernel.shape
    (height, width), (out_h, out_w) = size, g.shape[1:3]
    batch = ops.shape(g)[0]
    patches = ops.matmul(ops.reshape(g, (-1, c_out)),
                         ops.transpose(ops.reshape(kernel, (-1, c_out))))
    pixels = _patch_pixels(out_h, out_w, width, k, strides)
    ids = ops.arange(batch, dtype="int32")[:, None] * (height * width) + pixels[None, :]
    # Up to ceil(k / strides)^2 taps land on a pixel: summed in float32, so that the bf16
    # gradient's rounding error is no larger than that of oneDNN's own bf16 input gradient
    # (a bf16 sum's is several times larger; tests/models/capsnet/test_equivalence.py).
    d_x = ops.segment_sum(ops.cast(ops.reshape(patches, (-1, c_in)), "float32"),
                          ops.reshape(ids, (-1,)), num_segments=batch * height * width)
    return ops.reshape(ops.cast(d_x, g.dtype), (-1, height, width, c_in))


def _transposed_input_gradient(g, kernel, strides, size):
    """The same d x as `_col2im_input_gradient`, as the backend's transposed convolution; the
    rows and columns no patch reads (H - H_used of them) get zeros through output_padding."""
    k = kernel.shape[0]
    padding = tuple((side - k) % strides for side in size)
    return ops.conv_transpose(g, kernel, strides=strides, padding="valid",
                              output_padding=padding, data_format="channels_last")
