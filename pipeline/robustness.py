"""The robustness evaluation: the CapsNet against the paper's baseline CNN on the affine split.

`make_eval_config` is the robustness Evaluator's configuration: the CapsNet as the candidate, the
CNN as the baseline, both through their `serving_default` signature; accuracy and example count
overall, per transform family and per family x magnitude (TFMA computes each for both models and
their difference). No thresholds: it gates nothing, and TFX writes no blessing for it.

`accuracies` reads its TFMA output back; `summary_lines` are the lines the run's summary adds;
`table` is every slice as Markdown. `python -m pipeline.robustness` runs the same evaluation on
two trained models (the shipped CapsNet, a trained CNN) without training either (`main`).
"""

import dataclasses
import hashlib
import os
import shutil
from typing import Dict, List, Tuple

from models.capsnet import hardware

if __name__ == "__main__":  # TensorFlow's CPU runtime acts only if set before TensorFlow loads
    hardware.apply_tf_env()

import tensorflow_model_analysis as tfma  # noqa: E402

from components.affine_example_gen import MAGNITUDE_KEY, TRANSFORM_KEY  # noqa: E402
from data import affine  # noqa: E402
from models import features  # noqa: E402
from pipeline.evaluation import ACCURACY  # noqa: E402

ROBUSTNESS_PIPELINE = "capsnet_robustness"  # `main`'s pipeline, beside the product's
CANDIDATE = "capsnet"
BASELINE = "cnn"
NAMES = {CANDIDATE: "CapsNet", BASELINE: "CNN"}
SLICES = ((), (TRANSFORM_KEY,), (TRANSFORM_KEY, MAGNITUDE_KEY))


def make_eval_config() -> tfma.EvalConfig:
    """EvalConfig of the robustness Evaluator (module docstring)."""
    spec = dict(signature_name="serving_default", label_key=features.LABEL_KEY,
                prediction_key=features.SCORES)
    return tfma.EvalConfig(
        model_specs=[tfma.ModelSpec(name=CANDIDATE, **spec),
                     tfma.ModelSpec(name=BASELINE, is_baseline=True, **spec)],
        slicing_specs=[tfma.SlicingSpec(feature_keys=list(keys)) for keys in SLICES],
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="SparseCategoricalAccuracy")])])


def slice_value(single_slice_key):
    """A TFMA SingleSliceKey's value as Python: str, int or float."""
    kind = single_slice_key.WhichOneof("kind")
    value = getattr(single_slice_key, kind)
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class SliceResult:
    """One slice of the affine split: its examples and each model's accuracy."""
    examples: int
    accuracy: Dict[str, float]  # model name (CANDIDATE, BASELINE) -> accuracy


def accuracies(evaluation_uri: str) -> Dict[Tuple, SliceResult]:
    """{slice: SliceResult} of a robustness Evaluator's output; slices are () (the whole
    split), (family,) and (family, magnitude)."""
    results = {}
    for metrics in tfma.load_metrics(evaluation_uri):
        columns = {k.column: slice_value(k) for k in metrics.slice_key.single_slice_keys}
        key = tuple(columns[c] for c in (TRANSFORM_KEY, MAGNITUDE_KEY) if c in columns)
        values = {(kv.key.model_name, kv.key.name): kv.value.double_value.value
                  for kv in metrics.metric_keys_and_values if not kv.key.is_diff}
        results[key] = SliceResult(
            examples=int(values[(CANDIDATE, "example_count")]),
            accuracy={model: values[(model, ACCURACY)] for model in NAMES})
    return results


def headline_slices(results: Dict[Tuple, SliceResult]) -> List[Tuple]:
    """The slices the summary shows: the identity, each family at its largest magnitude, and
    the affine mix, in data.affine.FAMILIES order."""
    largest = {}
    for key in results:
        if len(key) == 2:
            family, magnitude = key
            if family not in largest or abs(magnitude) > abs(largest[family]):
                largest[family] = magnitude
    return [(family, largest[family]) for family in affine.FAMILIES if family in largest]


def describe_slice(family: str, magnitude: int) -> str:
    """'rotate ±45°', 'identity', 'affine mix'."""
    if family in ("identity", "affine"):
        return {"identity": "identity", "affine": "affine mix"}[family]
    return f"{family} {affine.format_magnitude(family, magnitude)}"


