"""End to end: the smoke preset through local_runner.py, on real MNIST, in a temp dir.

The `runs` fixture (tests/conftest.py) makes three runs on one pipeline root and metadata store:
  1. smoke preset: every component runs; the model is NOT blessed at 0.4 % and nothing is pushed;
  2. the same command again: every component is served from cache;
  3. a bar the smoke model passes, and --robustness: only Evaluator (and Pusher) of the product
     run again, BLESSED and pushed; the robustness components run beside them
     (tests/pipeline/test_robustness_e2e.py checks what they make).
"""

import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
import tensorflow_transform as tft

from models import serving
from models.capsnet import hardware
from pipeline import configs
from pipeline.evaluation import ACCURACY

pytestmark = pytest.mark.e2e
SMOKE = configs.PRESETS["smoke"]
ALL_NODES = {"MnistExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator",
             "AnomaliesGate", "Transform", "Trainer", "latest_blessed_model_resolver",
             "Evaluator", "Pusher"}
ROBUSTNESS_NODES = ("AffineExampleGen", "AffineStatisticsGen", "AffineSchemaGen",
                    "AffineExampleValidator", "AffineAnomaliesGate", "CnnTrainer",
                    "RobustnessEvaluator")


def count_records(pattern):
    files = glob.glob(pattern)
    assert files, pattern
    return sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def test_first_run_executes_every_component(runs):
    nodes = runs["nodes"][0]
    assert set(nodes) == ALL_NODES
    assert not [n for n, r in nodes.items() if r.cached]


def test_example_counts_per_split(runs):
    examples = runs["nodes"][0]["MnistExampleGen"].output("examples").uri
    sizes = SMOKE.split_sizes()
    assert sizes == {"train": 2750, "valid": 250, "test": 500}
    for split, n in sizes.items():
        assert count_records(os.path.join(examples, f"Split-{split}", "*.gz")) == n


def test_examples_hold_the_verified_pixels(runs, mnist_arrays):
    examples = runs["nodes"][0]["MnistExampleGen"].output("examples").uri
    files = glob.glob(os.path.join(examples, "Split-test", "*.gz"))
    by_label = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        ex = tf.train.Example.FromString(record.numpy())
        image = np.frombuffer(ex.features.feature["image"].bytes_list.value[0], np.uint8)
        by_label.setdefault(image.tobytes(), ex.features.feature["label"].int64_list.value[0])
    expected = {img.tobytes(): int(y) for img, y in
                zip(mnist_arrays.x_test[:500], mnist_arrays.y_test[:500])}
    assert by_label == expected


def test_transform_graph_normalises_raw_examples(runs, mnist_arrays):
    tft_output = tft.TFTransformOutput(runs["nodes"][0]["Transform"].output("transform_graph").uri)
    image = mnist_arrays.x_test[0]
    out = tft_output.transform_raw_features(
        {"image": tf.constant([[image.tobytes()]]), "label": tf.constant([[7]], tf.int64)})
    np.testing.assert_allclose(out["image_xf"].numpy()[0, ..., 0], image / 255.0, rtol=1e-6)
    assert out["label_xf"].numpy().tolist() == [7]


