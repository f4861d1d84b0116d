"""The one pipeline definition, used by local_runner.py, kubeflow_runner.py and the tests.

MnistExampleGen -> StatisticsGen -> ImportSchemaGen -> ExampleValidator -> AnomaliesGate
  -> Transform -> Trainer (CapsNet) -> [latest blessed model Resolver] -> Evaluator -> Pusher

With `robustness`, beside it and gating nothing (pipeline/robustness.py):
MnistExampleGen's test split -> AffineExampleGen -> AffineStatisticsGen, AffineSchemaGen,
  AffineExampleValidator -> AffineAnomaliesGate
Transform -> CnnTrainer (the paper's baseline CNN)
  -> RobustnessEvaluator (the affine split; the CapsNet as candidate, the CNN as baseline)
"""

import hashlib
import pathlib
from typing import Optional, Sequence

from google.protobuf import message
from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components import atomic_pusher, multi_worker_trainer
from components.affine_example_gen import SPLIT as AFFINE_SPLIT, AffineExampleGen
from components.anomalies_gate import AnomaliesGate
from components.mnist_example_gen import MnistExampleGen
from data.affine import AffineSpec
from models.capsnet.recipe import Recipe
from pipeline import evaluation, robustness as robustness_eval
from pipeline.configs import LOCAL_BEAM_ARGS, LOCAL_BEAM_RUNNER, RunConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA_RELPATH = "pipeline/schema.pbtxt"  # in the project, here and in the pipeline image
SCHEMA_FILE = str(REPO_ROOT / SCHEMA_RELPATH)
AFFINE_SCHEMA_RELPATH = "pipeline/affine_schema.pbtxt"
AFFINE_SCHEMA_FILE = str(REPO_ROOT / AFFINE_SCHEMA_RELPATH)
PREPROCESSING_FN = "models.preprocessing.preprocessing_fn"
RUN_FN = "models.trainer.run_fn"


def local_beam_args(workers: int = 1) -> list:
    """Beam options of the Beam-based components on one machine: Beam's FnApiRunner, named.

    1: in-process (configs.LOCAL_BEAM_ARGS). N > 1: N SDK worker processes
    (`python -m apache_beam.runners.worker.sdk_worker_main`, started and stopped by the runner
    for each Beam pipeline) that the runner drives over gRPC on loopback: the worker harness and
    Fn API protocol that Dataflow Runner v2 and the portable Flink runner use. The workers import
    the project's DoFns by name, so the project must be on their PYTHONPATH.
    """
    if workers < 1:
        raise ValueError(f"Beam workers must be >= 1, got {workers}")
    if workers == 1:
        return list(LOCAL_BEAM_ARGS)
    return [f"--runner={LOCAL_BEAM_RUNNER}", "--direct_running_mode=multi_processing",
            f"--direct_num_workers={workers}"]


