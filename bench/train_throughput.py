"""Throughput of what the Trainer and the serving signature really run, on the real MNIST.

  python -m bench.train_throughput --mode train [--steps 10] [--warmup 3] [--batch-size 100]
      [--network cnn]
      The Trainer's training step: `models.trainer.build_models` (the same MirroredStrategy, model,
      losses and Adam as run_fn) fed by `models.trainer.train_batches` (tfxio parsing of
      transformed tf.Examples, shuffling, batching, ±max_shift px random shifts, prefetch) through
      the Trainer's loop (`models.trainer.train`), with the Trainer's NaN guard. The transformed
      examples are the first --examples MNIST training images written as Transform writes them
      (gzipped TFRecords, image_xf float [28,28,1], label_xf).
  python -m bench.train_throughput --mode input
      The same dataset, iterated alone: the input pipeline's ceiling.
  python -m bench.train_throughput --mode digitcaps [--chunks N] [--forward-only] [--jit-compile]
      DigitCaps alone (u_hat + dynamic routing), forward and backward, on random capsules:
      the part of the step this project's layout work targets. --chunks routes over N chunks of
      children instead of the count the layer chooses for the batch (the chunk-size sweep of
      docs/results.md); --forward-only times the forward alone (as serving runs it);
      --jit-compile compiles the timed step with XLA (TensorFlow's jit_compile).
  python -m bench.train_throughput --mode primarycaps [--forward-only]
      PrimaryCaps' convolution alone (94 % of the FLOPs), forward and both gradients, on random
      inputs: as the model runs it (`models.capsnet.kernels.conv2d_valid` where
      `use_fast_path` says so), then (reported under
      "backend_gradient") the backend's own convolution and autodiff, for comparison; then
      (under "gradients") each gradient alone (median ms): the input's as col2im, as the
      backend's transposed convolution (`conv2d_valid`'s two forms) and by autodiff; the
      kernel's as the model runs it and by autodiff: which form wins, gradient by gradient,
      on this machine.
      --forward-only times the forward convolution alone (the same op on both paths).
  python -m bench.train_throughput --mode matmul
      The ceiling for --mode primarycaps on this machine: the convolution's three GEMMs
      (forward [36B, 20736] x [20736, 256], input gradient [36B, 256] x [256, 20736], kernel
      gradient [20736, 36B] x [36B, 256], B = --batch-size) each timed as one plain matmul in the
      compute dtype, on random inputs; the per-step figures are their sum, and "gemms" gives
      each GEMM's median ms and GFLOP/s.
  python -m bench.train_throughput --mode serve [--model DIR]
      The exported `serving_images` signature (uint8 pixels -> Transform graph -> CapsNet) on
      batches of MNIST test images. DIR is a Trainer's `Format-Serving` dir or a pushed version;
      without --model an untrained CapsNet is exported first, with a Transform graph built from
      `models.preprocessing.preprocessing_fn` by tf.Transform on Beam (about 20 s more).

Each run does --warmup untimed steps (tracing, buffers), then --steps timed ones, and prints ONE
JSON line on stdout: images_per_s (timed images / timed wall time), ms per step (mean, median,
min), batch, device, TF/Keras versions, model FLOPs per image and the GFLOP/s they imply. The
machine is shared and timings swing: compare runs taken alternately, and quote medians.

Flags that must act before TensorFlow starts (the script imports TF only after parsing them):
  --cpu-replicas N   N logical CPU devices, so MirroredStrategy trains N replicas on the CPU
  --workers N        train: N processes of this script on 127.0.0.1, one TF_CONFIG each
                     (components/multi_worker_trainer.py's cluster), training under
                     MultiWorkerMirroredStrategy as the Trainer does with --trainer-workers N
                     (the same launcher, components.multi_worker_trainer.run_workers); --batch-size
                     stays the global batch; the JSON line is worker 0's (the chief), the
                     others' lines come after a "worker <i>: " prefix
  --tf-defaults      TensorFlow's default CPU runtime, instead of the one
                     models.capsnet.hardware chooses for --mixed-precision on this CPU (what
                     local_runner.py runs with); see docs/results.md
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

from models.capsnet import recipe  # light: no TensorFlow
from models.capsnet.recipe import Recipe, default_recipe

MODES = ("train", "input", "serve", "digitcaps", "primarycaps", "matmul")


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="train", help="what to time (default: train)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first; at least 1, the first step traces (default: 3)")
    p.add_argument("--examples", type=int, default=5000,
                   help="train/input: distinct MNIST training images in the dataset, repeated "
                        "(default: 5000)")
    p.add_argument("--chunks", type=int,
                   help="digitcaps: chunks of children to route over (default: the layer's "
                        "choice for the batch, models.capsnet.kernels._chunk_count)")
    p.add_argument("--forward-only", action="store_true",
                   help="digitcaps/primarycaps: time the forward alone (default: forward and "
                        "backward)")
    p.add_argument("--jit-compile", action="store_true",
                   help="digitcaps: compile the timed step with XLA (default: off, as the "
                        "model runs)")
    p.add_argument("--model", help="serve: exported SavedModel dir (default: export a fresh, "
                                   "untrained model with a tf.Transform graph to a temp dir)")
    p.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into N logical devices before TF starts (default: off)")
    p.add_argument("--workers", type=int, default=1,
                   help="train: N worker processes under MultiWorkerMirroredStrategy (default: 1)")
    p.add_argument("--tf-defaults", action="store_true",
                   help="TensorFlow's default CPU runtime (default: the one local_runner.py "
                        "chooses, models.capsnet.hardware.apply_tf_env)")
    p.add_argument("--data-path", help="MNIST source, as local_runner.py --data-path")
    p.add_argument("--data-cache-dir", help="MNIST cache dir, as local_runner.py --data-cache-dir")
    recipe.add_flags(p, Recipe(), title="the recipe timed (models/capsnet/recipe.py; defaults: "
                     "the network's own, those shown are the CapsNet's): --batch-size is the "
                     "timed batch, --network (train, input, serve) the network; train and input "
                     "shift by --max-shift, the CapsNet routes --routings times, and the modes "
                     "compute in --mixed-precision (serve: --serving-precision)")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.recipe = dataclasses.replace(default_recipe(args.network or "capsnet"),
                                          **recipe.flag_values(args))
    except ValueError as e:
        p.error(str(e))
    # What the modes read, from the recipe.
    args.batch, args.max_shift, args.routings = (args.recipe.batch_size, args.recipe.max_shift,
                                                 args.recipe.routings)
    args.mixed_precision = args.recipe.mixed_precision
    args.serving_precision = args.recipe.serving_precision
    if args.recipe.network != "capsnet" and args.mode not in ("train", "input", "serve"):
        p.error(f"--mode {args.mode} times a part of the CapsNet; --network "
                f"{args.recipe.network} is for --mode train, input and serve")
    if args.cpu_replicas < 0:
        p.error("--cpu-replicas must be >= 0")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.workers > 1 and args.mode != "train":
        p.error("--workers is for --mode train")
    if args.model and args.mode != "serve":
        p.error("--model is for --mode serve")
    if args.chunks is not None and args.mode != "digitcaps":
        p.error("--chunks is for --mode digitcaps")
    if args.jit_compile and args.mode != "digitcaps":
        p.error("--jit-compile is for --mode digitcaps")
    if args.forward_only and args.mode not in ("digitcaps", "primarycaps"):
        p.error("--forward-only is for --mode digitcaps and --mode primarycaps")
    if args.chunks is not None and args.chunks < 1:
        p.error("--chunks must be >= 1")
    return args


# --------------------------------------------------------------------------------- model FLOPs

def cnn_flops_per_image():
    """FLOPs (2 x multiply-adds) per 28x28 image of the baseline CNN (models/cnn): three 5x5
    SAME convolutions on the 28x28 grid and three dense layers, 3.9 GFLOP forward.

    forward   conv1 + conv2 + conv3 + fc1 + fc2 + fc3
    serve     the forward
    train     3 x forward, less conv1's input gradient (never needed)
    """
    conv1, conv2, conv3 = (28 * 28 * c_out * 25 * c_in
                           for c_in, c_out in ((1, 256), (256, 256), (256, 128)))
    dense = 28 * 28 * 128 * 328 + 328 * 192 + 192 * 10
    forward = conv1 + conv2 + conv3 + dense
    return {"forward": 2 * forward, "serve": 2 * forward, "train": 2 * (3 * forward - conv1)}


def flops_per_image(config: Recipe) -> dict:
    """The FLOPs per image of the recipe's network."""
    return (capsnet_flops_per_image(config.routings) if config.network == "capsnet"
            else cnn_flops_per_image())


