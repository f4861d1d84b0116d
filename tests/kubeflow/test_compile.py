"""kubeflow_runner.py compiles the local pipeline to valid KFP v2 specs with the right contents.

Offline: strict protobuf parses (kfp-pipeline-spec), the kfp SDK's own loader and compiler, and
structural checks against the pipeline object local_runner.py runs.
"""

import json

import pytest
import tensorflow_model_analysis as tfma
import yaml
from google.protobuf import json_format
from kfp import compiler, components, dsl
from kfp.pipeline_spec import pipeline_spec_pb2

from models.capsnet.recipe import Recipe
from pipeline import configs, evaluation, pipeline as pipeline_module
from tests.kubeflow.conftest import (BUCKET, DATAFLOW_ARGS, DATAFLOW_FLAGS, IMAGE, compile_kfp,
                                     compiled_edges, dependency_edges)

RESOLVER = "latest_blessed_model_resolver"
V2_ENTRYPOINT = ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]


def test_writes_the_pipeline_job_and_the_bare_spec(kfp_compiled):
    assert kfp_compiled.json_path.endswith("pipeline.json")
    assert kfp_compiled.yaml_path.endswith("pipeline.yaml")
    assert set(kfp_compiled.job) == {"displayName", "labels", "pipelineSpec", "runtimeConfig"}
    assert kfp_compiled.job["pipelineSpec"] == kfp_compiled.spec
    assert kfp_compiled.job["runtimeConfig"]["gcsOutputDirectory"] == f"{BUCKET}/root"
    assert kfp_compiled.spec["pipelineInfo"]["name"] == "capsnet-mnist"
    with open(kfp_compiled.yaml_path) as f:
        assert f.readline() == "# PIPELINE DEFINITION\n"


def test_both_files_parse_strictly_as_kfp_protos(kfp_compiled):
    job = json_format.ParseDict(kfp_compiled.job, pipeline_spec_pb2.PipelineJob())
    spec = json_format.ParseDict(kfp_compiled.spec, pipeline_spec_pb2.PipelineSpec())
    assert json_format.MessageToDict(job.pipeline_spec) == kfp_compiled.spec
    assert spec.schema_version == "2.1.0"
    assert spec.sdk_version == "tfx-1.16.0"


def test_every_parameter_is_a_typed_constant(kfp_compiled):
    # Schema 2.1: open-source KFP backends resolve `constant` and check `parameterType`; they
    # reject schema 2.0's `constantValue` / `type`.
    for name, task in kfp_compiled.tasks.items():
        for param in task["inputs"].get("parameters", {}).values():
            assert set(param["runtimeValue"]) == {"constant"}, name
    for component in kfp_compiled.spec["components"].values():
        for param in component.get("inputDefinitions", {}).get("parameters", {}).values():
            assert set(param) == {"parameterType"}


def test_kfp_sdk_loads_the_yaml_and_recompiles_it_inside_a_wrapper(kfp_compiled, tmp_path):
    component = components.load_component_from_file(kfp_compiled.yaml_path)
    assert component.name == "capsnet-mnist"

    @dsl.pipeline(name="wrapper")
    def wrapper():
        component()

    compiler.Compiler().compile(wrapper, str(tmp_path / "wrapper.yaml"))
    with open(tmp_path / "wrapper.yaml") as f:
        wrapped = yaml.safe_load(f)
    assert set(wrapped["components"]["comp-capsnet-mnist"]["dag"]["tasks"]) == set(
        kfp_compiled.tasks)
    assert wrapped["deploymentSpec"]["executors"] == kfp_compiled.executors


def test_one_task_per_component_of_the_local_pipeline_without_the_resolver(
        kfp_compiled, local_pipeline):
    local_ids = {component.id for component in local_pipeline.components}
    assert RESOLVER in local_ids
    assert set(kfp_compiled.tasks) == local_ids - {RESOLVER}
    assert len(kfp_compiled.executors) == len(kfp_compiled.tasks)


def test_dependency_edges_equal_the_local_pipelines(kfp_compiled, local_pipeline):
    local = dependency_edges(local_pipeline)
    assert {edge for edge in local if RESOLVER not in edge} == compiled_edges(kfp_compiled)
    assert ("Transform", "Trainer") in local and ("AnomaliesGate", "Transform") in local


def test_every_step_runs_the_configured_image_through_the_tfx_v2_entrypoint(kfp_compiled):
    for label, executor in kfp_compiled.executors.items():
        assert executor["container"]["image"] == IMAGE, label
        assert executor["container"]["command"] == V2_ENTRYPOINT, label


