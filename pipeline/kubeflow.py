"""kubeflow_runner.py's command line and what it builds from it: the parser, the checks of the
flags that scale the pipeline out (Dataflow, a multi-worker Vertex training job), the Beam
options, the Vertex AI training job of a multi-worker Trainer, and the Trainer's GPU request.
Importing this module loads no TensorFlow.
"""

import argparse
import os
import re
import shlex

from pipeline import cli, configs

ARGS_ENV = "CAPSNET_KFP_ARGS"
PLACEHOLDER_IMAGE = "gcr.io/YOUR_PROJECT/capsnet-tfx:latest"
PLACEHOLDER_BUCKET = "gs://YOUR_BUCKET/capsnet-tfx"
# Where the Dockerfile puts the project inside the image (WORKDIR, on PYTHONPATH).
IMAGE_PROJECT_DIR = "/pipeline"
PIPELINE_JSON = "pipeline.json"
PIPELINE_YAML = "pipeline.yaml"
# Kubernetes extended resource for the Trainer's GPUs on open-source KFP (the KFP driver puts the
# accelerator type verbatim into the pod's resource limits); Vertex names accelerator models.
DEFAULT_ACCELERATOR = {"kubeflow": "nvidia.com/gpu", "vertex": "NVIDIA_TESLA_T4"}
# Vertex machine of each Trainer replica when training on several (takes up to 4 T4s).
DEFAULT_MACHINE_TYPE = "n1-standard-8"
BEAM_RUNNERS = ("local", "dataflow")
# KFP v2 refuses other pipeline names (tfx/orchestration/kubeflow/v2/pipeline_builder.py).
_KFP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The parser of kubeflow_runner.py, whose docstring is `description`."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(DEFAULT_ACCELERATOR), default="kubeflow",
                   help="orchestrator the spec is for: 'kubeflow' (open-source KFP 2.x, no "
                        "Resolver) or 'vertex' (Vertex AI, with the Resolver). Default: kubeflow")
    p.add_argument("--image", default=PLACEHOLDER_IMAGE,
                   help="container image of every step, built from ./Dockerfile and pushed where "
                        f"the cluster can pull it. Default: {PLACEHOLDER_IMAGE} (a placeholder)")
    p.add_argument("--pipeline-root", default=f"{PLACEHOLDER_BUCKET}/pipeline_root",
                   help="where the steps write their outputs: gs://..., s3://... (the image then "
                        "needs tensorflow-io, see README) or a path every pod mounts. Stored in "
                        "pipeline.json; for pipeline.yaml it is given when the run is created "
                        f"(--submit does). Default: {PLACEHOLDER_BUCKET}/pipeline_root")
    p.add_argument("--data-root", default=f"{PLACEHOLDER_BUCKET}/mnist",
                   help="directory the pods can read holding the verified mnist.npz (upload "
                        "~/.cache/capsnet_tfx/mnist/mnist.npz there). "
                        f"Default: {PLACEHOLDER_BUCKET}/mnist")
    p.add_argument("--serving-dir", default=f"{PLACEHOLDER_BUCKET}/serving_model",
                   help="blessed models are pushed to <serving-dir>/<version>/. "
                        f"Default: {PLACEHOLDER_BUCKET}/serving_model")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs requested for the Trainer; MirroredStrategy trains on all of them. "
                        "0: no request (train on CPU). Default: 1")
    p.add_argument("--accelerator",
                   help="accelerator type of the GPU request. Default: 'nvidia.com/gpu' for "
                        "kubeflow (a Kubernetes resource name), 'NVIDIA_TESLA_T4' for vertex")
    p.add_argument("--trainer-workers", type=int, default=1, metavar="N",
                   help="Trainer replicas. N > 1 needs --target vertex (open-source KFP has no "
                        "multi-worker Trainer in TFX), --project and --region: the Trainer step "
                        "then submits a Vertex AI training job of a chief and N-1 workers, each "
                        "a --machine-type with --gpus x --accelerator, running --image. "
                        "Default: 1 (trains in its own step)")
    p.add_argument("--machine-type",
                   help="Vertex machine type of each Trainer replica (--trainer-workers > 1 "
                        f"only). Default: {DEFAULT_MACHINE_TYPE}")
    p.add_argument("--beam-runner", choices=BEAM_RUNNERS, default="local",
                   help="where the Beam-based steps (ExampleGen, StatisticsGen, Transform, "
                        "Evaluator) run: 'local' (Beam's FnApiRunner inside their pods) or "
                        "'dataflow' (a Dataflow job per step, its workers running --image; needs "
                        "--project, --region, --temp-location). Default: local")
    p.add_argument("--project", help="Google Cloud project of the Dataflow jobs and the Vertex "
                                     "training job (no default)")
    p.add_argument("--region", help="Google Cloud region of the Dataflow jobs and the Vertex "
                                    "training job, e.g. europe-west4 (no default)")
    p.add_argument("--temp-location",
                   help="gs:// directory for Dataflow's temporary and staging files "
                        "(--beam-runner dataflow; no default)")
    p.add_argument("--beam-args",
                   help="Beam pipeline options, as one string after '=' (--beam-args='...'). "
                        "With --beam-runner local they replace the default "
                        f"'{' '.join(configs.LOCAL_BEAM_ARGS)}'; with dataflow they are added "
                        "after the Dataflow options (e.g. '--max_num_workers=20'). Default: none")
    p.add_argument("--pipeline-name", default=configs.PIPELINE_NAME.replace("_", "-"),
                   help="KFP pipeline name, [a-z0-9][a-z0-9-]* (default: %(default)s)")
    p.add_argument("--output-dir", default=os.path.join(configs.default_output_dir(), "kubeflow"),
                   help="where pipeline.json and pipeline.yaml are written "
                        "(default: $CAPSNET_OUTPUT_DIR/kubeflow or ./outputs/kubeflow)")
    p.add_argument("--image-project-dir", default=IMAGE_PROJECT_DIR,
                   help="the project's directory inside the image (the Dockerfile's WORKDIR); "
                        "files the pipeline names by path, like the schema, are looked up there. "
                        f"Default: {IMAGE_PROJECT_DIR}")
    p.add_argument("--no-cache", action="store_true",
                   help="compile (and submit) with step caching off (default: caching on)")
    p.add_argument("--warm-start", action="store_true",
                   help="the Trainer starts from the weights of the latest blessed model "
                        "(through the Resolver: --target vertex only). Default: off")
    p.add_argument("--submit", action="store_true",
                   help="after compiling, upload pipeline.yaml to the open-source KFP at "
                        "--endpoint and start a run (kfp SDK; needs the cluster reachable). "
                        "Default: compile only")
    p.add_argument("--endpoint",
                   help="KFP API endpoint for --submit (no default), e.g. http://localhost:8080 "
                        "after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`")
    p.add_argument("--experiment", default="capsnet",
                   help="KFP experiment of the submitted run (default: %(default)s)")
    p.add_argument("--namespace",
                   help="Kubeflow profile namespace for --submit (multi-user installs; "
                        "default: the client's)")
    cli.add_run_flags(p, default_preset="full")
    return p


