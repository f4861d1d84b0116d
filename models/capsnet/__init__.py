"""CapsNet (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules") in Keras 3.

Framework choice: the whole project uses **Keras 3 through `import keras`** (never `tf.keras`), and
this package is written against `keras` and `keras.ops` only -- no TensorFlow, JAX or PyTorch
imports -- so the model runs unchanged under the TF, JAX and PyTorch backends (`KERAS_BACKEND`).
TFX itself needs the TF backend for the exported SavedModel; the model code does not.

Note: importing `tensorflow_transform` sets `TF_USE_LEGACY_KERAS=1` as a side effect. That only
changes what `tf.keras` resolves to (Keras 2 / tf_keras); `import keras` is still Keras 3, which is
why nothing in the project spells `tf.keras`.

Modules:
  layers  squash, safe_length, PrimaryCaps, DigitCaps (+ dynamic_routing), Length, Mask
  losses  margin_loss, reconstruction_loss, RECON_WEIGHT
  model   build_capsnet -> (train_model, inference_model), compile_capsnet
  train   the standalone trainer: `python -m models.capsnet.train` (any backend, no TFX)
"""

import keras

if not keras.__version__.startswith("3"):
    raise ImportError(
        f"models.capsnet needs Keras 3 (`import keras`), found keras {keras.__version__}. "
        "Install keras>=3 (see requirements.in); tf.keras / tf_keras (Keras 2) is not supported.")

from models.capsnet.layers import (  # noqa: E402
    DigitCaps,
    Length,
    Mask,
    PrimaryCaps,
    dynamic_routing,
    safe_length,
    squash,
)
from models.capsnet.losses import RECON_WEIGHT, margin_loss, reconstruction_loss  # noqa: E402
from models.capsnet.model import build_capsnet, compile_capsnet  # noqa: E402

__all__ = [
    "DigitCaps",
    "Length",
    "Mask",
    "PrimaryCaps",
    "RECON_WEIGHT",
    "build_capsnet",
    "compile_capsnet",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "safe_length",
    "squash",
]
