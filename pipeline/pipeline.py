"""The one pipeline definition, used by local_runner.py, kubeflow_runner.py and the tests.

MnistExampleGen -> StatisticsGen -> ImportSchemaGen -> ExampleValidator -> AnomaliesGate
  -> Transform -> Trainer (CapsNet) -> [latest blessed model Resolver] -> Evaluator -> Pusher
"""

import hashlib
import pathlib
from typing import Optional, Sequence

from google.protobuf import message
from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components import atomic_pusher, multi_worker_trainer
from components.anomalies_gate import AnomaliesGate
from components.mnist_example_gen import MnistExampleGen
from pipeline import evaluation
from pipeline.configs import LOCAL_BEAM_ARGS, LOCAL_BEAM_RUNNER, RunConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA_RELPATH = "pipeline/schema.pbtxt"  # in the project, here and in the pipeline image
SCHEMA_FILE = str(REPO_ROOT / SCHEMA_RELPATH)
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
      trainer_workers: N > 1: the Trainer trains as N worker processes on this machine
        (components/multi_worker_trainer.py: TFX's run_executor entry point, one TF_CONFIG each,
        as Vertex runs it); 1: in the Trainer's own process.
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
    trainer_class = (tfx.extensions.google_cloud_ai_platform.Trainer if vertex_training
                     else tfx.components.Trainer)
    if trainer_workers > 1 and vertex_training:
        raise ValueError("trainer_workers is for local runs; on Vertex the CustomJob's worker "
                         "pools set the workers")
    local_workers = ({"custom_executor_spec": executor_spec.ExecutorClassSpec(
        multi_worker_trainer.Executor)} if trainer_workers > 1 else {})
    trainer = trainer_class(
        run_fn=RUN_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        train_args=tfx.proto.TrainArgs(
            splits=["train"], num_steps=config.recipe.epochs * config.train_steps_per_epoch()),
        eval_args=tfx.proto.EvalArgs(splits=["valid"]),  # all of it, every epoch
        **warm,
        **local_workers,
        custom_config={**config.recipe.to_custom_config(),
                       "code_fingerprint": code_fingerprint("models"),
                       # Checkpoints a re-run of the same inputs resumes from (models/trainer.py):
                       # under the pipeline root, whatever the run's or execution's id.
                       "resume_root": f"{pipeline_root.rstrip('/')}/Trainer/resume",
                       **(vertex_training or {}),
                       **({multi_worker_trainer.WORKERS_KEY: trainer_workers}
                          if trainer_workers > 1 else {})})
    if trainer_platform_config is not None:
        trainer.with_platform_config(trainer_platform_config)

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

    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=components,
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(beam_pipeline_args))
