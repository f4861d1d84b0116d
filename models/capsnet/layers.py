"""CapsNet layers (Sabour et al. 2017) and the paper's formulas, in `keras.ops` only, so any
Keras 3 backend runs them. The faster ways to compute some of them live apart, in kernels.py,
each equal to its formula here; `kernels.use_fast_path` picks per backend, device and dtype.

Shapes for MNIST (B = dynamic batch, never baked into a shape):
  Conv2D 256@9x9 ReLU   [B,28,28,1]   -> [B,20,20,256]
  PrimaryCaps           [B,20,20,256] -> [B,1152,8]      (32 types x 6x6 positions, 8D, squashed)
  DigitCaps             [B,1152,8]    -> [B,10,16]       (u_hat = W u, dynamic routing)
  Length                [B,10,16]     -> [B,10]
  Mask                  [B,10,16] (+ one-hot [B,10]) -> [B,160]
"""

import keras
from keras import ops

from models.capsnet import kernels

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


def predictions(u, kernel, n_caps, dim):
    """u_hat_{j|i} = W_ij u_i, paper eq. 2: u [B, N_in, D_in], W [N_in, D_in, n_caps * dim] ->
    [B, N_in, n_caps, dim]."""
    u_hat = ops.einsum("bid,idk->bik", u, kernel)  # [B, N_in, n_caps * dim]
    return ops.reshape(u_hat, (-1, kernel.shape[0], n_caps, dim))


def dynamic_routing(u_hat, routings=3, stop_gradient=False):
    """Routing-by-agreement between children i and parents j, paper Procedure 1, as written.

    u_hat [B, N_in, N_out, D] -> (v [B, N_out, D], c [B, N_in, N_out], the couplings of the
    last pass); computed in float32. The reference that the fast path
    (kernels.predict_and_route) is tested against.

    stop_gradient=False: gradients flow through every pass (XifengGuo/CapsNet-Keras master and the
    official code). stop_gradient=True: u_hat is seen through stop_gradient in every pass except
    the last one's weighted sum, so c carries no gradient (the variant of XifengGuo/CapsNet-Pytorch).
    The forward value is the same either way.
    """
    if routings < 1:
        raise ValueError(f"routings must be >= 1, got {routings}")
    u_hat = ops.cast(u_hat, "float32")
    inner = ops.stop_gradient(u_hat) if stop_gradient else u_hat  # what the logits see
    b = ops.zeros_like(u_hat[..., 0])  # logits b_ij = 0                    [B, N_in, N_out]
    for r in range(routings):
        last = r == routings - 1
        c = ops.softmax(b, axis=-1)  # c_i = softmax(b_i) over the parents   [B, N_in, N_out]
        s = ops.einsum("bij,bijd->bjd", c, u_hat if last else inner)  # s_j  [B, N_out, D]
        v = squash(s)  # v_j = squash(s_j)                                  [B, N_out, D]
        if not last:
            b = b + ops.einsum("bijd,bjd->bij", inner, v)  # b_ij += u_hat . v_j
    return v, c


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D that answers an empty batch itself (`kernels.unless_empty`:
    TensorFlow's oneDNN convolution misshapes a zero-size batch). The guard takes in the bias
    and the activation, so that the backend sees them next to the convolution and can fuse them
    (oneDNN does, in TensorFlow's graph)."""

    def call(self, inputs):
        return kernels.unless_empty(super().call, inputs, self.compute_output_shape(inputs.shape))


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
        kernel = kernels.read(self.kernel, self.compute_dtype)
        if self.padding == "valid" and kernels.use_fast_path("conv_backward", self.compute_dtype):
            def convolve(x):
                return kernels.conv2d_valid(x, kernel, self.strides)
        else:
            def convolve(x):
                return ops.conv(x, kernel, strides=self.strides, padding=self.padding,
                                data_format="channels_last")
        shape = inputs.shape
        x = kernels.unless_empty(convolve, inputs, (shape[0], self._spatial_out(shape[1]),
                                                    self._spatial_out(shape[2]),
                                                    self.kernel.shape[-1]))
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
    predictions come from one batched matmul: u_hat = `predictions(u, W)`; then
    `dynamic_routing`. On every backend the fast path computes exactly that
    (`kernels.predict_and_route`: the same values, a fraction of the memory traffic).
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
        self.kernel = self.add_weight(  # read as float32 under every policy (see route)
            name="kernel", shape=(n_in, d_in, self.n_caps * self.dim),
            initializer=self.kernel_initializer, autocast=False)

    def route(self, inputs):
        """(v [B, n_caps, dim], coupling coefficients c [B, N_in, n_caps]) for capsules `inputs`:
        u_hat = predictions(inputs, W), then dynamic_routing (or the fast path, which equals it).
        In float32 under every dtype policy, like the routing it feeds: the layer is bound by
        memory traffic, not FLOPs, and a half-precision u_hat would only lose digits."""
        inputs, kernel = ops.cast(inputs, "float32"), kernels.read(self.kernel, "float32")
        if kernels.use_fast_path("routing", self.compute_dtype):
            return kernels.predict_and_route(inputs, kernel, self.n_caps, self.dim, self.routings,
                                             self.stop_gradient_routing, SQUASH_EPS,
                                             return_couplings=True)
        return dynamic_routing(predictions(inputs, kernel, self.n_caps, self.dim), self.routings,
                               self.stop_gradient_routing)

    def call(self, inputs):
        return self.route(inputs)[0]

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

