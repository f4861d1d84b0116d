"""TFX Trainer module: thin glue between TFX and the networks of `models.networks`.

`run_fn` reads the Transform output, builds and compiles the recipe's network (the CapsNet, or
the baseline CNN of the robustness comparison) inside a tf.distribute
strategy chosen from the environment (`make_strategy`): MultiWorkerMirroredStrategy when TF_CONFIG
names a cluster of more than one task (Vertex worker pools, `local_runner.py --trainer-workers`),
else MirroredStrategy (every visible GPU; the CPU when there is none). It trains on the `train`
split with per-epoch metrics on `valid` through one loop for both (`train`: Keras' own train and
test steps under `strategy.run`, Keras callbacks driven by hand, as `fit` would), writes
TensorBoard logs to the model run dir and exports the serving SavedModel (see `models.serving`).
The test split is never read here.

Several workers: every one runs `run_fn` (TFX's GenericExecutor in each replica). The chief (the
`chief` task, else `worker` 0) writes the export, the checkpoint and TensorBoard; the others write
theirs to a temporary dir they remove (the TensorFlow multi-worker pattern: every worker runs the
same ops, so that no collective waits for one that skipped them). The chief restores the
checkpoint and the warm start; the others receive its weights (`sync_from_chief`).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from absl import logging
from tfx_bsl.public import tfxio

from models import features, networks, progress, serving
from models.optimizers import FusedAdam
from models.capsnet import augment, hardware, schedule
from models.capsnet.recipe import Recipe
from models.capsnet.resume import Resume

IMAGE_XF = features.transformed_name(features.IMAGE_KEY)
LABEL_XF = features.transformed_name(features.LABEL_KEY)
SHUFFLE_BUFFER = 10_000  # examples; TFXIO's default, as the Trainer shuffled before
READ_BATCH = 1_000       # examples per read from the TFRecord files (unbatched after)


# ------------------------------------------------------------------------------ the cluster
def tf_config(environ=os.environ) -> dict:
    """TF_CONFIG as a dict ({} when unset or empty); a clear error when it is not JSON."""
    text = environ.get("TF_CONFIG", "").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG must be JSON, got {text[:200]!r} ({e})") from e


def cluster_size(config: dict) -> int:
    """How many tasks TF_CONFIG's cluster names (every job), 1 without a cluster."""
    return sum(len(tasks) for tasks in config.get("cluster", {}).values()) or 1


def is_chief(config: dict) -> bool:
    """The task that writes: the `chief` task, else `worker` 0 (`master` 0, its old name), and a
    process without a cluster."""
    cluster, task = config.get("cluster", {}), config.get("task", {})
    if not cluster:
        return True
    kind, index = task.get("type"), int(task.get("index", 0))
    if "chief" in cluster or "master" in cluster:
        return kind in ("chief", "master") and index == 0
    return kind == "worker" and index == 0


def make_strategy(config: dict) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy (it reads TF_CONFIG) when the cluster has more than one task,
    else MirroredStrategy (every visible GPU; the CPU, or its logical devices, without one).
    Must run before any other TensorFlow op: multi-worker collectives are set up at startup."""
    if cluster_size(config) > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.MirroredStrategy()
    logging.info("%s: %d worker(s), %d replica(s) in sync", type(strategy).__name__,
                 cluster_size(config), strategy.num_replicas_in_sync)
    return strategy


# ------------------------------------------------------------------------------ the input
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s shuffle order and shifts: drawn from (seed, epoch) alone, so a
    run resumed at that epoch draws exactly what an uninterrupted run draws."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def random_shift(images: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Each image moved by its own random integer (dy, dx) in [-max_shift, max_shift], zero fill
    (`augment.shift`): [B, 28, 28, C] -> [B, 28, 28, C]. seed: int [2], the offsets are a
    function of it (stateless)."""
    if max_shift == 0:
        return images
    offsets = tf.random.stateless_uniform([2, tf.shape(images)[0]], seed, 0, 2 * max_shift + 1,
                                          dtype=tf.int32)
    return augment.shift(images, offsets, max_shift)


def to_model_io(batch: Dict[str, tf.Tensor], max_shift: int = 0, seed=(0, 0),
                network: networks.Network = networks.CAPSNET):
    """Transformed features -> (inputs, targets) of `network`'s training model
    (`Network.model_io` of the images, shifted, and the one-hot labels [B,10]); for the CapsNet
    the decoder's target is the shifted image it was shown. seed: the shifts'
    (`random_shift`)."""
    images = random_shift(batch[IMAGE_XF], max_shift, seed)
    onehot = tf.one_hot(tf.reshape(batch[LABEL_XF], [-1]), features.NUM_CLASSES)
    return network.model_io(images, onehot)