def summary_lines(evaluation_uri: str) -> List[str]:
    """The run summary's robustness lines: each headline slice's accuracy, CapsNet against CNN,
    and where the TFMA output is."""
    results = accuracies(evaluation_uri)
    lines = ["Robustness (accuracy on the affine split, CapsNet against CNN):"]
    for key in headline_slices(results):
        result = results[key]
        capsnet, cnn = result.accuracy[CANDIDATE], result.accuracy[BASELINE]
        lines.append(f"  {describe_slice(*key):<22} CapsNet {capsnet:7.2%}  CNN {cnn:7.2%}  "
                     f"({100 * (capsnet - cnn):+.2f} points, {result.examples} examples)"
                     .replace("%", " %"))
    lines.append(f"Robustness TFMA output: {evaluation_uri}")
    return lines


def table(results: Dict[Tuple, SliceResult], counts: Dict[str, Dict[str, int]]) -> List[str]:
    """The robustness evaluation as a Markdown table: a row per (family, magnitude), with the
    examples kept, redrawn and left out (AffineExampleGen's counts, keyed 'family:magnitude'),
    each model's accuracy and their difference."""
    lines = ["| transform | magnitude | examples | redrawn | left out | CapsNet | CNN | "
             "CapsNet − CNN |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted((k for k in results if len(k) == 2),
                  key=lambda k: (affine.FAMILIES.index(k[0]), k[1]))
    for family, magnitude in keys:
        result, count = results[(family, magnitude)], counts[f"{family}:{magnitude}"]
        capsnet, cnn = result.accuracy[CANDIDATE], result.accuracy[BASELINE]
        lines.append(f"| {family} | {affine.format_magnitude(family, magnitude)} | "
                     f"{result.examples:,} | "
                     f"{count['resampled']:,} | {count['rejected']:,} | {capsnet:.2%} | "
                     f"{cnn:.2%} | {100 * (capsnet - cnn):+.2f} |".replace("%", " %"))
    return lines


