"""Runs the CapsNet MNIST pipeline on this machine: LocalDagRunner, SQLite ML Metadata, Beam's
FnApiRunner. `python local_runner.py --help` lists every flag; `make run ARGS=...` passes flags.

Outputs (under --output-dir unless set one by one):
  pipeline root   <output-dir>/pipeline_root/<Component>/<output>/<execution id>/
  metadata        <output-dir>/metadata.sqlite
  pushed models   <output-dir>/serving_model/<version>/
  run logs        <output-dir>/logs/run-<UTC time>-<pid>.log (all of it; the terminal shows a
                  compact view unless --verbose)
"""

import argparse
import logging
import os
import sys
import time


def parse_args(argv):
    from models.capsnet import hardware, recipe  # light: no TensorFlow
    from pipeline import configs

    defaults = configs.RunConfig().recipe
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=sorted(configs.PRESETS),
                   help="named recipe (pipeline/configs.py): 'smoke' (~3.5k examples, 40 steps, "
                        "minutes; not blessed), 'seed' (the seed project's 50-epoch recipe on all "
                        "images), 'full' (the product's: the seed's recipe, which the valid split "
                        "picked) or 'fast' (the fewest epochs shown to bless: full's). "
                        "Default: smoke")
    p.add_argument("--output-dir", default=configs.default_output_dir(),
                   help="base dir for pipeline root, metadata and pushed models "
                        "(default: $CAPSNET_OUTPUT_DIR or ./outputs)")
    p.add_argument("--pipeline-root", help="TFX pipeline root (default: <output-dir>/pipeline_root)")
    p.add_argument("--metadata-path",
                   help="SQLite ML Metadata file (default: <output-dir>/metadata.sqlite)")
    p.add_argument("--serving-dir",
                   help="blessed models are pushed to <serving-dir>/<version>/ "
                        "(default: <output-dir>/serving_model)")
    p.add_argument("--epochs", type=int, help=f"training epochs (preset; full: {defaults.epochs})")
    p.add_argument("--steps-per-epoch", type=int,
                   help="training steps per epoch (preset; full: one pass over the train split)")
    p.add_argument("--batch-size", type=int,
                   help=f"global training batch size (preset; full: {defaults.batch_size})")
    p.add_argument("--data-fraction", type=float,
                   help="keep the first fraction of every split, in (0, 1] (preset; smoke: 0.05)")
    p.add_argument("--learning-rate", type=float,
                   help="Adam's initial (exponential schedule) or peak (cosine) learning rate "
                        f"(preset; seed: {defaults.learning_rate}, decayed x{defaults.lr_decay} "
                        "per epoch)")
    p.add_argument("--seed", type=int,
                   help="seeds the Trainer's initial weights, shuffle order and shifts "
                        f"(preset; default {defaults.seed})")
    p.add_argument("--max-test-error", type=float,
                   help=f"blessing bar on the test split (default {configs.MAX_TEST_ERROR})")
    p.add_argument("--data-path",
                   help="MNIST to use instead of the default sources: a directory of the four "
                        "IDX .gz files or a Keras-style mnist.npz")
    p.add_argument("--data-cache-dir",
                   help="where the verified canonical mnist.npz is kept "
                        "(default: $MNIST_CACHE_DIR or ~/.cache/capsnet_tfx/mnist)")
    p.add_argument("--no-baseline", action="store_true",
                   help="bless on the test-error bar alone, without the no-regression check "
                        "against the latest blessed model")
    p.add_argument("--warm-start", action="store_true",
                   help="start training from the weights of the latest blessed model (the "
                        "first run, with none, trains from scratch and says so). Default: off")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run every component even if an identical execution exists")
    p.add_argument("--mixed-precision", choices=hardware.MIXED_PRECISION_CHOICES,
                   help="the Trainer's compute: 'auto' = bfloat16 (float32 variables; squash, "
                        "routing, lengths and losses in float32) on CPUs with native bf16 "
                        "(AMX-BF16, AVX512_BF16) and GPUs of compute capability >= 8.0, float32 "
                        "elsewhere; 'none' = float32; or force a Keras mixed policy. "
                        f"Default: {defaults.mixed_precision}")
    p.add_argument("--serving-precision", choices=recipe.SERVING_PRECISION_CHOICES,
                   help="the exported serving graph's compute: float32 (fast on any CPU, built "
                        "from the float32 master weights) or mixed_bfloat16 (for serving hosts "
                        f"with native bf16). Default: {defaults.serving_precision}")
    p.add_argument("--verbose", action="store_true",
                   help="stream every log line (TFX, Beam, TensorFlow) to the terminal. Default: "
                        "a compact view (components, epochs, summary); the full log goes to "
                        "<output-dir>/logs/")
    p.add_argument("--cpu-replicas", type=int, metavar="N",
                   help="split the CPU into N logical devices so that the Trainer's "
                        "MirroredStrategy trains N replicas on it (CPU-only machines; slower "
                        "than 1 on 2 cores: for checking distributed training). Default: off")
    p.add_argument("--beam-workers", type=int, default=1, metavar="N",
                   help="run ExampleGen, StatisticsGen, Transform and Evaluator on Beam's "
                        "FnApiRunner with N SDK worker processes (the Fn API harness Dataflow "
                        "and Flink run; slower than 1 on 2 cores: for checking the Beam code "
                        "out of process). Default: 1 (in-process)")
    p.add_argument("--trainer-workers", type=int, default=1, metavar="N",
                   help="run the Trainer as N worker processes on 127.0.0.1 "
                        "(MultiWorkerMirroredStrategy, TFX's run_executor entry point with one "
                        "TF_CONFIG each, as Vertex runs a multi-worker Trainer; slower than 1 on "
                        "2 cores: for checking multi-worker training). Default: 1 (in-process)")
    args = p.parse_args(argv)
    if args.trainer_workers < 1:
        p.error(f"--trainer-workers must be >= 1, got {args.trainer_workers}")
    if args.trainer_workers > 1 and args.cpu_replicas:
        p.error("--cpu-replicas splits this process's CPU for an in-process Trainer; it does "
                "not combine with --trainer-workers > 1")
    if args.cpu_replicas is not None and args.cpu_replicas < 1:
        p.error(f"--cpu-replicas must be >= 1, got {args.cpu_replicas}")
    if args.beam_workers < 1:
        p.error(f"--beam-workers must be >= 1, got {args.beam_workers}")
    try:
        config = configs.preset(args.preset, epochs=args.epochs,
                                steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                                data_fraction=args.data_fraction,
                                learning_rate=args.learning_rate, seed=args.seed,
                                max_test_error=args.max_test_error,
                                mixed_precision=args.mixed_precision,
                                serving_precision=args.serving_precision)
    except ValueError as e:
        p.error(str(e))
    args.pipeline_root = args.pipeline_root or os.path.join(args.output_dir, "pipeline_root")
    args.metadata_path = args.metadata_path or os.path.join(args.output_dir, "metadata.sqlite")
    args.serving_dir = args.serving_dir or os.path.join(args.output_dir, "serving_model")
    problem = path_problem(args.pipeline_root, args.metadata_path, args.serving_dir)
    if problem:
        p.error(problem)
    return args, config