def capsnet_flops_per_image(routings=3):
    """FLOPs (2 x multiply-adds) per 28x28 image, capsnet-spec.md section 11.

    forward   conv1 + PrimaryCaps + u_hat + routing (routings weighted sums, routings - 1
              agreements) + decoder = 406.4 MFLOP at 3 routings
    serve     forward without the decoder (the signatures return the lengths only)
    train     3 x forward, less conv1's input gradient (never needed) = 1.20 GFLOP
    digitcaps u_hat + routing, forward and backward (3 x forward; a third with --forward-only)
    primarycaps  the PrimaryCaps convolution, forward, input and kernel gradients (3 x forward;
              a third with --forward-only)
    """
    conv1 = 20 * 20 * 256 * (9 * 9 * 1)
    primary = 6 * 6 * 256 * (9 * 9 * 256)
    u_hat = 1152 * 160 * 8
    routing = (2 * routings - 1) * 1152 * 160
    decoder = 160 * 512 + 512 * 1024 + 1024 * 784
    forward = conv1 + primary + u_hat + routing + decoder
    return {"forward": 2 * forward, "serve": 2 * (forward - decoder),
            "train": 2 * (3 * forward - conv1), "digitcaps": 2 * 3 * (u_hat + routing),
            "primarycaps": 2 * 3 * primary}