def code_fingerprint(*packages: str) -> str:
    """SHA-256 of the .py files of the given packages (relative to the repo root).

    Transform and Trainer get their code by name, and TFX's cache key only sees that name; adding
    this fingerprint to their custom_config makes any edit of the code they run a cache miss.
    """
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    data_root: str,
    serving_dir: str,
    config: RunConfig,
    metadata_connection_config: Optional[metadata_store_pb2.ConnectionConfig] = None,
    beam_pipeline_args: Sequence[str] = (),
    compare_to_baseline: bool = True,
    enable_cache: bool = True,
    trainer_platform_config: Optional[message.Message] = None,
    schema_path: str = SCHEMA_FILE,
    warm_start: bool = False,
    vertex_training: Optional[dict] = None,
    trainer_workers: int = 1,
    robustness: bool = False,
    affine_schema_path: str = AFFINE_SCHEMA_FILE,
) -> tfx.dsl.Pipeline:
    """Builds the pipeline.

    Args:
      pipeline_name: name recorded in ML Metadata.
      pipeline_root: where component outputs go (a local dir, gs://, s3://).
      data_root: directory holding the verified canonical `mnist.npz` (see data.mnist).
      serving_dir: blessed models are pushed to `serving_dir/<version>/`.
      config: the run's recipe (pipeline.configs.RunConfig; presets there).
      metadata_connection_config: ML Metadata store (SQLite locally); None on Kubeflow.
      beam_pipeline_args: for the Beam-based components.
      compare_to_baseline: gate on no regression against the latest blessed model (a Resolver);
        off for orchestrators without resolver support.
      enable_cache: reuse earlier executions whose inputs and code are unchanged.
      trainer_platform_config: orchestrator resources for the Trainer, applied with
        `with_platform_config`; kubeflow_runner.py passes a KFP ResourceSpec that requests GPUs.
        None (local runs): no request.
      schema_path: the checked-in schema as the components will see it: this checkout's by
        default; kubeflow_runner.py passes its path inside the pipeline image.
      warm_start: give the Trainer the latest blessed model as its base_model, to continue
        from its weights (needs the Resolver, as compare_to_baseline does).
      vertex_training: None: the Trainer trains in its own step. Else the custom_config entries
        (ENABLE_VERTEX_KEY, VERTEX_REGION_KEY, TRAINING_ARGS_KEY: a Vertex AI CustomJob) that make
        it the Vertex training Trainer: its step submits that job, every replica of which runs
        the same run_fn (kubeflow_runner.py builds them for --trainer-workers).
      trainer_workers: N > 1: the Trainers train as N worker processes on this machine
        (components/multi_worker_trainer.py: TFX's run_executor entry point, one TF_CONFIG each,
        as Vertex runs it); 1: in the Trainer's own process.
      robustness: add the robustness evaluation (module docstring): the affine split of
        `config.affine`, the CNN trained with `config.baseline` and an Evaluator of both. It
        gates nothing; every other component is the same as without it, with the same cache key.
      affine_schema_path: the robustness split's checked-in schema, as schema_path.
    """
    example_gen = MnistExampleGen(input_base=data_root, valid_size=config.valid_size,
                                  data_fraction=config.data_fraction)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=schema_path)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"])
    anomalies_gate = AnomaliesGate(anomalies=example_validator.outputs["anomalies"])

    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        preprocessing_fn=PREPROCESSING_FN,
        splits_config=tfx.proto.SplitsConfig(analyze=["train"], transform=["train", "valid"]),
        custom_config={"code_fingerprint": code_fingerprint("models")})
    transform.add_upstream_node(anomalies_gate)

    sizes = config.split_sizes()
    # The latest blessed model: the Evaluator's baseline, and the Trainer's base_model when
    # warm-starting (none before the first blessing: the Trainer then trains from scratch).
    resolver = None
    if compare_to_baseline or warm_start:
        resolver = tfx.dsl.Resolver(
            strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
            model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
            model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
        ).with_id("latest_blessed_model_resolver")
    warm = {"base_model": resolver.outputs["model"]} if warm_start else {}
    if trainer_workers > 1 and vertex_training:
        raise ValueError("trainer_workers is for local runs; on Vertex the CustomJob's worker "
                         "pools set the workers")

    def make_trainer(node_id: str, recipe: Recipe, **base_model):
        """A Trainer of `recipe`'s network on the Transform output, with id `node_id`."""
        trainer_class = (tfx.extensions.google_cloud_ai_platform.Trainer if vertex_training
                         else tfx.components.Trainer)
        local_workers = ({"custom_executor_spec": executor_spec.ExecutorClassSpec(
            multi_worker_trainer.Executor)} if trainer_workers > 1 else {})
        trainer = trainer_class(
            run_fn=RUN_FN,
            examples=transform.outputs["transformed_examples"],
            transform_graph=transform.outputs["transform_graph"],
            train_args=tfx.proto.TrainArgs(
                splits=["train"], num_steps=recipe.epochs * config.train_steps_per_epoch(recipe)),
            eval_args=tfx.proto.EvalArgs(splits=["valid"]),  # all of it, every epoch
            **base_model,
            **local_workers,
            custom_config={**recipe.to_custom_config(),
                           "code_fingerprint": code_fingerprint("models"),
                           # Checkpoints a re-run of the same inputs resumes from
                           # (models/trainer.py): under the pipeline root, whatever the run's or
                           # execution's id.
                           "resume_root": f"{pipeline_root.rstrip('/')}/{node_id}/resume",
                           **(vertex_training or {}),
                           **({multi_worker_trainer.WORKERS_KEY: trainer_workers}
                              if trainer_workers > 1 else {})})
        if trainer_platform_config is not None:
            trainer.with_platform_config(trainer_platform_config)
        return trainer if node_id == "Trainer" else trainer.with_id(node_id)

    trainer = make_trainer("Trainer", config.recipe, **warm)

    eval_config = evaluation.make_eval_config(config.max_test_error, sizes["test"],
                                              compare_to_baseline)
    components = [example_gen, statistics_gen, schema_gen, example_validator, anomalies_gate,
                  transform, trainer]
    if resolver is not None:
        components.append(resolver)
    baseline = {"baseline_model": resolver.outputs["model"]} if compare_to_baseline else {}
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        example_splits=["test"],
        eval_config=eval_config,
        **baseline)
    pusher = tfx.components.Pusher(
        custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.Executor),
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_dir)))
    components += [evaluator, pusher]
    if robustness:
        cnn_trainer = make_trainer("CnnTrainer", config.baseline)
        cnn_trainer.add_upstream_node(pusher)  # the product first: judged and pushed, then this
        components += [cnn_trainer, *robustness_components(
            example_gen, trainer.outputs["model"], cnn_trainer.outputs["model"], config.affine,
            affine_schema_path)]

    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args))


