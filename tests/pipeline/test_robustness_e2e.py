"""End to end: the robustness evaluation of a smoke run with --robustness (the third run of the
`runs` fixture, tests/conftest.py): the affine split as AffineExampleGen writes it and the
pipeline validates it, the CNN its Trainer exports, and the Evaluator's per-slice accuracies of
both models, checked against the models' own answers."""

import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from components.affine_example_gen import COUNTS_FILE, SPLIT, parse_example, to_example
from data import affine
from models import features, serving
from pipeline import configs, robustness
from tests.pipeline.test_pipeline_e2e import ROBUSTNESS_NODES

pytestmark = pytest.mark.e2e
SMOKE = configs.PRESETS["smoke"]


@pytest.fixture(scope="module")
def nodes(runs):
    return runs["nodes"][2]


@pytest.fixture(scope="module")
def split(nodes):
    """[(serialized, image, label, transform, magnitude)] of the affine split."""
    uri = nodes["AffineExampleGen"].output("affine_examples").uri
    records = [r.numpy() for r in tf.data.TFRecordDataset(
        glob.glob(os.path.join(uri, f"Split-{SPLIT}", "*")), compression_type="GZIP")]
    rows = []
    for record in records:
        example = tf.train.Example.FromString(record)
        feature = example.features.feature
        assert set(feature) == {"image", "label", "transform", "magnitude"}
        image, label = parse_example(record)
        rows.append((record, image, label, feature["transform"].bytes_list.value[0].decode(),
                     feature["magnitude"].int64_list.value[0]))
    return rows


def test_every_robustness_component_ran_once(nodes):
    assert set(ROBUSTNESS_NODES) <= set(nodes)
    assert not any(nodes[n].cached for n in ROBUSTNESS_NODES)


def test_the_split_is_the_sampled_test_digits_under_every_transform_and_nothing_else(
        nodes, split, runs, mnist_arrays):
    """The identity examples are test digits bit for bit (with their labels); every other
    example is what data.affine computes for one of them: the component and a direct call give
    the same bytes, whatever order Beam used."""
    test_images = {mnist_arrays.x_test[i].tobytes(): int(mnist_arrays.y_test[i])
                   for i in range(SMOKE.split_sizes()["test"])}
    identities = [(image, label) for _, image, label, family, _ in split if family == "identity"]
    assert len(identities) == SMOKE.affine.images
    for image, label in identities:
        assert test_images[image.tobytes()] == label
    expected = set()
    for image, label in identities:
        for family, magnitude, out in affine.transform_all(image, label, SMOKE.affine):
            if out.image is not None:
                expected.add(to_example(out.image, label, family, magnitude))
    assert {record for record, *_ in split} == expected
    properties = nodes["AffineExampleGen"].output("affine_examples").custom_properties
    assert properties["kept"].int_value == len(split)
    with open(os.path.join(nodes["AffineExampleGen"].output("affine_examples").uri,
                           COUNTS_FILE)) as f:
        counts = json.load(f)
    assert set(counts) == {f"{f}:{m}" for f, m in SMOKE.affine.transforms()}
    assert sum(c["kept"] + c["rejected"] for c in counts.values()) == \
        len(SMOKE.affine.transforms()) * SMOKE.affine.images
    assert sum(c["rejected"] for c in counts.values()) == properties["rejected"].int_value


def test_the_split_is_validated_against_its_checked_in_schema(nodes):
    from components.anomalies_gate import describe_anomalies
    from tfx.types import standard_artifacts

    anomalies = standard_artifacts.ExampleAnomalies()
    anomalies.set_mlmd_artifact(nodes["AffineExampleValidator"].output("anomalies"))
    assert describe_anomalies(anomalies) == ""
    schema = nodes["AffineSchemaGen"].output("schema").uri
    text = open(glob.glob(os.path.join(schema, "*.pbtxt"))[0]).read()
    assert 'name: "transform"' in text and 'name: "magnitude"' in text


def test_the_cnn_trainer_exports_the_cnn_with_the_capsnets_signatures_and_dtypes(nodes):
    model_dir = os.path.join(nodes["CnnTrainer"].output("model").uri, "Format-Serving")
    with open(os.path.join(model_dir, "assets.extra", serving.MODEL_INFO_FILE)) as f:
        info = json.load(f)
    assert info["network"] == "cnn" and info["trainable_params"] == 35_445_522
    with open(os.path.join(nodes["Trainer"].output("model").uri, "Format-Serving",
                           "assets.extra", serving.MODEL_INFO_FILE)) as f:
        capsnet = json.load(f)
    # The same compute dtype as the CapsNet's (bfloat16 where the CPU has it), float32 serving.
    assert info["training"]["compute_dtype"] == capsnet["training"]["compute_dtype"]
    assert info["serving_compute_dtype"] == "float32"
    assert set(tf.saved_model.load(model_dir).signatures) == {"serving_default",
                                                            serving.IMAGES_SIGNATURE}


def served_accuracy(model_uri, images, labels):
    served = tf.saved_model.load(os.path.join(model_uri, "Format-Serving")).signatures[
        serving.IMAGES_SIGNATURE](images=tf.constant(np.stack(images)))
    return float(np.mean(served[features.CLASSES].numpy() == np.array(labels)))


def test_the_evaluator_gives_each_slice_both_models_accuracies_and_blesses_nothing(nodes,
                                                                                     split):
    uri = nodes["RobustnessEvaluator"].output("evaluation").uri
    results = robustness.accuracies(uri)
    families = {family for *_, family, _ in split}
    pairs = {(family, magnitude) for *_, family, magnitude in split}
    assert set(results) == {()} | {(f,) for f in families} | pairs
    assert results[()].examples == len(split)
    for (family, magnitude), result in ((k, v) for k, v in results.items() if len(k) == 2):
        rows = [(image, label) for _, image, label, f, m in split
                if (f, m) == (family, magnitude)]
        assert result.examples == len(rows)
        if family in ("identity", "rotate"):  # the models' own answers, both of them
            images, labels = zip(*rows)
            for name, node in (("capsnet", "Trainer"), ("cnn", "CnnTrainer")):
                assert result.accuracy[name] == pytest.approx(
                    served_accuracy(nodes[node].output("model").uri, images, labels),
                    abs=1e-6), (family, magnitude, name)
    blessing = nodes["RobustnessEvaluator"].output("blessing")
    assert "blessed" not in blessing.custom_properties  # no thresholds, no verdict


def test_the_summary_and_the_compact_view_show_the_robustness(runs, split):
    out = runs["stdout"][2]
    assert re.search(rf"Affine split: {len(split)} examples; \d+ transforms redrawn and \d+ "
                     r"examples left out to keep the digit in the frame", out)
    assert "Robustness (accuracy on the affine split, CapsNet against CNN):" in out
    for label in ("identity", "translate 5 px", "rotate ±45°", "scale ×1.20", "shear ±0.40",
                  "affine mix"):
        assert re.search(rf"\n  {re.escape(label)} +CapsNet +\d+\.\d\d %  CNN +\d+\.\d\d %  "
                         r"\([+-]\d+\.\d\d points, \d+ examples\)", out), label
    assert "Robustness TFMA output: " in out
    cnn = out[out.index("CnnTrainer                     started"):out.index("CnnTrainer  "
                                                                         "                   done")]
    assert re.search(r"  epoch 1/1  loss \d\.\d{4}  valid acc \d+\.\d\d %", cnn), cnn