def test_exported_model_answers_on_both_signatures(runs, mnist_arrays):
    model_dir = os.path.join(runs["nodes"][0]["Trainer"].output("model").uri, "Format-Serving")
    loaded = tf.saved_model.load(model_dir)
    assert set(loaded.signatures) == {"serving_default", serving.IMAGES_SIGNATURE}
    images = mnist_arrays.x_test[:5]
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()]))
    })).SerializeToString() for img in images]
    by_examples = loaded.signatures["serving_default"](examples=tf.constant(examples))
    by_images = loaded.signatures[serving.IMAGES_SIGNATURE](images=tf.constant(images))
    by_images_4d = loaded.signatures[serving.IMAGES_SIGNATURE](images=tf.constant(images[..., None]))
    for out in (by_examples, by_images, by_images_4d):
        assert out["scores"].shape == (5, 10) and out["classes"].shape == (5,)
        assert out["classes"].dtype == tf.int64
        scores = out["scores"].numpy()
        assert np.all((scores >= 0) & (scores < 1))  # capsule lengths
        np.testing.assert_array_equal(out["classes"].numpy(), scores.argmax(-1))
    np.testing.assert_allclose(by_examples["scores"], by_images["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_images["scores"], by_images_4d["scores"], rtol=1e-5, atol=1e-6)


def test_exported_model_was_built_by_keras_3(runs):
    model_dir = os.path.join(runs["nodes"][0]["Trainer"].output("model").uri, "Format-Serving")
    with open(os.path.join(model_dir, "assets.extra", serving.MODEL_INFO_FILE)) as f:
        info = json.load(f)
    assert info["keras_version"].startswith("3.")
    assert info["model_class"].startswith("keras.src.")
    assert info["trainable_params"] == 8215568
    # The Trainer's compute is the chooser's on this machine, and the summary says so.
    policy = hardware.compute_policy(SMOKE.recipe.mixed_precision)
    described = hardware.describe(policy)
    assert {key: info["training"][key] for key in described} == described
    assert info["training"]["start"].startswith("no checkpoint in ")  # a first run
    assert info["serving_compute_dtype"] == "float32"
    assert f"Trained with: {hardware.format_description(info['training'])}" in runs["stdout"][0]


def bfloat16_ops(saved_model_dir):
    """Names of the ops in a SavedModel's graph and functions that compute or hold bfloat16."""
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
    bf16 = tf.bfloat16.as_datatype_enum
    return {n.op for n in nodes for a in n.attr.values()
            if a.type == bf16 or bf16 in a.list.type}


def test_default_export_is_a_float32_graph_that_classifies_as_the_trained_model(runs,
                                                                               mnist_arrays):
    """Whatever dtype training computed in, the default serving graph is float32 (fast on any
    CPU), built from the float32 master weights: no bfloat16 op in it, and on the first 3,000
    official test images its classes are those of the model as trained (with its training dtype
    policy) on >= 99.9 % of them."""
    from models import networks
    model_dir = os.path.join(runs["nodes"][0]["Trainer"].output("model").uri, "Format-Serving")
    assert bfloat16_ops(model_dir) == set()
    with open(os.path.join(model_dir, "assets.extra", serving.MODEL_INFO_FILE)) as f:
        trained_dtype = json.load(f)["training"]["compute_dtype"]
    if trained_dtype != "bfloat16":
        pytest.skip(f"the Trainer computed in {trained_dtype} on this machine (no native bf16)")
    import keras
    served = tf.saved_model.load(model_dir).signatures[serving.IMAGES_SIGNATURE]
    images = mnist_arrays.x_test[:3000]
    classes = np.concatenate([served(images=tf.constant(images[i:i + 500]))["classes"].numpy()
                              for i in range(0, len(images), 500)])
    float32_model = keras.saving.load_model(os.path.join(model_dir, "keras", "capsnet.keras"))
    trained = networks.with_dtype_policy(networks.CAPSNET, SMOKE.recipe, float32_model,
                                         "mixed_bfloat16")
    lengths = trained.predict(images[..., None].astype("float32") / 255.0,
                              batch_size=500, verbose=0)["lengths"]
    agree = np.mean(np.argmax(lengths, -1) == classes)
    assert agree >= 0.999, f"classes agree on {agree:.2%} of the test images"


def test_tensorboard_logs_are_written(runs):
    logs = runs["nodes"][0]["Trainer"].output("model_run").uri
    assert glob.glob(os.path.join(logs, "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(logs, "validation", "events.out.tfevents.*"))


def test_tfma_metrics_and_per_digit_slices(runs):
    evaluation = runs["nodes"][0]["Evaluator"].output("evaluation").uri
    by_slice = {}
    for metrics in tfma.load_metrics(evaluation):
        key = tuple((k.column, k.int64_value) for k in metrics.slice_key.single_slice_keys)
        by_slice[key] = {kv.key.name: kv.value.double_value.value
                         for kv in metrics.metric_keys_and_values}
    assert by_slice[()]["example_count"] == 500
    digits = {key[0][1]: m for key, m in by_slice.items() if key}
    assert sorted(digits) == list(range(10))
    assert sum(m["example_count"] for m in digits.values()) == 500
    assert all(0.0 <= m[ACCURACY] <= 1.0 for m in digits.values())
    assert list(tfma.load_plots(evaluation))  # the confusion matrix


def test_smoke_model_is_not_blessed_and_not_pushed(runs):
    first = runs["nodes"][0]
    assert first["Evaluator"].output("blessing").custom_properties["blessed"].int_value == 0
    assert os.path.exists(os.path.join(first["Evaluator"].output("blessing").uri, "NOT_BLESSED"))
    assert first["Pusher"].output("pushed_model").custom_properties["pushed"].int_value == 0
    assert runs["serving_after_first"] == []
    assert "Model: NOT BLESSED" in runs["stdout"][0]
    assert "FAILED: value threshold, sparse_categorical_accuracy" in runs["stdout"][0]
    assert "Pushed: nothing" in runs["stdout"][0]


def test_second_identical_run_is_served_from_cache(runs):
    nodes = runs["nodes"][1]
    assert set(nodes) == ALL_NODES
    not_cached = {n for n, r in nodes.items() if not r.cached}
    assert not_cached <= {"latest_blessed_model_resolver"}  # resolvers resolve, never cache
    assert nodes["Trainer"].output("model").id == runs["nodes"][0]["Trainer"].output("model").id


def test_terminal_shows_a_compact_view_and_the_full_log_goes_to_a_file(runs):
    """Without --verbose the terminal gets at most 60 lines: a start and an end line for every
    component (with "from cache" on the second run's), a line per epoch, the summary (with the
    training time) and the path of the full log, which holds TFX's own lines."""
    first, again = (stdout.splitlines() for stdout in runs["stdout"][:2])
    assert len(first) <= 60, "\n".join(first)
    for node in ALL_NODES:
        mine = [line for line in first if re.match(rf"\S+  {node} +(started|done in )", line)]
        assert len(mine) == 2 and "from cache" not in mine[1], (node, mine)
        done = [line for line in again if re.match(rf"\S+  {node} +done in ", line)]
        assert len(done) == 1
        assert done[0].endswith("(from cache)") == (node != "latest_blessed_model_resolver")
    epochs = [line for line in first if re.search(
        r"  epoch \d/2  loss \d\.\d{4}  valid acc \d+\.\d\d %  \d+ img/s  ", line)]
    assert len(epochs) == SMOKE.recipe.epochs == 2, first
    assert "Trainer ETA" in epochs[0] and epochs[1].endswith("Trainer: last epoch done")
    assert any(re.fullmatch(r"Training time: .+ for epochs 1-2 of 2, \d+ img/s \(median "
                            r"epoch, validation included\)", line) for line in first), first
    assert first[-1].startswith("Full log: ")
    log = first[-1][len("Full log: "):]
    assert os.path.dirname(log) == str(runs["out"] / "logs")
    with open(log) as f:
        text = f.read()
    assert "absl: Component Trainer is running." in text and "Epoch 2/2" in text
    assert len(text.splitlines()) > 20 * len(first)


def test_passing_bar_blesses_and_pushes_a_versioned_model(runs):
    """The third run also adds --robustness: its components run, and the product's are those
    of the runs without it (the Trainer and everything upstream from cache)."""
    nodes = runs["nodes"][2]
    rerun = {n for n, r in nodes.items() if not r.cached} - set(ROBUSTNESS_NODES)
    assert {"Evaluator", "Pusher"} <= rerun <= {"Evaluator", "Pusher",
                                               "latest_blessed_model_resolver"}
    assert set(nodes) - set(runs["nodes"][0]) == set(ROBUSTNESS_NODES)
    assert nodes["Evaluator"].output("blessing").custom_properties["blessed"].int_value == 1
    pushed = nodes["Pusher"].output("pushed_model").custom_properties
    assert pushed["pushed"].int_value == 1
    versions = runs["serving_after_third"]
    assert len(versions) == 1 and versions[0].isdigit()
    destination = str(runs["out"] / "serving_model" / versions[0])
    assert pushed["pushed_destination"].string_value == destination
    loaded = tf.saved_model.load(destination)
    assert set(loaded.signatures) == {"serving_default", serving.IMAGES_SIGNATURE}
    assert "Model: BLESSED" in runs["stdout"][2]
    assert f"Pushed to: {destination}" in runs["stdout"][2]