def read_examples(file_pattern, data_accessor, schema) -> tf.data.Dataset:
    """One pass over a split's transformed examples, in file order (the same on every worker):
    {IMAGE_XF: [28, 28, 1], LABEL_XF: [1]} per element."""
    return data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(batch_size=READ_BATCH, shuffle=False, num_epochs=1),
        schema).unbatch()


def train_batches(examples: tf.data.Dataset, batch_size: int, steps: int, max_shift: int,
                  seed: int, epoch: int, network: networks.Network = networks.CAPSNET
                  ) -> tf.data.Dataset:
    """Epoch `epoch`'s `steps` global batches for `network`: the examples shuffled (reshuffled
    every pass, as many passes as the steps need), batched, each batch shifted; all of it drawn
    from `epoch_seed(seed, epoch)` alone."""
    key = epoch_seed(seed, epoch)
    batches = (examples.shuffle(SHUFFLE_BUFFER, seed=key, reshuffle_each_iteration=True).repeat()
               .batch(batch_size, drop_remainder=True).take(steps).enumerate())
    return batches.map(  # batch `index`'s shifts: from (key, index)
        lambda index, batch: to_model_io(batch, max_shift, tf.stack([tf.constant(key, tf.int64),
                                                                     index]), network),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def valid_batches(examples: tf.data.Dataset, batch_size: int,
                  network: networks.Network = networks.CAPSNET) -> tf.data.Dataset:
    """The valid split once, in batches (the last one partial), unshifted."""
    return examples.batch(batch_size).map(lambda batch: to_model_io(batch, network=network),
                                          num_parallel_calls=tf.data.AUTOTUNE)


def distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    """`dataset`'s global batches split across the replicas of every worker: each worker reads the
    same stream and keeps its share of every batch (sharding by data, not by file), so global
    batch k holds the same examples whatever the number of workers."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


# ------------------------------------------------------------------------------ the model
class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Fails training at the first batch whose loss is NaN or infinite, naming the step.

    Keras' TerminateOnNaN only stops quietly and lets run_fn export the broken model; raising
    fails the Trainer, so the run fails and nothing downstream (Evaluator, Pusher) runs. The loss
    is the one of all replicas (`train`), so every worker stops at the same step.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0
        self._steps_done = 0  # global step count across epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps_done += 1
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at global step {self._steps_done} "
                f"(epoch {self._epoch + 1}, step {batch + 1} of the epoch); stopping the run, "
                f"nothing will be evaluated or pushed. Lower the learning rate or check the data.")


def compute_policy(mixed_precision: Optional[str]) -> Optional[str]:
    """The dtype policy to build with (`hardware.compute_policy`; None is float32), logged with
    the CPU, its bf16 support and TensorFlow's CPU runtime."""
    policy = hardware.compute_policy(mixed_precision)
    logging.info("compute: mixed_precision=%s -> %s", mixed_precision,
                 ", ".join(f"{k} {v}" for k, v in hardware.describe(policy).items()))
    return policy


def build_models(config: Recipe, steps_per_epoch: int, strategy=None):
    """(strategy, train_model, inference_model): the recipe's network built and compiled inside
    `strategy` (default: `make_strategy` of this process's TF_CONFIG) with the config's seed,
    learning-rate schedule (`schedule.optimizer_options`, epochs of `steps_per_epoch` steps),
    compute dtype and the network's own settings (the CapsNet's routings and reconstruction
    weight); the optimizer's and metrics' state built too, so that the training step creates no
    variable."""
    strategy = strategy or make_strategy(tf_config())
    network = networks.get(config.network)
    keras.utils.set_random_seed(config.seed)  # the weights (other workers get the chief's)
    with strategy.scope():
        train_model, inference_model = network.build(
            config, compute_policy(config.mixed_precision))
        network.compile(train_model, config,
                        FusedAdam(**schedule.optimizer_options(config, steps_per_epoch)))
        # The metrics' and optimizer's variables, created before any step as fit() creates
        # them, through Keras' own builder (the one fit() reaches through a reduction of the
        # first distributed batch that fails under MultiWorkerMirroredStrategy); a batch of
        # zeros gives the shapes.
        zeros = {IMAGE_XF: tf.zeros([1, features.IMAGE_SIZE, features.IMAGE_SIZE, 1]),
                 LABEL_XF: tf.zeros([1, 1], tf.int64)}
        train_model._symbolic_build(data_batch=to_model_io(zeros, network=network))
    return strategy, train_model, inference_model


def from_chief(strategy: tf.distribute.Strategy, values: List[tf.Tensor]) -> List[tf.Tensor]:
    """The chief's `values` (those of the first replica of the chief, which holds replica 0), on
    every worker: an all-reduce SUM to which every other replica adds zeros, exact in any dtype."""
    @tf.function
    def chief_values(values):
        def replica_fn(values):
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group, 0)
            return [context.all_reduce(tf.distribute.ReduceOp.SUM,  # one by one: any dtypes
                                       tf.where(first, v, tf.zeros_like(v))) for v in values]
        return strategy.run(replica_fn, args=(values,))

    return [strategy.experimental_local_results(value)[0]
            for value in chief_values([tf.convert_to_tensor(v) for v in values])]