def test_example_gen_keeps_the_vertex_pre_cache_check_in_the_same_image(kfp_compiled):
    # FileBasedExampleGen's span/fingerprint driver; open-source KFP does not run lifecycle hooks
    # and the executor does not need it (test_run_compiled_task.py runs it without).
    hook = kfp_compiled.executor("MnistExampleGen")["lifecycle"]["preCacheCheck"]
    assert hook["command"] == [
        "python", "-m", "tfx.orchestration.kubeflow.v2.file_based_example_gen.driver"]
    assert [name for name, task in kfp_compiled.tasks.items()
            if "lifecycle" in kfp_compiled.executor(name)] == ["MnistExampleGen"]


def accuracy_thresholds(eval_config) -> list:
    """The MetricThresholds of the accuracy metric, however the config attaches them."""
    found = []
    for spec in eval_config.metrics_specs:
        for metric in spec.metrics:
            if metric.class_name == "SparseCategoricalAccuracy":
                if metric.HasField("threshold"):
                    found.append(metric.threshold)
                found += [t.threshold for t in metric.per_slice_thresholds]
    return found


def compiled_eval_config(compiled):
    return json_format.Parse(compiled.parameter("Evaluator", "eval_config"), tfma.EvalConfig())


def test_evaluator_blesses_on_the_0_4_percent_bar_alone(kfp_compiled):
    eval_config = compiled_eval_config(kfp_compiled)
    n_test = kfp_compiled.config.split_sizes()["test"]
    assert (kfp_compiled.config.max_test_error, n_test) == (0.004, 10000)
    assert eval_config == evaluation.make_eval_config(0.004, n_test, compare_to_baseline=False)
    (threshold,) = accuracy_thresholds(eval_config)
    assert threshold.value_threshold.lower_bound.value == pytest.approx(0.99595, abs=1e-12)
    assert not threshold.HasField("change_threshold")
    assert set(kfp_compiled.tasks["Evaluator"]["inputs"]["artifacts"]) == {"examples", "model"}
    assert json.loads(kfp_compiled.parameter("Evaluator", "example_splits")) == ["test"]


def test_trainer_requests_the_gpus_and_nothing_else_does(kfp_compiled):
    resources = kfp_compiled.executor("Trainer")["resources"]
    assert resources["accelerator"]["type"] == "nvidia.com/gpu"
    assert int(resources["accelerator"]["count"]) == 2
    others = [name for name in kfp_compiled.tasks
              if name != "Trainer" and "resources" in kfp_compiled.executor(name)]
    assert others == []


def test_trainer_runs_the_project_code_by_name_with_the_preset(kfp_compiled):
    assert kfp_compiled.parameter("Trainer", "run_fn") == pipeline_module.RUN_FN
    assert kfp_compiled.parameter("Transform", "preprocessing_fn") == pipeline_module.PREPROCESSING_FN
    full = configs.PRESETS["full"]
    train_args = json.loads(kfp_compiled.parameter("Trainer", "train_args"))
    assert int(train_args["num_steps"]) == full.recipe.epochs * full.train_steps_per_epoch()
    custom_config = json.loads(kfp_compiled.parameter("Trainer", "custom_config"))
    assert Recipe.from_custom_config(custom_config) == full.recipe


def test_beam_args_reach_every_step(kfp_compiled):
    # --beam-runner dataflow: each Beam-based step becomes a Dataflow job whose workers run the
    # pipeline image (--sdk_container_image); the flags compile to the same options everywhere.
    expected = DATAFLOW_ARGS.split()
    for label, executor in kfp_compiled.executors.items():
        assert executor["container"]["args"][-len(expected):] == expected, label
    hook = kfp_compiled.executor("MnistExampleGen")["lifecycle"]["preCacheCheck"]
    assert hook["args"][-len(expected):] == expected


def test_locations_are_the_flags_and_no_path_of_this_checkout_remains(kfp_compiled):
    assert kfp_compiled.parameter("MnistExampleGen", "input_base") == f"{BUCKET}/mnist"
    destination = json.loads(kfp_compiled.parameter("Pusher", "push_destination"))
    assert destination["filesystem"]["base_directory"] == f"{BUCKET}/serving"
    assert kfp_compiled.parameter("ImportSchemaGen", "schema_file") == (
        "/pipeline/pipeline/schema.pbtxt")
    repo_root = str(pipeline_module.REPO_ROOT)
    for path in (kfp_compiled.json_path, kfp_compiled.yaml_path):
        with open(path) as f:
            assert repo_root not in f.read(), path


def test_vertex_target_keeps_the_resolver_and_names_a_vertex_accelerator(tmp_path):
    compiled = compile_kfp(tmp_path, "--target", "vertex", "--image", IMAGE)
    resolver_tasks = {name for name in compiled.tasks if name.startswith(RESOLVER)}
    assert resolver_tasks == {f"{RESOLVER}-model-blessing-resolver",
                              f"{RESOLVER}-model-resolver"}
    assert "baseline_model" in compiled.tasks["Evaluator"]["inputs"]["artifacts"]
    (threshold,) = accuracy_thresholds(compiled_eval_config(compiled))
    assert threshold.HasField("change_threshold")
    assert threshold.value_threshold.lower_bound.value == pytest.approx(0.99595, abs=1e-12)
    assert compiled.executor("Trainer")["resources"]["accelerator"]["type"] == "NVIDIA_TESLA_T4"


