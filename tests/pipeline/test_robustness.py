"""pipeline/robustness.py and the robustness branch of create_pipeline: the Evaluator's
configuration (two models, the slices, no thresholds), a pipeline without --robustness left
exactly as it was, and the summary's lines and table read from TFMA-shaped results."""

import json

import tensorflow_model_analysis as tfma
from tfx.dsl.compiler import compiler

from data import affine
from pipeline import configs, robustness
from pipeline.pipeline import create_pipeline

SMOKE = configs.PRESETS["smoke"]
PRODUCT_NODES = {"MnistExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator",
                 "AnomaliesGate", "Transform", "Trainer", "latest_blessed_model_resolver",
                 "Evaluator", "Pusher"}
ROBUSTNESS_NODES = {"AffineExampleGen", "AffineStatisticsGen", "AffineSchemaGen",
                    "AffineExampleValidator", "AffineAnomaliesGate", "CnnTrainer",
                    "RobustnessEvaluator"}


def test_the_eval_config_compares_the_capsnet_with_the_cnn_per_slice_without_thresholds():
    config = robustness.make_eval_config()
    specs = {spec.name: spec for spec in config.model_specs}
    assert set(specs) == {"capsnet", "cnn"}
    assert specs["cnn"].is_baseline and not specs["capsnet"].is_baseline
    for spec in specs.values():
        assert (spec.signature_name, spec.label_key, spec.prediction_key) == (
            "serving_default", "label", "scores")
    assert [list(s.feature_keys) for s in config.slicing_specs] == [
        [], ["transform"], ["transform", "magnitude"]]
    assert {m.class_name for spec in config.metrics_specs for m in spec.metrics} == {
        "ExampleCount", "SparseCategoricalAccuracy"}
    # No thresholds: TFX's Evaluator then validates nothing and writes no blessing.
    assert not tfma.metrics.metric_thresholds_from_metrics_specs(config.metrics_specs,
                                                                  eval_config=config)


def compiled_nodes(pipeline):
    """{node id: what TFX's cache key is made of (node info, inputs, outputs, parameters and
    executor spec, serialized)} of a compiled pipeline; upstream and downstream lists left out."""
    from tfx.proto.orchestration import pipeline_pb2

    ir = compiler.Compiler().compile(pipeline)
    deployment = pipeline_pb2.IntermediateDeploymentConfig()
    ir.deployment_config.Unpack(deployment)

    def key(node):
        node = node.pipeline_node
        parts = (node.node_info, node.inputs, node.outputs, node.parameters)
        executor = deployment.executor_specs.get(node.node_info.id)
        return tuple(p.SerializeToString(deterministic=True) for p in parts) + (
            executor.SerializeToString(deterministic=True) if executor else b"",)

    return {node.pipeline_node.node_info.id: key(node) for node in ir.nodes}


def make(robust, tmp_path):
    return create_pipeline("capsnet_mnist", str(tmp_path / "pipeline_root"), str(tmp_path / "data"),
                           str(tmp_path / "serving"), SMOKE, robustness=robust)


def test_without_the_flag_the_pipeline_is_the_product_alone_and_the_flag_changes_none_of_it(
        tmp_path):
    off, on = make(False, tmp_path), make(True, tmp_path)
    assert {c.id for c in off.components} == PRODUCT_NODES
    assert {c.id for c in on.components} == PRODUCT_NODES | ROBUSTNESS_NODES
    off_nodes, on_nodes = compiled_nodes(off), compiled_nodes(on)
    for node in PRODUCT_NODES:
        assert off_nodes[node] == on_nodes[node], node
    # The CnnTrainer waits for the product's Pusher.
    cnn = next(c for c in on.components if c.id == "CnnTrainer")
    assert "Pusher" in {n.id for n in cnn.upstream_nodes}


def test_the_cnn_trainer_trains_the_baseline_recipe_with_checkpoints_of_its_own(tmp_path):
    on = make(True, tmp_path)
    trainers = {c.id: c for c in on.components if c.id in ("Trainer", "CnnTrainer")}
    configs_ = {k: json.loads(t.exec_properties["custom_config"]) for k, t in trainers.items()}
    assert configs_["CnnTrainer"]["network"] == "cnn"
    assert configs_["Trainer"]["network"] == "capsnet"
    assert configs_["CnnTrainer"]["epochs"] == SMOKE.baseline.epochs
    assert configs_["CnnTrainer"]["resume_root"].endswith("/pipeline_root/CnnTrainer/resume")
    assert configs_["Trainer"]["resume_root"].endswith("/pipeline_root/Trainer/resume")


def fake_results():
    def result(capsnet, cnn, n=100):
        return robustness.SliceResult(n, {"capsnet": capsnet, "cnn": cnn})
    return {(): result(0.8, 0.7, 1500), ("identity",): result(0.99, 0.98),
            ("identity", 0): result(0.99, 0.98), ("rotate", 10): result(0.97, 0.96),
            ("rotate", 45): result(0.6, 0.5, 90), ("affine", 0): result(0.9, 0.85)}


def test_the_headline_is_the_identity_each_family_at_its_largest_and_the_mix():
    assert robustness.headline_slices(fake_results()) == [
        ("identity", 0), ("rotate", 45), ("affine", 0)]
    assert robustness.describe_slice("rotate", 45) == "rotate ±45°"
    assert robustness.describe_slice("scale", 120) == "scale ×1.20"
    assert robustness.describe_slice("shear", 40) == "shear ±0.40"
    assert robustness.describe_slice("translate", 5) == "translate 5 px"
    assert robustness.describe_slice("affine", 0) == "affine mix"


def test_the_table_has_a_row_per_transform_with_counts_and_the_difference():
    counts = {f"{family}:{magnitude}": {"kept": 100, "resampled": 3, "rejected": 10}
              for family, magnitude in (("identity", 0), ("rotate", 10), ("rotate", 45),
                                        ("affine", 0))}
    lines = robustness.table(fake_results(), counts)
    assert lines[2] == "| identity | – | 100 | 3 | 10 | 99.00 % | 98.00 % | +1.00 |"
    assert lines[4] == "| rotate | ±45° | 90 | 3 | 10 | 60.00 % | 50.00 % | +10.00 |"
    assert len(lines) == 2 + 4


def test_every_family_of_the_split_has_a_unit():
    assert set(affine.UNITS) == set(affine.FAMILIES)


def test_the_identity_check_compares_error_counts_of_the_whole_test_split():
    results = {("identity", 0): robustness.SliceResult(10_000, {"capsnet": 0.9964,
                                                                "cnn": 0.9950})}
    lines = robustness.identity_lines(results, {"capsnet": 0.9964, "cnn": 0.9951}, 10_000)
    assert lines == ["Identity check, CapsNet: 36 errors in the identity slice, 36 on the clean "
                     "test images (equal)",
                     "Identity check, CNN: 50 errors in the identity slice, 49 on the clean "
                     "test images (DIFFERENT)"]
    sample = {("identity", 0): robustness.SliceResult(20, {"capsnet": 1.0, "cnn": 1.0})}
    assert "skipped" in robustness.identity_lines(sample, {}, 10_000)[0]