# ------------------------------------------------------------------------------------- helpers

def device_description():
    import tensorflow as tf
    from models.capsnet import hardware
    cpu = hardware.this_cpu()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    desc = f"CPU {cpu.model} x{os.cpu_count()}"
    return desc + (f" + GPU {', '.join(gpus)}" if gpus else "")


def write_transformed_examples(images, labels, path):
    """float [n,28,28] in [0,1] + labels -> one gzipped TFRecord of tf.Examples as Transform
    writes them: image_xf float_list (784 values), label_xf int64_list (1 value)."""
    import tensorflow as tf
    from models import features
    image_key = features.transformed_name(features.IMAGE_KEY)
    label_key = features.transformed_name(features.LABEL_KEY)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for image, label in zip(images, labels):
            example = tf.train.Example(features=tf.train.Features(feature={
                image_key: tf.train.Feature(float_list=tf.train.FloatList(value=image.ravel())),
                label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())


def transformed_schema():
    """The schema Transform writes for its outputs (transformed_metadata/schema.pbtxt)."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2
    from models import features
    return text_format.Parse(f"""
        feature {{ name: "{features.transformed_name(features.IMAGE_KEY)}" type: FLOAT
                  presence {{ min_fraction: 1.0 }}
                  shape {{ dim {{ size: 28 }} dim {{ size: 28 }} dim {{ size: 1 }} }} }}
        feature {{ name: "{features.transformed_name(features.LABEL_KEY)}" type: INT
                  presence {{ min_fraction: 1.0 }} shape {{ }} }}
    """, schema_pb2.Schema())


def trainer_dataset(args, mnist, work_dir):
    """The Trainer's first epoch of training batches (models.trainer.read_examples,
    train_batches) over transformed examples of the first --examples images, read through tfxio
    exactly as the Trainer's DataAccessor does."""
    import types
    from tfx_bsl.public import tfxio
    from models import networks, trainer
    n = min(args.examples, len(mnist.x_train))
    path = os.path.join(work_dir, "transformed_examples-00000-of-00001.gz")
    write_transformed_examples(mnist.x_train[:n].astype("float32") / 255.0, mnist.y_train[:n], path)
    accessor = types.SimpleNamespace(
        tf_dataset_factory=lambda pattern, options, schema:
            tfxio.TFExampleRecord(pattern, schema=schema).TensorFlowDataset(options))
    examples = trainer.read_examples(path, accessor, transformed_schema())
    return trainer.train_batches(examples, args.batch, args.warmup + args.steps, args.max_shift,
                                 seed=0, epoch=0, network=networks.get(args.recipe.network))


class Clock:
    """Marks step ends: wall time, and this process's CPU time (all threads, user + system)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def mark(self):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, batch, first=0):
        """Timing of the steps between mark `first` and the last mark."""
        wall, cpu = self.wall[first:], self.cpu[first:]
        steps = len(wall) - 1
        ms = [(b - a) * 1000.0 for a, b in zip(wall, wall[1:])]
        return {
            "images_per_s": round(batch * steps / (wall[-1] - wall[0]), 2),
            "ms_per_step": round(sum(ms) / steps, 1),
            "ms_per_step_median": round(statistics.median(ms), 1),
            "ms_per_step_min": round(min(ms), 1),
            # CPU seconds per step: on a shared machine, far steadier than wall time.
            "cpu_ms_per_step": round((cpu[-1] - cpu[0]) * 1000.0 / steps, 1),
        }


def time_steps(step, args):
    """--warmup untimed calls of step(), then --steps timed ones; Clock.summary of those."""
    for _ in range(args.warmup):
        step()[0].numpy()
    clock = Clock()
    clock.mark()
    for _ in range(args.steps):
        step()[0].numpy()
        clock.mark()
    return clock.summary(args.batch)


# --------------------------------------------------------------------------------------- modes

def bench_train(args, mnist, work_dir):
    import keras
    from models import networks, trainer

    cluster = trainer.tf_config()
    strategy = trainer.make_strategy(cluster)  # first: multi-worker collectives need it
    dataset = trainer_dataset(args, mnist, work_dir)
    config = dataclasses.replace(args.recipe, epochs=1)
    _, train_model, _ = trainer.build_models(config, args.warmup + args.steps, strategy)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.clock, self.losses = Clock(), []

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))  # syncs: the step has finished
            self.clock.mark()

    timer = StepTimer()
    trainer.train(strategy, train_model, lambda epoch: dataset, dataset.take(1), epochs=1,
                  initial_epoch=0, steps_per_epoch=args.warmup + args.steps, verbose=0,
                  callbacks=[trainer.StopOnNonFiniteLoss(), timer])
    result = timer.clock.summary(args.batch, first=args.warmup - 1)
    result.update(workers=trainer.cluster_size(cluster), replicas=strategy.num_replicas_in_sync,
                  network=config.network,
                  compute_dtype=train_model.get_layer(networks.FIRST_LAYER).compute_dtype,
                  loss_first=round(timer.losses[0], 5), loss_last=round(timer.losses[-1], 5))
    return result, flops_per_image(config)["train"]


def bench_input(args, mnist, work_dir):
    from models.capsnet.model import IMAGE
    dataset = trainer_dataset(args, mnist, work_dir)
    it = iter(dataset)
    for _ in range(args.warmup):
        next(it)
    clock = Clock()
    clock.mark()
    for _ in range(args.steps):
        inputs, _ = next(it)
        (inputs[IMAGE] if isinstance(inputs, dict) else inputs).numpy()  # the CNN's: the image
        clock.mark()
    return clock.summary(args.batch), None


def bench_digitcaps(args, mnist, work_dir):
    import numpy as np
    import tensorflow as tf
    from models.capsnet import kernels
    from models.capsnet.layers import SQUASH_EPS, DigitCaps, squash

    rng = np.random.default_rng(0)
    dtype = compute_dtype(args)
    u = tf.cast(squash(rng.normal(size=(args.batch, 1152, 8)).astype("float32")), dtype)
    probe = tf.constant(rng.normal(size=(args.batch, 10, 16)).astype("float32"))
    layer = DigitCaps(routings=args.routings, dtype=compute_policy(args))
    layer.build(u.shape)

    def digit_caps(u):
        if args.chunks is None:
            return layer(u)
        return kernels.predict_and_route(
            tf.cast(u, "float32"), kernels.read(layer.kernel, "float32"), layer.n_caps,
            layer.dim, layer.routings, layer.stop_gradient_routing, SQUASH_EPS,
            n_chunks=args.chunks)

    @tf.function(jit_compile=args.jit_compile)
    def step():
        if args.forward_only:
            return digit_caps(u)
        with tf.GradientTape() as tape:
            tape.watch(u)
            loss = tf.reduce_sum(digit_caps(u) * probe)
        return tape.gradient(loss, [u, layer.kernel.value])

    flops = capsnet_flops_per_image(args.routings)["digitcaps"]
    return time_steps(step, args), flops // 3 if args.forward_only else flops


def bench_primarycaps(args, mnist, work_dir):
    import numpy as np
    import tensorflow as tf
    from keras import ops
    from models.capsnet import kernels

    rng = np.random.default_rng(0)
    dtype = compute_dtype(args)
    x = tf.cast(rng.normal(size=(args.batch, 20, 20, 256)).astype("float32"), dtype)
    kernel = tf.cast(rng.normal(scale=0.01, size=(9, 9, 256, 256)).astype("float32"), dtype)
    probe = tf.constant(rng.normal(size=(args.batch, 6, 6, 256)).astype("float32"))

    def gradients(conv, *wrt, forward=True):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(wrt)
                loss = tf.reduce_sum(tf.cast(conv(x, kernel), "float32") * probe)
            grads = tape.gradient(loss, list(wrt))
            # Fetching the loss keeps the forward; the gradients alone do not need it, and
            # without it (forward=False) the forward and any gradient not asked are pruned.
            return [loss, *grads] if forward else grads
        return step

    def backend_conv(x, k):  # also the model's forward, on either path
        return ops.conv(x, k, strides=2)

    def as_the_model_runs_it(x, k):
        if kernels.use_fast_path("conv_backward", dtype):
            return kernels.conv2d_valid(x, k, 2)
        return backend_conv(x, k)

    flops = capsnet_flops_per_image(args.routings)["primarycaps"]
    if args.forward_only:
        return time_steps(tf.function(lambda: [backend_conv(x, kernel)]), args), flops // 3

    result = time_steps(gradients(as_the_model_runs_it, x, kernel), args)
    backend = time_steps(gradients(backend_conv, x, kernel), args)
    result["backend_gradient"] = {key: backend[key] for key in
                                  ("images_per_s", "ms_per_step_median", "cpu_ms_per_step")}
    input_forms = {  # the input gradient's two written-out forms, whatever the chooser says
        "col2im": lambda x, k: kernels.conv2d_valid(x, k, 2, col2im=True),
        "transposed": lambda x, k: kernels.conv2d_valid(x, k, 2, col2im=False),
        "backend": backend_conv}
    kernel_forms = {"model": as_the_model_runs_it, "backend": backend_conv}
    result["gradients"] = {
        name: {form: time_steps(gradients(conv, wrt, forward=False), args)["ms_per_step_median"]
               for form, conv in forms.items()}
        for name, wrt, forms in (("input", x, input_forms), ("kernel", kernel, kernel_forms))}
    return result, flops


def primarycaps_gemms(batch):
    """{name: (m, k, n)} of the PrimaryCaps convolution's GEMMs in im2col form, for a batch:
    36 output pixels an image, 9 x 9 x 256 taps a patch, 256 filters."""
    rows, taps, filters = 36 * batch, 9 * 9 * 256, 256
    return {"forward": (rows, taps, filters), "input_gradient": (rows, filters, taps),
            "kernel_gradient": (taps, rows, filters)}


def bench_matmul(args, mnist, work_dir):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    dtype = compute_dtype(args)
    gemms, total = {}, {}
    for name, (m, k, n) in primarycaps_gemms(args.batch).items():
        a = tf.cast(rng.normal(size=(m, k)).astype("float32"), dtype)
        b = tf.cast(rng.normal(scale=0.01, size=(k, n)).astype("float32"), dtype)
        # One element of the product is fetched: the whole product is computed, not copied.
        timed = time_steps(tf.function(lambda: [tf.matmul(a, b)[0, 0]]), args)
        gemms[name] = {"shape": [m, k, n], "ms_per_step_median": timed["ms_per_step_median"],
                       "gflop_per_s": round(2 * m * k * n / timed["ms_per_step_median"] / 1e6, 1)}
        for key in ("ms_per_step", "ms_per_step_median", "ms_per_step_min", "cpu_ms_per_step"):
            total[key] = round(total.get(key, 0.0) + timed[key], 1)
    result = {"images_per_s": round(args.batch * 1000.0 / total["ms_per_step_median"], 2),
              **total, "gemms": gemms}
    return result, capsnet_flops_per_image(args.routings)["primarycaps"]


def compute_policy(args):
    """The Keras dtype policy --mixed-precision resolves to here (None: float32)."""
    from models.capsnet import hardware
    return hardware.compute_policy(args.mixed_precision)


def compute_dtype(args):
    """The compute dtype of `compute_policy`: 'float32', 'bfloat16' or 'float16'."""
    from models.capsnet import hardware
    return hardware.describe(compute_policy(args))["compute_dtype"]


def export_fresh_model(work_dir, config: Recipe):
    """An untrained model of the recipe's network, in its serving precision, exported by
    models.serving with a real Transform graph; its dir."""
    import apache_beam as beam
    import numpy as np
    import tensorflow as tf
    import tensorflow_transform.beam as tft_beam
    import tensorflow_transform as tft
    from apache_beam.options.pipeline_options import PipelineOptions
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io, schema_utils

    from models import features, networks, preprocessing, serving
    from pipeline import configs

    raw_spec = {features.IMAGE_KEY: tf.io.FixedLenFeature([1], tf.string),
                features.LABEL_KEY: tf.io.FixedLenFeature([1], tf.int64)}
    raw_metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_spec))
    transform_dir = os.path.join(work_dir, "transform_graph")
    example = {features.IMAGE_KEY: np.array([bytes(features.NUM_PIXELS)], dtype=object),
               features.LABEL_KEY: np.array([0], dtype=np.int64)}
    with beam.Pipeline(options=PipelineOptions(list(configs.LOCAL_BEAM_ARGS))) as p:
        with tft_beam.Context(temp_dir=os.path.join(work_dir, "tft_tmp")):
            transform_fn = ((p | beam.Create([example]), raw_metadata)
                            | tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn))
            _ = transform_fn | tft_beam.WriteTransformFn(transform_dir)
    metadata_io.write_metadata(raw_metadata,
                               os.path.join(transform_dir, tft.TFTransformOutput.RAW_METADATA_DIR))
    _, inference_model = networks.get(config.network).build(config, config.serving_policy())
    model_dir = os.path.join(work_dir, "serving_model")
    serving.export_serving_model(inference_model, tft.TFTransformOutput(transform_dir), model_dir)
    return model_dir


def bench_serve(args, mnist, work_dir):
    import tensorflow as tf
    from models import features, serving

    model_dir = args.model or export_fresh_model(work_dir, args.recipe)
    signature = tf.saved_model.load(model_dir).signatures[serving.IMAGES_SIGNATURE]
    n_batches = max(1, len(mnist.x_test) // args.batch)
    batches = [tf.constant(mnist.x_test[i * args.batch:(i + 1) * args.batch])
               for i in range(min(n_batches, args.warmup + args.steps))]
    for i in range(args.warmup):
        signature(images=batches[i % len(batches)])[features.SCORES].numpy()
    clock = Clock()
    clock.mark()
    for i in range(args.steps):
        signature(images=batches[(args.warmup + i) % len(batches)])[features.SCORES].numpy()
        clock.mark()
    result = clock.summary(args.batch)
    with open(os.path.join(model_dir, "assets.extra", serving.MODEL_INFO_FILE)) as f:
        serving_dtype = json.load(f).get("serving_compute_dtype", "float32")  # older exports
    result.update(model=args.model or "fresh untrained export", signature=serving.IMAGES_SIGNATURE,
                  compute_dtype=serving_dtype)
    return result, flops_per_image(args.recipe)["serve"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.workers > 1 and "TF_CONFIG" not in os.environ:
        # The Trainer's own local cluster: worker 0's output as is, the others' prefixed.
        from components import multi_worker_trainer
        multi_worker_trainer.run_workers(
            [sys.executable, "-m", "bench.train_throughput", *argv], args.workers)
        return 0
    from models.capsnet import hardware  # before TensorFlow loads
    from pipeline import tf_runtime

    if not args.tf_defaults:
        hardware.apply_tf_env(args.mixed_precision)
    if args.cpu_replicas:
        tf_runtime.configure_cpu_replicas(args.cpu_replicas)
    import keras
    import tensorflow as tf

    from data import mnist as mnist_data

    mnist, _ = mnist_data.load(args.data_path, args.data_cache_dir, allow_network=False)
    bench = {"train": bench_train, "input": bench_input, "serve": bench_serve,
             "digitcaps": bench_digitcaps, "primarycaps": bench_primarycaps,
             "matmul": bench_matmul}[args.mode]
    with tempfile.TemporaryDirectory(prefix="capsnet_bench_") as work_dir:
        result, flops = bench(args, mnist, work_dir)
    out = {"mode": args.mode, **result, "batch": args.batch, "steps": args.steps,
           "warmup": args.warmup}
    if flops:
        out.update(flops_per_image=flops,
                   gflop_per_s=round(flops * result["images_per_s"] / 1e9, 1))
    out.update(device=device_description(), tf_version=tf.__version__,
               keras_version=keras.__version__, keras_backend=keras.backend.backend(),
               tf_env={key: os.environ.get(key) for key in hardware.TF_ENV_KEYS})
    # The CPU, its bf16 support, the runtime; the mode's own compute_dtype where it has one.
    described = hardware.describe(None if args.mode == "input" else compute_policy(args))
    out.update({key: value for key, value in described.items() if key not in out})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