def sync_from_chief(strategy: tf.distribute.Strategy, variables: List[tf.Variable]) -> None:
    """Every worker's `variables` take the chief's values (what the chief restored)."""
    for variable, value in zip(variables, from_chief(strategy, variables)):
        variable.assign(value)


def train(strategy: tf.distribute.Strategy, model: keras.Model,
          epoch_batches: Callable[[int], tf.data.Dataset], valid: tf.data.Dataset, epochs: int,
          initial_epoch: int, steps_per_epoch: int, callbacks: List[keras.callbacks.Callback],
          verbose: int = 2) -> Dict[str, float]:
    """Trains `model` (built and compiled under `strategy`) from `initial_epoch` to `epochs`, as
    Keras' fit(verbose=2) would, under any strategy, MultiWorkerMirroredStrategy included (whose
    fit Keras 3 cannot run): every step is Keras' own `train_step` on every replica, and the logs
    are the metrics of all replicas, so every worker sees the same numbers.

    epoch_batches(epoch): that epoch's global batches; valid: the validation batches (metrics
    `val_*` after every epoch). The callbacks get on_epoch_begin/end (with the epoch's logs:
    `loss`, `lengths_loss`, `recon_loss`, `lengths_accuracy`, their `val_` twins),
    on_train_batch_begin/end (with the running logs, `loss` included); verbose=2 prints Keras'
    progress lines ("Epoch 3/50", "550/550 - 267s - 486ms/step - loss: ... - val_..."), which
    the compact view of local runs reads; 0 prints nothing. Returns the last epoch's logs.
    """
    @tf.function
    def train_step(batch):
        strategy.run(model.train_step, args=(batch,))
        return model.get_metrics_result()  # read across replicas: the metrics of all of them

    @tf.function
    def test_step(batch):
        strategy.run(model.test_step, args=(batch,))

    metrics = tf.function(model.get_metrics_result)
    callbacks = keras.callbacks.CallbackList(callbacks, add_history=True,
                                             add_progbar=verbose != 0, verbose=verbose,
                                             epochs=epochs, steps=steps_per_epoch, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        for index, batch in enumerate(distribute(strategy, epoch_batches(epoch))):
            callbacks.on_train_batch_begin(index)
            logs = as_floats(train_step(batch))
            callbacks.on_train_batch_end(index, logs)
            if model.stop_training:
                break
        model.reset_metrics()
        for batch in distribute(strategy, valid):
            test_step(batch)
        logs = {**logs, **{f"val_{k}": v for k, v in as_floats(metrics()).items()}}
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    return logs


def as_floats(logs) -> Dict[str, float]:
    """{name: scalar tensor} -> {name: float}, as Keras callbacks get their logs."""
    return {name: float(value) for name, value in logs.items()}


# ------------------------------------------------------------------------------ what it writes
class GFiles:
    """The file operations `Resume` needs, through tf.io.gfile: local paths and gs:// alike."""

    exists = staticmethod(tf.io.gfile.exists)
    remove = staticmethod(tf.io.gfile.remove)
    listdir = staticmethod(tf.io.gfile.listdir)
    makedirs = staticmethod(tf.io.gfile.makedirs)

    @staticmethod
    def rename(src, dst):
        tf.io.gfile.rename(src, dst, overwrite=True)

    @staticmethod
    def read_text(path):
        with tf.io.gfile.GFile(path) as f:
            return f.read()

    @staticmethod
    def write_text(path, text):
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)


def warm_start(inference_model, base_model_dir: Optional[str],
               network: networks.Network = networks.CAPSNET) -> str:
    """Loads the weights of the base model (the latest blessed one, from its exported Keras
    model) into `inference_model`, which shares every weight with the training model; says what
    it did. base_model_dir: the base model's serving dir, None when there is none."""
    if not base_model_dir:
        return "no base model (warm start off, or no blessed model yet): training from scratch"
    path = os.path.join(base_model_dir, network.keras_file)
    inference_model.set_weights(keras.saving.load_model(path).get_weights())
    return f"warm start from the weights of {path}"