def parse_args(description: str, argv):
    """(args, RunConfig) from the flags in $CAPSNET_KFP_ARGS followed by argv (argv wins)."""
    p = build_parser(description)
    env_flags = shlex.split(os.environ.get(ARGS_ENV, ""))
    args = p.parse_args(env_flags + list(argv))
    config = cli.run_config(p, args)
    args.accelerator = args.accelerator or DEFAULT_ACCELERATOR[args.target]
    args.beam_args = shlex.split(args.beam_args or "")
    problems = _problems(args)
    if problems:
        p.error("; ".join(problems))
    args.beam_args = beam_pipeline_args(args)
    args.machine_type = args.machine_type or DEFAULT_MACHINE_TYPE
    return args, config


def _problems(args) -> list:
    """What is wrong with a parsed command line, as messages (empty when nothing is)."""
    problems = []
    if args.gpus < 0:
        problems.append(f"--gpus must be >= 0, got {args.gpus}")
    if not _KFP_NAME.fullmatch(args.pipeline_name):
        problems.append(f"--pipeline-name must match [a-z0-9][a-z0-9-]{{0,127}}, "
                        f"got {args.pipeline_name!r}")
    bad_beam = [a for a in args.beam_args if not a.startswith("--")]
    if bad_beam:
        problems.append(f"--beam-args takes --option=value words, got {bad_beam}")
    if not args.image:
        problems.append("--image is empty")
    if not os.path.isabs(args.image_project_dir):
        problems.append(f"--image-project-dir must be absolute, got {args.image_project_dir!r}")
    problems += _scale_out_problems(args)
    if args.warm_start and args.target != "vertex":
        problems.append("--warm-start needs the latest-blessed-model Resolver, which only "
                        "--target vertex compiles")
    if args.endpoint and not args.submit:
        problems.append("--endpoint is only used with --submit")
    if args.submit:
        if not args.endpoint:
            problems.append("--submit needs --endpoint (the KFP API, e.g. http://localhost:8080)")
        if args.target != "kubeflow":
            problems.append("--submit uploads to open-source KFP (--target kubeflow); for Vertex "
                            "use `tfx run create --engine vertex` or the Vertex console")
        placeholders = [f"--{name.replace('_', '-')}" for name in
                        ("image", "pipeline_root", "data_root", "serving_dir")
                        if "YOUR_" in getattr(args, name)]
        if placeholders:
            problems.append(f"--submit with placeholder values: set {', '.join(placeholders)}")
    return problems


