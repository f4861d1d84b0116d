"""CapsNet (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules") in Keras 3.

Framework choice: the whole project uses **Keras 3 through `import keras`** (never `tf.keras`), and
this package is written against `keras` and `keras.ops` only -- no TensorFlow, JAX or PyTorch
imports -- so the model runs unchanged under the TF, JAX and PyTorch backends (`KERAS_BACKEND`).
TFX itself needs the TF backend for the exported SavedModel; the model code does not.

Note: importing `tensorflow_transform` sets `TF_USE_LEGACY_KERAS=1` as a side effect. That only
changes what `tf.keras` resolves to (Keras 2 / tf_keras); `import keras` is still Keras 3, which is
why nothing in the project spells `tf.keras`.

Modules:
  hardware  the CPU/GPU's features -> TensorFlow's CPU runtime and the compute dtype (no Keras)
  layers  squash, safe_length, PrimaryCaps, DigitCaps (+ dynamic_routing), Length, Mask
  losses  margin_loss, reconstruction_loss, RECON_WEIGHT
  model   build_capsnet -> (train_model, inference_model), compile_capsnet
  recipe  the training recipe, defined once (no Keras)
  schedule  the recipe's learning-rate schedule and weight averaging, as Adam's options
The standalone trainer, `python -m models.train`, trains this model (or the baseline CNN)
without TFX, under any backend.
"""

import importlib
import sys

# Lazy exports (PEP 562): `models.capsnet.hardware` must be importable before Keras loads its
# backend, because the TensorFlow settings it chooses act only before TensorFlow starts.
_EXPORTS = {
    "DigitCaps": "layers", "Length": "layers", "Mask": "layers", "PrimaryCaps": "layers",
    "dynamic_routing": "layers", "safe_length": "layers", "squash": "layers",
    "RECON_WEIGHT": "losses", "margin_loss": "losses", "reconstruction_loss": "losses",
    "build_capsnet": "model", "compile_capsnet": "model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


if "keras" in sys.modules:
    # Keras is loaded (its backend chosen), so nothing above is at stake: register the layers and
    # losses now, and `import keras, models.capsnet` is all keras.saving.load_model needs.
    importlib.import_module(f"{__name__}.model")