def main(argv=None) -> int:
    """The robustness evaluation on two trained models, without training either: each saved
    Keras model is exported with the Transform graph as a Trainer exports it, then a pipeline of
    MnistExampleGen, the robustness components and an Importer per model runs on this machine
    (LocalDagRunner, SQLite ML Metadata under --output-dir; a re-run reuses what it can). Prints
    the summary lines and the table of every slice."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m pipeline.robustness", description=main.__doc__)
    p.add_argument("--capsnet", required=True,
                   help="the CapsNet's .keras inference model, e.g. "
                        "pretrained/capsnet_mnist.keras")
    p.add_argument("--cnn", required=True,
                   help="the baseline CNN's .keras inference model (python -m models.train "
                        "--network cnn writes cnn.keras)")
    p.add_argument("--transform-graph", default="pretrained/transform_graph",
                   help="a Transform output dir (pixels / 255; default: %(default)s)")
    p.add_argument("--output-dir", required=True,
                   help="the exported models, pipeline root and metadata go here")
    p.add_argument("--images", type=int,
                   help="transform only this many test images (a fixed sample; default: all)")
    p.add_argument("--serving-precision", default="float32",
                   choices=("float32", "mixed_bfloat16"),
                   help="the exports' compute, as the recipe's: float32 (the pipeline's default) "
                        "or mixed_bfloat16 (several times faster for the CNN on CPUs with native "
                        "bf16). Default: %(default)s")
    p.add_argument("--data-path", help="MNIST source, as local_runner.py --data-path")
    p.add_argument("--data-cache-dir", help="MNIST cache, as local_runner.py --data-cache-dir")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for flag in ("capsnet", "cnn", "transform_graph"):
        if not os.path.exists(getattr(args, flag)):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    try:
        spec = affine.AffineSpec(images=args.images)
    except affine.AffineConfigError as e:
        p.error(str(e))

    from data import mnist
    from ml_metadata.metadata_store import metadata_store
    from tfx import v1 as tfx
    from components.affine_example_gen import read_counts
    from pipeline import mlmd
    from pipeline.pipeline import create_robustness_pipeline, local_beam_args

    npz_path, source = mnist.ensure_cached(args.data_path, args.data_cache_dir)
    print(f"MNIST source: {source}", flush=True)
    uris = {name: export_model(path, args.transform_graph, os.path.join(
                args.output_dir, "models", f"{name}-{args.serving_precision}-{file_digest(path)}"),
                               args.serving_precision)
            for name, path in ((CANDIDATE, args.capsnet), (BASELINE, args.cnn))}
    metadata = tfx.orchestration.metadata.sqlite_metadata_connection_config(
        os.path.join(args.output_dir, "metadata.sqlite"))
    tfx.orchestration.LocalDagRunner().run(create_robustness_pipeline(
        ROBUSTNESS_PIPELINE, os.path.join(args.output_dir, "pipeline_root"),
        os.path.dirname(npz_path), uris[CANDIDATE], uris[BASELINE], spec, metadata,
        local_beam_args()))
    nodes = mlmd.latest_run(metadata_store.MetadataStore(metadata), ROBUSTNESS_PIPELINE)
    evaluation = nodes["RobustnessEvaluator"].output("evaluation").uri
    counts = read_counts(nodes["AffineExampleGen"].output("affine_examples").uri)
    results = accuracies(evaluation)
    lines = summary_lines(evaluation)
    if spec.images is None:  # the whole test split: the identity slice must be the clean test
        test = mnist.load(cache_dir=os.path.dirname(npz_path), allow_network=False)[0]
        clean = {name: clean_accuracy(os.path.join(uri, "Format-Serving"), test.x_test,
                                      test.y_test) for name, uri in uris.items()}
        lines += identity_lines(results, clean, len(test.y_test))
    print("\n".join(["", *lines, "", *table(results, counts)]))
    return 0


def file_digest(path: str) -> str:
    """The first 12 hex digits of the file's SHA-256: an export's dir names the model it holds."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def clean_accuracy(export_dir: str, images, labels) -> float:
    """The export's accuracy on the official test images, through its serving_images signature."""
    import numpy as np

    from models import serving

    return float(np.mean(serving.classify(export_dir, images)[0] == labels))


def identity_lines(results: Dict[Tuple, SliceResult], clean: Dict[str, float],
                   n_test: int) -> List[str]:
    """The sanity check of a full split: the identity slice's accuracy is each model's accuracy
    on the clean test images through the same serving graph, exactly."""
    identity = results.get(("identity", 0))
    if identity is None or identity.examples != n_test:
        return ["Identity check: skipped (the split holds a sample of the test images)"]
    lines = []
    for name in NAMES:
        sliced, direct = (round(a * n_test) for a in (identity.accuracy[name], clean[name]))
        lines.append(f"Identity check, {NAMES[name]}: {n_test - sliced} errors in the identity "
                     f"slice, {n_test - direct} on the clean test images "
                     f"({'equal' if sliced == direct else 'DIFFERENT'})")
    return lines


def export_model(keras_path: str, transform_graph: str, model_dir: str,
                 serving_precision: str = "float32") -> str:
    """`model_dir`, a Model artifact dir holding the SavedModel of the .keras file with the
    Transform graph in Format-Serving/ (what a Trainer writes), computing in
    `serving_precision`; exported once: an existing export is reused."""
    serving_dir = os.path.join(model_dir, "Format-Serving")
    if not os.path.exists(serving_dir):
        import keras
        import tensorflow_transform as tft

        import models.capsnet  # noqa: F401  registers the CapsNet's layers
        from models import networks, serving
        from models.capsnet.recipe import Recipe

        model = keras.saving.load_model(keras_path, compile=False)
        network = networks.of_model(model)
        policy = Recipe(serving_precision=serving_precision).serving_policy()
        model = networks.with_dtype_policy(network, Recipe(network=network.name), model, policy)
        temporary = serving_dir + ".partial"
        shutil.rmtree(temporary, ignore_errors=True)
        serving.export_serving_model(model, tft.TFTransformOutput(transform_graph), temporary)
        os.replace(temporary, serving_dir)
    return os.path.abspath(model_dir)


if __name__ == "__main__":
    raise SystemExit(main())
