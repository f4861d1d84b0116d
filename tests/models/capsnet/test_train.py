"""models/capsnet/train.py, the standalone trainer: its augmentation, batches, a tiny run that
writes the per-epoch test error and the weights, and weights trained under the JAX backend
loading into the TensorFlow-backend model."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import mnist
from models.capsnet import build_capsnet
from models.capsnet.model import LENGTHS, RECON
from models.capsnet import train as standalone
from tests.conftest import REPO


def test_random_shift_moves_each_image_by_at_most_max_shift_with_zero_fill():
    rng = np.random.default_rng(0)
    images = np.zeros((50, 28, 28), dtype="float32")
    images[:, 10:18, 12:16] = rng.uniform(0.5, 1.0, size=(50, 8, 4))
    shifted = standalone.random_shift(images, 2, rng)
    assert shifted.shape == images.shape
    seen = set()
    for original, moved in zip(images, shifted):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), moved)]
        assert len(matches) == 1  # a pure shift (the ink never reaches the border here)
        seen.add(matches[0])
    assert len(seen) > 10  # shifts differ between images
    np.testing.assert_array_equal(standalone.random_shift(images, 0, rng), images)
    # Zero fill: a full-ink image loses exactly the rows and columns it was shifted by.
    ones = standalone.random_shift(np.ones((200, 28, 28), "float32"), 2, rng)
    assert set(np.unique(ones)) == {0.0, 1.0} and ones.sum(axis=(1, 2)).min() >= 24 * 24


def test_batches_are_model_inputs_and_targets():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=30)
    batches = standalone.MnistBatches(x, y, batch_size=8, max_shift=0, seed=0)
    assert len(batches) == 4
    inputs, targets = batches[0]
    assert inputs["image"].shape == (8, 28, 28, 1) and inputs["image"].max() <= 1.0
    np.testing.assert_array_equal(inputs["label"], targets["lengths"])
    np.testing.assert_array_equal(targets["recon"], inputs["image"].reshape(8, 784))
    rows = [np.argmax(batches[i][0]["label"], -1) for i in range(4)]
    assert sum(len(r) for r in rows) == 30  # one pass, every image once
    assert standalone.MnistBatches(x, y, 8, 0, 0, steps_per_epoch=10)[9][0]["image"].shape[0] == 8


def read_history(out):
    with open(os.path.join(out, standalone.HISTORY_FILE)) as f:
        return list(csv.DictReader(f))


TINY = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8",
        "--data-fraction", "0.002", "--offline"]


def test_tiny_run_writes_test_error_per_epoch_and_weights(tmp_path, mnist_cache_dir, capsys):
    out = str(tmp_path / "run")
    assert standalone.main(["--output-dir", out, "--data-cache-dir", mnist_cache_dir,
                            *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert set(history[0]) == set(standalone.HISTORY_FIELDS)
    for row in history:
        assert int(row["test_errors"]) == round(float(row["test_error"]) * 20)  # 0.2 % of 10k
        assert np.isfinite(float(row["loss"]))
    # lr 1e-3 after epoch 1, x0.9 after epoch 2
    assert [float(r["learning_rate"]) for r in history] == pytest.approx([1e-3, 9e-4])
    assert summary["test_error"] == float(history[-1]["test_error"]) and summary["epochs"] == 2
    model, _ = build_capsnet()
    model.load_weights(os.path.join(out, standalone.WEIGHTS_FILE))


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--data-fraction", "0"],
                                  ["--max-shift", "-1"], ["--steps-per-epoch", "0"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        standalone.parse_args(["--output-dir", "x", *argv])
    assert exc.value.code == 2



# Under KERAS_BACKEND=jax: a tiny standalone run, then what its saved weights, reloaded into a
# fresh model, give on the first test images.
JAX_RUN = """
import json, os, sys
import keras
from data import mnist
from models.capsnet import build_capsnet
from models.capsnet import train as standalone
out, cache, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
assert standalone.main(["--output-dir", out, "--data-cache-dir", cache, *flags]) == 0
train_model, inference_model = build_capsnet()
train_model.load_weights(os.path.join(out, standalone.WEIGHTS_FILE))
images = mnist.load(cache_dir=cache, allow_network=False)[0].x_test[:8, :, :, None] / 255.0
out = inference_model.predict(images.astype("float32"), verbose=0)
print("RESULT " + json.dumps({"backend": keras.backend.backend(),
                              **{key: value.tolist() for key, value in out.items()}}))