def robustness_components(example_gen, capsnet_model: tfx.dsl.Channel,
                          cnn_model: tfx.dsl.Channel, spec: AffineSpec,
                          affine_schema_path: str = AFFINE_SCHEMA_FILE) -> list:
    """The robustness evaluation's components (module docstring) for two Model channels: the
    affine split of `spec` with its statistics, schema, validation and gate, and the Evaluator
    that compares the models on it. No thresholds, no blessing, nothing downstream."""
    affine = AffineExampleGen(examples=example_gen.outputs["examples"], spec=spec)
    examples = affine.outputs["affine_examples"]
    statistics = tfx.components.StatisticsGen(examples=examples).with_id("AffineStatisticsGen")
    schema = tfx.components.ImportSchemaGen(schema_file=affine_schema_path).with_id(
        "AffineSchemaGen")
    validator = tfx.components.ExampleValidator(
        statistics=statistics.outputs["statistics"],
        schema=schema.outputs["schema"]).with_id("AffineExampleValidator")
    gate = AnomaliesGate(anomalies=validator.outputs["anomalies"]).with_id("AffineAnomaliesGate")
    evaluator = tfx.components.Evaluator(
        examples=examples, model=capsnet_model, baseline_model=cnn_model,
        example_splits=[AFFINE_SPLIT],
        eval_config=robustness_eval.make_eval_config()).with_id("RobustnessEvaluator")
    evaluator.add_upstream_node(gate)  # an affine split that breaks its schema is not evaluated
    return [affine, statistics, schema, validator, gate, evaluator]


def create_robustness_pipeline(pipeline_name: str, pipeline_root: str, data_root: str,
                               capsnet_model_uri: str, cnn_model_uri: str, spec: AffineSpec,
                               metadata_connection_config=None,
                               beam_pipeline_args: Sequence[str] = ()) -> tfx.dsl.Pipeline:
    """The robustness evaluation alone, on two trained models instead of two Trainers:
    MnistExampleGen, the robustness components, and an Importer of each model (a Model
    artifact dir: the SavedModel in its Format-Serving/, as a Trainer writes it)."""
    example_gen = MnistExampleGen(input_base=data_root)
    importers = [tfx.dsl.Importer(source_uri=uri, artifact_type=tfx.types.standard_artifacts.Model
                                  ).with_id(node_id)
                 for node_id, uri in (("CapsNetImporter", capsnet_model_uri),
                                      ("CnnImporter", cnn_model_uri))]
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name, pipeline_root=pipeline_root,
        components=[example_gen, *importers, *robustness_components(
            example_gen, importers[0].outputs["result"], importers[1].outputs["result"], spec)],
        enable_cache=True, metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args))
