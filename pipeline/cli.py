"""The runners' command lines: the flags local_runner.py and kubeflow_runner.py share (the preset,
the data selection, the CapsNet's recipe, --robustness) and local_runner.py's own. The recipe's
flags come from the Recipe dataclass (models/capsnet/recipe.py, `add_flags`), so each is defined
once. Importing this module loads no TensorFlow: the runners choose its runtime after parsing.
"""

import argparse
import os
from typing import Optional, Tuple

from models.capsnet import recipe
from pipeline import configs


def add_run_flags(p: argparse.ArgumentParser, default_preset: str) -> None:
    """The flags that choose what a run trains: --preset, the data and the blessing bar,
    --robustness, and the CapsNet's recipe (a group of its own)."""
    p.add_argument("--preset", default=default_preset, choices=list(configs.PRESETS),
                   help="'smoke': the whole pipeline on ~3,500 examples in minutes (not "
                        "blessed); 'full': the product's recipe, 50 epochs on all 55,000 "
                        f"training images. Default: {default_preset}")
    p.add_argument("--robustness", action="store_true",
                   help="also train the paper's baseline CNN and evaluate both models on the "
                        "affine-transformed test split, sliced by transform and magnitude (no "
                        "gate: the blessing and the push are unchanged). Default: off")
    p.add_argument("--data-fraction", type=float,
                   help="keep the first fraction of every split, in (0, 1] (default: the "
                        "preset's; smoke: 0.05, full: 1)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="training steps per epoch (default: the preset's; smoke: 20, full: one "
                        "pass over the train split)")
    p.add_argument("--max-test-error", type=float,
                   help=f"blessing bar on the test split (default: {configs.MAX_TEST_ERROR})")
    shared = ", ".join(recipe.flag_name(name) for name in configs.SHARED_RECIPE_FIELDS)
    recipe.add_flags(p, configs.FULL.recipe, exclude=("network",),
                     title=f"the CapsNet's training recipe (defaults: the preset's; those shown "
                           f"are full's). {shared} also set the baseline CNN's")


def run_config(p: argparse.ArgumentParser, args) -> configs.RunConfig:
    """The RunConfig of `add_run_flags`' flags; a usage error (exit 2) naming a bad value."""
    try:
        return configs.preset(args.preset, data_fraction=args.data_fraction,
                              steps_per_epoch=args.steps_per_epoch,
                              max_test_error=args.max_test_error, **recipe.flag_values(args))
    except ValueError as e:
        p.error(str(e))


def local_parser(description: str) -> argparse.ArgumentParser:
    """local_runner.py's parser: where things go, the data source, the run's options, the run
    flags, and the flags for checking distributed execution."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=configs.default_output_dir(),
                   help="base dir for pipeline root, metadata, pushed models and logs "
                        "(default: $CAPSNET_OUTPUT_DIR or ./outputs)")
    p.add_argument("--pipeline-root",
                   help="TFX pipeline root (default: <output-dir>/pipeline_root)")
    p.add_argument("--metadata-path",
                   help="SQLite ML Metadata file (default: <output-dir>/metadata.sqlite)")
    p.add_argument("--serving-dir", help="blessed models are pushed to <serving-dir>/<version>/ "
                                         "(default: <output-dir>/serving_model)")
    p.add_argument("--data-path", help="MNIST to use instead of the default sources: a directory "
                                       "of the four IDX .gz files or a Keras-style mnist.npz")
    p.add_argument("--data-cache-dir",
                   help="where the verified canonical mnist.npz is kept "
                        "(default: $MNIST_CACHE_DIR or ~/.cache/capsnet_tfx/mnist)")
    p.add_argument("--no-baseline", action="store_true",
                   help="bless on the test-error bar alone, without the no-regression check "
                        "against the latest blessed model")
    p.add_argument("--warm-start", action="store_true",
                   help="start the CapsNet from the weights of the latest blessed model (the "
                        "first run, with none, trains from scratch and says so)")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run every component even if an identical execution exists")
    p.add_argument("--verbose", action="store_true",
                   help="stream every log line to the terminal (default: a compact view; the "
                        "full log goes to <output-dir>/logs/)")
    add_run_flags(p, default_preset="smoke")
    checks = p.add_argument_group(
        "checking distributed execution on one machine (each is slower than the default on "
        "2 cores: they run the scale-out code paths for real, docs/scale-out.md)")
    checks.add_argument("--cpu-replicas", type=int, metavar="N",
                        help="N logical CPU devices, so that MirroredStrategy trains N "
                             "replicas. Default: off")
    checks.add_argument("--beam-workers", type=int, default=1, metavar="N",
                        help="ExampleGen, StatisticsGen, Transform and the Evaluators on Beam's "
                             "FnApiRunner with N SDK worker processes (the Fn API harness of "
                             "Dataflow and Flink). Default: 1 (in-process)")
    checks.add_argument("--trainer-workers", type=int, default=1, metavar="N",
                        help="the Trainers as N processes on 127.0.0.1 under "
                             "MultiWorkerMirroredStrategy, one TF_CONFIG each, as Vertex AI runs "
                             "a multi-worker Trainer. Default: 1 (in-process)")
    return p


def parse_local_args(p: argparse.ArgumentParser, argv) -> Tuple[argparse.Namespace,
                                                                 configs.RunConfig]:
    """(args, RunConfig) of local_runner.py's command line; the paths filled in under
    --output-dir; a usage error (exit 2) for flags that cannot work together."""
    args = p.parse_args(argv)
    for flag in ("trainer_workers", "beam_workers", "cpu_replicas"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.trainer_workers > 1 and args.cpu_replicas:
        p.error("--cpu-replicas splits this process's CPU for an in-process Trainer; it does "
                "not combine with --trainer-workers > 1")
    config = run_config(p, args)
    args.pipeline_root = args.pipeline_root or os.path.join(args.output_dir, "pipeline_root")
    args.metadata_path = args.metadata_path or os.path.join(args.output_dir, "metadata.sqlite")
    args.serving_dir = args.serving_dir or os.path.join(args.output_dir, "serving_model")
    problem = path_problem(args.pipeline_root, args.metadata_path, args.serving_dir)
    if problem:
        p.error(problem)
    return args, config


def path_problem(pipeline_root: str, metadata_path: str, serving_dir: str) -> Optional[str]:
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