"""


def test_weights_trained_under_jax_load_into_the_tensorflow_model(tmp_path, mnist_cache_dir):
    pytest.importorskip("jax")
    out = str(tmp_path / "jax_run")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", JAX_RUN, out, mnist_cache_dir, *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines()
                         if line.startswith("RESULT ")][-1][len("RESULT "):])
    assert result["backend"] == "jax"
    assert [int(r["epoch"]) for r in read_history(out)] == [1, 2]

    train_model, inference_model = build_capsnet()  # this process: the TensorFlow backend
    train_model.load_weights(os.path.join(out, standalone.WEIGHTS_FILE))
    images = mnist.load(cache_dir=mnist_cache_dir, allow_network=False)[0].x_test[:8, :, :, None]
    images = (images / 255.0).astype("float32")
    out = inference_model.predict(images, verbose=0)
    fresh = build_capsnet()[1].predict(images, verbose=0)
    for key in (LENGTHS, RECON):
        jax_out = np.asarray(result[key])
        scale = np.abs(jax_out).max()  # lengths start near 4e-6 with the spec's initialisation
        np.testing.assert_allclose(out[key], jax_out, rtol=1e-4, atol=1e-4 * scale)
        if key == LENGTHS:  # measured: a fresh model is ~90 % of `scale` away, these 1e-7
            assert np.abs(fresh[key] - jax_out).max() > 0.1 * scale  # the weights matter


def test_killed_run_resumes_at_the_next_epoch_with_the_same_command(tmp_path, mnist_cache_dir):
    """A real SIGKILL while epoch 3 of 3 trains; the same command resumes at epoch 3 and the
    history holds every epoch once, at the uninterrupted schedule's learning rates."""
    import signal
    import subprocess
    import sys
    from tests.conftest import REPO, kill_when
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "models.capsnet.train", "--output-dir", out,
               "--data-cache-dir", mnist_cache_dir, "--mixed-precision", "none", "--epochs", "3",
               "--steps-per-epoch", "2", "--batch-size", "8", "--data-fraction", "0.002",
               "--offline"]
    # Epoch 2's checkpoint is written before Keras starts epoch 3.
    assert kill_when(command, "Epoch 3/3") == -signal.SIGKILL
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at epoch 3 of 3 (checkpoint from " in proc.stdout
    history = read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert [float(r["learning_rate"]) for r in history] == pytest.approx([1e-3, 9e-4, 8.1e-4])
    assert not os.listdir(os.path.join(out, standalone.CHECKPOINT_DIR))  # removed at the end


def test_another_recipe_data_or_seed_is_another_run():
    """What the fingerprint sees: a checkpoint of any other recipe, data selection or seed is
    never resumed (models/capsnet/resume.py refuses it and says so)."""
    args, recipe = standalone.parse_args(["--output-dir", "x"])
    base = standalone.run_fingerprint(args, recipe)
    assert standalone.run_fingerprint(*standalone.parse_args(["--output-dir", "y"])) == base
    for flags in (["--learning-rate", "2e-3"], ["--epochs", "51"], ["--seed", "1"],
                  ["--data-fraction", "0.5"], ["--mixed-precision", "none"]):
        assert standalone.run_fingerprint(
            *standalone.parse_args(["--output-dir", "x", *flags])) != base, flags
