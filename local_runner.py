"""Runs the CapsNet MNIST pipeline on this machine: LocalDagRunner, SQLite ML Metadata, Beam's
FnApiRunner. `python local_runner.py --help` lists every flag; `make run ARGS=...` passes flags;
--robustness adds the baseline CNN and the affine-split evaluation.

Outputs (under --output-dir unless set one by one):
  pipeline root   <output-dir>/pipeline_root/<Component>/<output>/<execution id>/
  metadata        <output-dir>/metadata.sqlite
  pushed models   <output-dir>/serving_model/<version>/
  run logs        <output-dir>/logs/run-<UTC time>-<pid>.log (all of it; the terminal shows a
                  compact view unless --verbose)
"""

import logging
import os
import sys
import time


def parse_args(argv):
    """(args, RunConfig) of the command line (pipeline/cli.py defines the flags)."""
    from pipeline import cli  # light: no TensorFlow

    return cli.parse_local_args(cli.local_parser(__doc__), argv)


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
                robustness=args.robustness,
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
