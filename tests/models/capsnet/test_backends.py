"""models/capsnet is pure Keras 3: no TF/JAX/torch imports, and it trains under the JAX backend."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

import models.capsnet

PACKAGE_DIR = pathlib.Path(models.capsnet.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent.parent
FORBIDDEN = {"tensorflow", "tf_keras", "jax", "jaxlib", "torch"}


def test_package_imports_only_keras():
    sources = sorted(PACKAGE_DIR.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "layers.py", "losses.py", "model.py"}
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.name}:{node.lineno} imports {roots & FORBIDDEN}"


# Runs in a fresh interpreter: the Keras backend is fixed at import time.
JAX_SCRIPT = r"""
import json, sys
import numpy as np
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
import jax
from models.capsnet import (RECON_WEIGHT, build_capsnet, compile_capsnet, margin_loss,
                            reconstruction_loss)

# (No keras.utils.set_random_seed: it imports TensorFlow to seed it, and this run checks that
# nothing TF gets loaded before fit; the assertions do not depend on the initial weights.)
train_model, inference_model = build_capsnet()
rng = np.random.default_rng(0)
x = (rng.uniform(size=(2, 28, 28, 1)) < 0.2).astype("float32")
y = np.eye(10, dtype="float32")[[3, 8]]

trainable = [v.value for v in train_model.trainable_variables]
non_trainable = [v.value for v in train_model.non_trainable_variables]

def loss_fn(trainable, non_trainable, x, y):
    out, _ = train_model.stateless_call(trainable, non_trainable, {"image": x, "label": y})
    loss = (margin_loss(y, out["lengths"]).mean()
            + RECON_WEIGHT * reconstruction_loss(x.reshape(x.shape[0], -1), out["recon"]).mean())
    return loss, out

(loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    trainable, non_trainable, x, y)
infer = inference_model.predict(x[:1], verbose=0)
tf_loaded_before_fit = "tensorflow" in sys.modules

compile_capsnet(train_model)
step = train_model.train_on_batch({"image": x, "label": y},
                                  {"lengths": y, "recon": x.reshape(2, 784)}, return_dict=True)
print("RESULT " + json.dumps({
    "backend": keras.backend.backend(),
    "params": int(sum(np.prod(v.shape) for v in train_model.trainable_variables)),
    "loss": float(loss),
    "lengths_shape": list(out["lengths"].shape),
    "recon_shape": list(out["recon"].shape),
    "infer_shapes": [list(infer["lengths"].shape), list(infer["recon"].shape)],
    "grad_shapes_match": [list(g.shape) for g in grads] == [list(v.shape) for v in trainable],
    "grads_finite": all(bool(np.isfinite(np.asarray(g)).all()) for g in grads),
    "grad_nonzero": [bool(np.abs(np.asarray(g)).max() > 0) for g in grads],
    "outputs_finite": bool(np.isfinite(np.asarray(out["lengths"])).all()
                           and np.isfinite(np.asarray(out["recon"])).all()),
    "tf_loaded_before_fit": tf_loaded_before_fit,
    "fit_step": {k: float(v) for k, v in step.items()},
}))
"""


def test_forward_and_backward_under_jax_backend():
    pytest.importorskip("jax")
    env = dict(os.environ)
    env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])

    assert result["backend"] == "jax"
    assert result["params"] == 8_215_568
    assert result["lengths_shape"] == [2, 10] and result["recon_shape"] == [2, 784]
    assert result["infer_shapes"] == [[1, 10], [1, 784]]
    assert result["outputs_finite"] and result["grads_finite"] and result["grad_shapes_match"]
    # 2 conv kernels + 2 biases, DigitCaps W, 3 dense kernels + 3 biases; all receive gradient.
    assert len(result["grad_nonzero"]) == 11 and all(result["grad_nonzero"])
    # Fresh CapsNet: lengths ~0, so margin ~0.81; recon MSE ~0.25 x 0.392 on ~20 % ink images.
    assert 0.8 < result["loss"] < 0.95
    assert not result["tf_loaded_before_fit"]
    assert set(result["fit_step"]) == {"loss", "lengths_loss", "recon_loss", "lengths_accuracy"}
    assert all(abs(v) < 10 for v in result["fit_step"].values())
