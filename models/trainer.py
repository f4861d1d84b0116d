"""TFX Trainer module: thin glue between TFX and `models.capsnet`.

`run_fn` reads the Transform output, builds and compiles the CapsNet inside
`tf.distribute.MirroredStrategy()` (every visible GPU; the CPU when there is none), trains on the
`train` split with per-epoch metrics on `valid`, writes TensorBoard logs to the model run dir and
exports the serving SavedModel (see `models.serving`). The test split is never read here.
"""

import hashlib
import json
import math
import os
from typing import Dict, Optional

import keras
import tensorflow as tf
import tensorflow_transform as tft
from absl import logging
from tfx_bsl.public import tfxio

from models import features, serving
from models.optimizers import FusedAdam
from models.capsnet import augment, build_capsnet, compile_capsnet, hardware
from models.capsnet.model import (IMAGE, KERAS_MODEL_FILE, LABEL, LENGTHS, RECON, policy_of,
                                  with_dtype_policy)
from models.capsnet.recipe import Recipe
from models.capsnet.resume import Resume

IMAGE_XF = features.transformed_name(features.IMAGE_KEY)
LABEL_XF = features.transformed_name(features.LABEL_KEY)


def random_shift(images: tf.Tensor, max_shift: int) -> tf.Tensor:
    """Each image moved by its own random integer (dy, dx) in [-max_shift, max_shift], zero fill
    (`augment.shift`): [B, 28, 28, C] -> [B, 28, 28, C]."""
    if max_shift == 0:
        return images
    offsets = tf.random.uniform([2, tf.shape(images)[0]], 0, 2 * max_shift + 1, dtype=tf.int32)
    return augment.shift(images, offsets, max_shift)


def to_model_io(batch: Dict[str, tf.Tensor], max_shift: int):
    """Transformed features -> (inputs, targets) for the CapsNet training model.

    inputs {'image': [B,28,28,1], 'label': one-hot [B,10]}; targets {'lengths': one-hot [B,10],
    'recon': the (shifted) image flattened [B,784]}: the decoder reconstructs what it was shown.
    """
    images = random_shift(batch[IMAGE_XF], max_shift)
    onehot = tf.one_hot(tf.reshape(batch[LABEL_XF], [-1]), features.NUM_CLASSES)
    flat = tf.reshape(images, [-1, features.NUM_PIXELS])
    return {IMAGE: images, LABEL: onehot}, {LENGTHS: onehot, RECON: flat}


def make_dataset(file_pattern, data_accessor, schema, batch_size: int, train: bool,
                 max_shift: int) -> tf.data.Dataset:
    """Batched model inputs from transformed examples; train: shuffled, repeated, augmented."""
    dataset = data_accessor.tf_dataset_factory(
        file_pattern,
        tfxio.TensorFlowDatasetOptions(batch_size=batch_size, shuffle=train,
                                       num_epochs=None if train else 1),
        schema)
    shift = max_shift if train else 0
    return dataset.map(lambda batch: to_model_io(batch, shift),
                       num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Fails training at the first batch whose loss is NaN or infinite, naming the step.

    Keras' TerminateOnNaN only stops quietly and lets run_fn export the broken model; raising
    fails the Trainer, so the run fails and nothing downstream (Evaluator, Pusher) runs.
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


def build_models(config: Recipe):
    """(strategy, train_model, inference_model): the CapsNet built and compiled inside
    `tf.distribute.MirroredStrategy()` (every visible GPU; the CPU, or its logical devices, when
    there is none), with the config's routings, learning rate and compute dtype."""
    strategy = tf.distribute.MirroredStrategy()
    logging.info("MirroredStrategy with %d replica(s)", strategy.num_replicas_in_sync)
    with strategy.scope():
        train_model, inference_model = build_capsnet(
            routings=config.routings, dtype_policy=compute_policy(config.mixed_precision))
        compile_capsnet(train_model, optimizer=FusedAdam(learning_rate=config.learning_rate))
    return strategy, train_model, inference_model


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


def warm_start(inference_model, base_model_dir: Optional[str]) -> str:
    """Loads the weights of the base model (the latest blessed one, from its exported Keras
    model) into `inference_model`, which shares every weight with the training model; says what
    it did. base_model_dir: the base model's serving dir, None when there is none."""
    if not base_model_dir:
        return "no base model (warm start off, or no blessed model yet): training from scratch"
    path = os.path.join(base_model_dir, KERAS_MODEL_FILE)
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


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (GenericExecutor)."""
    config = Recipe.from_custom_config(fn_args.custom_config)
    logging.info("CapsNet training with Keras %s (%s backend): %s",
                 keras.__version__, keras.backend.backend(), config)
    tft_output = tft.TFTransformOutput(fn_args.transform_output)
    schema = tft_output.transformed_metadata.schema
    train_ds = make_dataset(fn_args.train_files, fn_args.data_accessor, schema,
                            config.batch_size, train=True, max_shift=config.max_shift)
    valid_ds = make_dataset(fn_args.eval_files, fn_args.data_accessor, schema,
                            config.batch_size, train=False, max_shift=0)

    strategy, train_model, inference_model = build_models(config)
    logging.info("Trainer: %s", warm_start(inference_model, fn_args.base_model))
    fingerprint = run_fingerprint(fn_args)
    resume = Resume(resume_dir(fn_args, fingerprint), fingerprint, config.epochs, fs=GFiles)
    with strategy.scope():  # restoring builds the optimizer's (mirrored) variables
        initial_epoch, resumed = resume.restore(train_model)
    logging.info("Trainer: %s", resumed)

    train_model.fit(
        train_ds,
        epochs=config.epochs,
        initial_epoch=initial_epoch,  # the learning rate and TensorBoard's epochs continue
        steps_per_epoch=math.ceil(fn_args.train_steps / config.epochs),
        validation_data=valid_ds,  # finite: one full pass over the valid split per epoch
        callbacks=[
            StopOnNonFiniteLoss(),
            keras.callbacks.LearningRateScheduler(config.learning_rate_at),
            keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, update_freq="epoch"),
            resume,  # after every epoch: a checkpoint a re-run resumes from
        ],
        verbose=2)
    # The serving graph computes in float32 unless asked otherwise, whatever training used: a
    # graph of bf16 ops crawls where bf16 is emulated, and the serving host is rarely this one.
    serving_model = with_dtype_policy(inference_model, config.routings, config.serving_policy())
    serving.export_serving_model(serving_model, tft_output, fn_args.serving_model_dir,
                                 trained_with={**hardware.describe(policy_of(train_model)),
                                               "start": resumed})
    resume.remove()  # the model is exported: nothing left to resume