def _scale_out_problems(args) -> list:
    """What is wrong with the flags that put Beam on Dataflow or the Trainer on several
    machines, as messages."""
    problems = []
    vertex_job = args.trainer_workers > 1
    dataflow = args.beam_runner == "dataflow"
    if args.trainer_workers < 1:
        problems.append(f"--trainer-workers must be >= 1, got {args.trainer_workers}")
    if vertex_job and args.target != "vertex":
        problems.append(
            "--trainer-workers > 1 needs --target vertex: TFX 1.16 trains on several machines "
            "only as a Vertex AI training job (tfx.extensions.google_cloud_ai_platform.Trainer); "
            "it has no Kubeflow TFJob/Training Operator integration, and a KFP step is one pod")
    if args.machine_type and not vertex_job:
        problems.append("--machine-type is only used with --trainer-workers > 1")
    if args.temp_location and not dataflow:
        problems.append("--temp-location is only used with --beam-runner dataflow")
    # (with the wrong target, the target is the one thing to fix for the Trainer)
    needs = [what for what, used in (("--beam-runner dataflow", dataflow),
                                     ("--trainer-workers > 1",
                                      vertex_job and args.target == "vertex")) if used]
    for flag in ("project", "region"):
        if needs and not getattr(args, flag):
            problems.append(f"{' and '.join(needs)} needs --{flag}")
        if not (dataflow or vertex_job) and getattr(args, flag):
            problems.append(f"--{flag} is only used with --beam-runner dataflow or "
                            "--trainer-workers > 1")
    if dataflow:
        if not args.temp_location:
            problems.append("--beam-runner dataflow needs --temp-location (a gs:// directory)")
        elif not args.temp_location.startswith("gs://"):
            problems.append(f"--temp-location must be a gs:// directory for Dataflow, "
                            f"got {args.temp_location!r}")
        runners = [a for a in args.beam_args if a.startswith("--runner")]
        if runners:
            problems.append(f"--beam-args {runners} conflicts with --beam-runner dataflow")
    return problems


def beam_pipeline_args(args) -> list:
    """The Beam options of every Beam-based step: the local named runner (or --beam-args in its
    place), or Dataflow's followed by --beam-args.

    Dataflow runs each step's Beam pipeline as a job; its workers start --image (the pipeline
    image, which holds Beam's worker boot files and the project's code that the DoFns need).
    """
    if args.beam_runner == "local":
        return args.beam_args or list(configs.LOCAL_BEAM_ARGS)
    return ["--runner=DataflowRunner", f"--project={args.project}", f"--region={args.region}",
            f"--temp_location={args.temp_location}", f"--sdk_container_image={args.image}",
            *args.beam_args]


def vertex_training(args):
    """The Trainer's custom_config entries that make it a Vertex AI training job of
    --trainer-workers replicas (pipeline.create_pipeline's vertex_training), or None for one.

    The CustomJob has two worker pools: pool 0 is the chief (1 replica), pool 1 the other
    workers; Vertex sets TF_CONFIG in each replica and TFX runs the same run_fn in all of them.
    Every replica is a --machine-type with --gpus x --accelerator running --image.
    """
    if args.trainer_workers == 1:
        return None
    from tfx import v1 as tfx

    cloud = tfx.extensions.google_cloud_ai_platform
    machine = {"machine_type": args.machine_type}
    if args.gpus:
        machine.update(accelerator_type=args.accelerator, accelerator_count=args.gpus)

    def pool(replicas):
        return {"machine_spec": machine, "replica_count": replicas,
                "container_spec": {"image_uri": args.image}}

    return {cloud.ENABLE_VERTEX_KEY: True,
            cloud.VERTEX_REGION_KEY: args.region,
            cloud.TRAINING_ARGS_KEY: {
                "project": args.project,
                "job_spec": {"worker_pool_specs": [pool(1), pool(args.trainer_workers - 1)]}}}


def storage_notes(args) -> list:
    """Warnings about locations the stock image or the target cannot use as they are."""
    notes = []
    paths = {"--pipeline-root": args.pipeline_root, "--data-root": args.data_root,
             "--serving-dir": args.serving_dir}
    for flag, path in paths.items():
        if path.startswith("s3://"):
            notes.append(f"{flag} {path}: TensorFlow 2.16 reads s3:// only with tensorflow-io; "
                         "build the image with EXTRA_PACKAGES (see README)")
        elif "://" not in path:
            notes.append(f"{flag} {path}: a plain path works only if every pod mounts the same "
                         "volume there (see README, 'Run on Kubeflow')")
    return notes


def trainer_resources(gpus: int, accelerator: str):
    """The Trainer's KFP ResourceSpec: `gpus` accelerators of the given type; None for 0."""
    if gpus == 0:
        return None
    from kfp.pipeline_spec import pipeline_spec_pb2

    resource_spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec
    return resource_spec(accelerator=resource_spec.AcceleratorConfig(type=accelerator, count=gpus))
