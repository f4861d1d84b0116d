"""models/train.py, the standalone trainer: its augmentation, batches drawn from (seed,
epoch), a tiny run that writes the per-epoch valid error, the weights and the final test, the
seed deciding the run, and weights trained under the JAX backend loading into the
TensorFlow-backend model."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import mnist, splits
from models.capsnet import build_capsnet
from models.capsnet.model import LENGTHS, RECON
from models.capsnet.recipe import Recipe
from models import networks
from models import train as standalone
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


def epoch_images(batches, epoch):
    batches.draw(epoch)
    return np.concatenate([batches[i][0]["image"] for i in range(len(batches))])


def test_an_epochs_order_and_shifts_come_from_seed_and_epoch_alone():
    x = np.random.default_rng(2).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 10

    def batches(seed):
        return standalone.MnistBatches(x, y, batch_size=16, max_shift=2, seed=seed)

    uninterrupted = batches(0)
    epochs = [epoch_images(uninterrupted, epoch) for epoch in range(3)]
    resumed = batches(0)  # a run resumed at epoch 3 draws epoch 2 first
    resumed.draw(2)
    second, first = resumed[1][0]["image"], resumed[0][0]["image"]  # fetched in any order
    np.testing.assert_array_equal(np.concatenate([first, second, resumed[2][0]["image"]]),
                                  epochs[2])
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled and reshifted every epoch
    assert not np.array_equal(epoch_images(batches(1), 0), epochs[0])  # another seed


def read_history(out):
    with open(os.path.join(out, standalone.HISTORY_FILE)) as f:
        return list(csv.DictReader(f))


TINY = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8",
        "--data-fraction", "0.002", "--offline"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_cache_dir):
    """The tiny run of seed 0 with --final-test: (output dir, train()'s result)."""
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    args, recipe = standalone.parse_args(["--output-dir", out, "--data-cache-dir",
                                          mnist_cache_dir, "--final-test", *TINY])
    return out, standalone.train(args, recipe)


def test_tiny_run_writes_valid_error_per_epoch_weights_and_final_test(tiny_run,
                                                                    mnist_cache_dir):
    out, result = tiny_run
    history = read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert set(history[0]) == set(standalone.HISTORY_FIELDS)
    for row in history:
        assert int(row["valid_errors"]) == round(float(row["valid_error"]) * 10)  # 0.2 % of 5k
        assert np.isfinite(float(row["loss"]))
    # the optimizer's rate at each epoch's last step: 1e-3, then x0.9
    assert [float(r["learning_rate"]) for r in history] == pytest.approx([1e-3, 9e-4])
    assert result["valid_error"] == float(history[-1]["valid_error"])
    with open(os.path.join(out, standalone.FINAL_TEST_FILE)) as f:
        final = json.load(f)
    assert final["test_images"] == 20 and final["epochs"] == 2  # 0.2 % of the 10k test images
    assert final["test_error"] == final["test_errors"] / 20 == result["final_test"]["test_error"]
    model, inference_model = build_capsnet()
    model.load_weights(os.path.join(out, standalone.weights_file(networks.CAPSNET)))
    test = mnist.load(cache_dir=mnist_cache_dir, allow_network=False)[0]
    assert standalone.count_errors(inference_model, test.x_test[:20], test.y_test[:20],
                                   8) == final["test_errors"]  # of the saved weights


def test_the_seed_decides_the_run(tiny_run, tmp_path, mnist_cache_dir, capsys):
    """Weights, order and shifts: the same seed gives tiny_run's first epoch again, to the bit;
    another seed another loss. The test set stays unread without --final-test."""
    first_loss = float(read_history(tiny_run[0])[0]["loss"])
    losses = {}
    for seed in ("0", "1"):
        out = str(tmp_path / seed)
        assert standalone.main(["--output-dir", out, "--data-cache-dir", mnist_cache_dir,
                                *TINY, "--epochs", "1", "--seed", seed]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["valid_error"] == float(read_history(out)[0]["valid_error"])
        assert "test_error" not in summary
        assert not os.path.exists(os.path.join(out, standalone.FINAL_TEST_FILE))
        losses[seed] = float(read_history(out)[0]["loss"])
    assert losses["0"] == first_loss
    assert abs(losses["1"] - first_loss) > 1e-5  # measured: 0.90074 against 0.90007
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs must be > 0, got 0"),
    (["--data-fraction", "0"], "data_fraction must be in (0, 1], got 0.0"),
    (["--max-shift", "-1"], "max_shift must be in [0, 14), got -1"),
    (["--steps-per-epoch", "0"], "steps_per_epoch must be > 0, got 0"),
    (["--valid-size", "-1"], "valid_size must be in (0, 60000), got -1"),
    (["--lr-schedule", "step"], "invalid choice: 'step'"),
    (["--warmup-epochs", "1"], "warmup_epochs must be 0 with lr_schedule 'exponential'"),
    (["--lr-schedule", "cosine", "--warmup-epochs", "50"], "warmup_epochs must be in [0, "),
    (["--ema-momentum", "1"], "ema_momentum must be in [0, 1) (0: off), got 1.0"),
    (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        standalone.parse_args(["--output-dir", "x", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_valid_size_0_trains_on_all_60000_images():
    assert standalone.data_rows(0, 1.0) == {"train": ("train", 0, 60000), "valid": None,
                                            "test": ("test", 0, 10000)}
    assert standalone.data_rows(0, 0.002)["train"] == ("train", 0, 120)
    assert standalone.data_rows(5000, 0.002) == splits.split_ranges(5000, 0.002)
    args, recipe = standalone.parse_args(["--output-dir", "x", "--valid-size", "0"])
    assert args.valid_size == 0 and recipe == Recipe()



# Under KERAS_BACKEND=jax: a tiny standalone run, then what its saved weights, reloaded into a
# fresh model, give on the first test images.
JAX_RUN = """
import json, os, sys
import keras
from data import mnist
from models.capsnet import build_capsnet
from models import networks
from models import train as standalone
out, cache, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
assert standalone.main(["--output-dir", out, "--data-cache-dir", cache, *flags]) == 0
train_model, inference_model = build_capsnet()
train_model.load_weights(os.path.join(out, standalone.weights_file(networks.CAPSNET)))
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
    train_model.load_weights(os.path.join(out, standalone.weights_file(networks.CAPSNET)))
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
    history holds every epoch once, at the uninterrupted schedule's learning rates (read from
    the optimizer: its restored step count continues the schedule)."""
    import signal
    import subprocess
    import sys
    from tests.conftest import REPO, kill_when
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "models.train", "--output-dir", out,
               "--data-cache-dir", mnist_cache_dir, "--mixed-precision", "none", "--epochs", "3",
               "--steps-per-epoch", "2", "--batch-size", "8", "--data-fraction", "0.002",
               "--offline"]
    # Epoch 2's checkpoint is written before Keras starts epoch 3.
    assert kill_when(command, "Epoch 3/3") == -signal.SIGKILL
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed at epoch 3 of 3 (checkpoint from " in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["epochs"] == 3  # the run's, not 1
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
                  ["--data-fraction", "0.5"], ["--mixed-precision", "none"],
                  ["--network", "cnn"]):
        assert standalone.run_fingerprint(
            *standalone.parse_args(["--output-dir", "x", *flags])) != base, flags