def path_problem(pipeline_root: str, metadata_path: str, serving_dir: str):
    """Why these locations cannot work (a message), or None."""
    for name, path in (("--pipeline-root", pipeline_root), ("--serving-dir", serving_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{name} {path} is a file; expected a directory (or a path to create)"
    if os.path.isdir(metadata_path):
        return f"--metadata-path {metadata_path} is a directory; expected an SQLite file path"
    root, serving = os.path.realpath(pipeline_root), os.path.realpath(serving_dir)
    if serving == root or serving.startswith(root + os.sep):
        return (f"--serving-dir {serving_dir} is inside --pipeline-root {pipeline_root}: pushed "
                f"models must live outside the pipeline's artifact tree")
    return None


def main(argv=None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    from models.capsnet import hardware  # first, before TFX or TensorFlow loads: only then
    from pipeline import tf_runtime      # their settings act

    hardware.apply_tf_env(config.recipe.mixed_precision)
    if args.beam_workers > 1:  # Beam's SDK worker processes import the project's DoFns by name
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.path.dirname(os.path.abspath(__file__)),
                          os.environ.get("PYTHONPATH")]))
    if args.cpu_replicas:
        tf_runtime.configure_cpu_replicas(args.cpu_replicas)
    from data import mnist
    from pipeline import console

    try:  # before anything is written: bad data leaves no output dir behind
        npz_path, source = mnist.ensure_cached(args.data_path, args.data_cache_dir)
    except mnist.MnistDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST source: {source}", flush=True)
    if args.verbose:
        error = run(args, config, npz_path)
        if error:
            print(f"error: {error}", file=sys.stderr)
        return 1 if error else 0
    log = console.log_path(args.output_dir)
    view = console.CompactView(batch_size=config.recipe.batch_size)
    with console.Capture(log, view):
        error = run(args, config, npz_path)
    if error:
        print("\n".join([*view.failure(), f"error: {error}", f"Full log: {log}"]),
              file=sys.stderr)
        return 1
    print(f"Full log: {log}")
    return 0


def run(args, config, npz_path: str):
    """Runs the pipeline and prints its summary; None, or what went wrong (the traceback is in
    the log)."""
    started = time.time()
    # Component progress (absl: "Component X is finished"); not Beam's chatter.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.INFO)
    from absl import logging as absl_logging
    from tfx import v1 as tfx

    from models.capsnet import hardware
    from pipeline import configs, console, run_lock, summary
    from pipeline.pipeline import create_pipeline, local_beam_args

    absl_logging.set_verbosity(absl_logging.INFO)
    print("Compute: " + hardware.format_description(hardware.describe(
        hardware.compute_policy(config.recipe.mixed_precision))), flush=True)
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(args.metadata_path)
    try:
        with run_lock.hold(args.pipeline_root):
            print(f"Pipeline root {args.pipeline_root} is locked for this run", flush=True)
            tfx.orchestration.LocalDagRunner().run(create_pipeline(
                pipeline_name=configs.PIPELINE_NAME,
                pipeline_root=args.pipeline_root,
                data_root=os.path.dirname(npz_path),
                serving_dir=args.serving_dir,
                config=config,
                metadata_connection_config=metadata,
                beam_pipeline_args=local_beam_args(args.beam_workers),
                compare_to_baseline=not args.no_baseline,
                warm_start=args.warm_start,
                trainer_workers=args.trainer_workers,
                enable_cache=not args.no_cache))
    except run_lock.Busy as e:
        return str(e)
    except Exception as e:  # a component failed
        logging.exception(console.FAILED)
        return f"the pipeline run failed: {type(e).__name__}: {e}"
    result = summary.summarize(metadata, configs.PIPELINE_NAME)
    print(f"\n=== {configs.PIPELINE_NAME}: preset {args.preset}, "
          f"{time.time() - started:.0f} s ===\n{result.format()}", flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