def test_vertex_warm_start_feeds_the_resolvers_model_to_the_trainer(tmp_path):
    compiled = compile_kfp(tmp_path, "--target", "vertex", "--image", IMAGE, "--warm-start")
    assert "base_model" in compiled.tasks["Trainer"]["inputs"]["artifacts"]
    plain = compile_kfp(tmp_path / "plain", "--target", "vertex", "--image", IMAGE)
    assert "base_model" not in plain.tasks["Trainer"]["inputs"].get("artifacts", {})


def test_no_gpus_means_no_resource_request_and_caching_follows_the_flag(tmp_path):
    compiled = compile_kfp(tmp_path, "--gpus", "0", "--no-cache", "--image", IMAGE)
    assert "resources" not in compiled.executor("Trainer")
    assert not [name for name, task in compiled.tasks.items() if "cachingOptions" in task]


def test_vertex_trainer_workers_compile_a_vertex_training_job_of_a_chief_and_workers(tmp_path):
    """--trainer-workers 3 on Vertex: the Trainer step runs TFX's Vertex training executor, which
    submits a CustomJob: pool 0 one chief, pool 1 two workers, each replica the pipeline image on
    the machine and accelerators asked for; the step itself requests no GPU. The recipe still
    reads back from the same custom_config, and Beam stays on the local named runner."""
    compiled = compile_kfp(
        tmp_path, "--target", "vertex", "--image", IMAGE, "--trainer-workers", "3",
        "--project", "test-project", "--region", "europe-west4", "--machine-type",
        "n1-standard-16", "--gpus", "2", "--accelerator", "NVIDIA_L4")
    container = compiled.executor("Trainer")
    assert container["args"][:2] == [
        "--executor_class_path", "tfx.extensions.google_cloud_ai_platform.trainer.executor."
        "GenericExecutor"]
    assert "resources" not in container
    custom_config = json.loads(compiled.parameter("Trainer", "custom_config"))
    assert custom_config["ai_platform_enable_vertex"] is True
    assert custom_config["ai_platform_vertex_region"] == "europe-west4"
    training = custom_config["ai_platform_training_args"]
    assert training["project"] == "test-project"
    replica = {"machine_spec": {"machine_type": "n1-standard-16", "accelerator_type": "NVIDIA_L4",
                                "accelerator_count": 2},
               "container_spec": {"image_uri": IMAGE}}
    assert training["job_spec"]["worker_pool_specs"] == [{**replica, "replica_count": 1},
                                                         {**replica, "replica_count": 2}]
    assert Recipe.from_custom_config(custom_config) == configs.PRESETS["full"].recipe
    assert compiled.parameter("Trainer", "run_fn") == pipeline_module.RUN_FN
    for task in ("MnistExampleGen", "StatisticsGen", "Transform", "Evaluator"):
        assert compiled.executor(task)["args"][-3:] == list(configs.LOCAL_BEAM_ARGS), task


def test_robustness_compiles_beside_the_same_product_steps(tmp_path, kfp_compiled):
    """--robustness adds the affine split's steps, the CNN's Trainer (its own GPUs) and the
    robustness Evaluator, with the local pipeline's edges; every product step compiles exactly
    as without the flag; the affine schema is read from the image."""
    from pipeline.pipeline import create_pipeline

    compiled = compile_kfp(
        tmp_path, "--image", IMAGE, "--pipeline-root", f"{BUCKET}/root", "--data-root",
        f"{BUCKET}/mnist", "--serving-dir", f"{BUCKET}/serving", "--gpus", "2",
        *DATAFLOW_FLAGS, "--robustness")
    added = {"AffineExampleGen", "AffineStatisticsGen", "AffineSchemaGen",
             "AffineExampleValidator", "AffineAnomaliesGate", "CnnTrainer",
             "RobustnessEvaluator"}
    assert set(compiled.tasks) == set(kfp_compiled.tasks) | added
    for name in kfp_compiled.tasks:
        assert compiled.tasks[name] == kfp_compiled.tasks[name], name
    local = create_pipeline(configs.PIPELINE_NAME, "/tmp/unused/root", "/tmp/unused/mnist",
                            "/tmp/unused/serving", configs.preset("full"),
                            compare_to_baseline=False, robustness=True)
    assert dependency_edges(local) == compiled_edges(compiled)
    assert int(compiled.executor("CnnTrainer")["resources"]["accelerator"]["count"]) == 2
    assert compiled.parameter("AffineSchemaGen", "schema_file") == \
        "/pipeline/" + pipeline_module.AFFINE_SCHEMA_RELPATH
    assert json.loads(compiled.parameter("RobustnessEvaluator", "example_splits")) == ["affine"]