def run_fingerprint(fn_args) -> str:
    """SHA-256 of what this Trainer execution trains: its input files and Transform graph (by
    artifact URI: a re-run on cached upstream outputs sees the same ones), its custom_config (the
    recipe and the code fingerprint of models/) and its step count."""
    what = {"train": list(fn_args.train_files), "eval": list(fn_args.eval_files),
            "transform": fn_args.transform_output, "custom_config": fn_args.custom_config,
            "train_steps": fn_args.train_steps, "base_model": fn_args.base_model}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def resume_dir(fn_args, fingerprint: str) -> str:
    """<pipeline root>/Trainer/resume/<fingerprint>: where a re-run of the same Trainer inputs
    finds the checkpoint, whatever its run's or execution's id (create_pipeline passes the
    resume root in custom_config; Vertex, unlike the local runner, puts outputs under a
    per-job directory)."""
    return f"{fn_args.custom_config['resume_root'].rstrip('/')}/{fingerprint[:16]}"


@contextlib.contextmanager
def write_dirs(chief: bool, **dirs: str):
    """{name: dir}: the given dirs on the chief; elsewhere, each a fresh temporary dir, removed
    on leaving, whatever happened (the other workers' writes are thrown away)."""
    if chief:
        yield dirs
        return
    scratch = tempfile.mkdtemp(prefix="capsnet-worker-")
    try:
        yield {name: os.path.join(scratch, name) for name in dirs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of the model's weights (float bytes, in order): equal on workers in sync."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (GenericExecutor), in every worker of the cluster."""
    cluster = tf_config()
    strategy = make_strategy(cluster)  # first: multi-worker collectives need it before any op
    chief, worker = is_chief(cluster), f"worker {cluster.get('task', {}).get('index', 0)}"
    config = Recipe.from_custom_config(fn_args.custom_config)
    network = networks.get(config.network)
    logging.info("%s training with Keras %s (%s backend): %s", network.name,
                 keras.__version__, keras.backend.backend(), config)
    tft_output = tft.TFTransformOutput(fn_args.transform_output)
    schema = tft_output.transformed_metadata.schema
    steps_per_epoch = math.ceil(fn_args.train_steps / config.epochs)
    examples = read_examples(fn_args.train_files, fn_args.data_accessor, schema)
    valid = valid_batches(read_examples(fn_args.eval_files, fn_args.data_accessor, schema),
                          config.batch_size, network)

    _, train_model, inference_model = build_models(config, steps_per_epoch, strategy)
    fingerprint = run_fingerprint(fn_args)
    with write_dirs(chief, serving=fn_args.serving_model_dir, tensorboard=fn_args.model_run_dir,
                    resume=resume_dir(fn_args, fingerprint)) as out:
        resume = Resume(out["resume"], fingerprint, config.epochs, fs=GFiles)
        started = warm_start(inference_model, fn_args.base_model, network)  # every worker
        initial_epoch, resumed = resume.restore(train_model) if chief else (0, "")
        # The chief's restored state is everyone's (the others have no checkpoint to read).
        sync_from_chief(strategy, train_model.weights + train_model.optimizer.variables)
        initial_epoch = int(from_chief(strategy, [tf.constant(initial_epoch)])[0])
        if chief:
            logging.info("Trainer: %s", started)
            logging.info("Trainer: %s", resumed)
        logging.info("%s (%s) starts at epoch %d of %d", worker,
                     "the chief" if chief else "not the chief", initial_epoch + 1, config.epochs)

        train(strategy, train_model,
              lambda epoch: train_batches(examples, config.batch_size, steps_per_epoch,
                                          config.max_shift, config.seed, epoch, network),
              valid, config.epochs, initial_epoch, steps_per_epoch,
              callbacks=[
                  StopOnNonFiniteLoss(),
                  progress.ProgressLog(steps_per_epoch, config.epochs, config.batch_size),
                  keras.callbacks.TensorBoard(log_dir=out["tensorboard"], update_freq="epoch"),
                  resume,  # after every epoch: a checkpoint a re-run resumes from
              ])
        with schedule.averaged_weights(train_model):  # the exported model carries the averages
            logging.info("%s weights sha256 %s", worker, weights_digest(train_model))
            # The serving graph computes in float32 unless asked otherwise, whatever training
            # used: a graph of bf16 ops crawls where bf16 is emulated, and the serving host is
            # rarely this one.
            serving_model = networks.with_dtype_policy(network, config, inference_model,
                                                       config.serving_policy())
            serving.export_serving_model(
                serving_model, tft_output, out["serving"],
                trained_with={**hardware.describe(networks.policy_of(train_model)),
                              "start": resumed,
                              "workers": cluster_size(cluster),
                              "replicas": strategy.num_replicas_in_sync})
        resume.remove()  # the model is exported: nothing left to resume
    # The others leave once the chief's export is complete (TFX checks that it exists).
    from_chief(strategy, [tf.constant(0)])
