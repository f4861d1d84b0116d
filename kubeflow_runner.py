"""Compiles the CapsNet MNIST pipeline for Kubeflow Pipelines 2.x (and Vertex AI Pipelines).

The pipeline is the one `pipeline.pipeline.create_pipeline` that local_runner.py runs; this file
only picks KubeflowV2DagRunner, the container image and the cloud locations. One compile writes:

  <output-dir>/pipeline.yaml   the bare PipelineSpec: upload it to open-source Kubeflow Pipelines
  <output-dir>/pipeline.json   the same spec wrapped in a PipelineJob (pipeline root included):
                               the Vertex AI format, and what `tfx pipeline create` stores

Targets (--target):
  kubeflow  open-source KFP 2.x: no latest-blessed-model Resolver (a Vertex-only feature), so the
            Evaluator blesses on the test-error bar alone; GPUs requested as `nvidia.com/gpu`.
  vertex    Vertex AI Pipelines: with the Resolver (no regression against the last blessed
            model); GPUs requested by Vertex accelerator name. With --trainer-workers N > 1 the
            Trainer runs as a Vertex AI training job of N replicas.

Beam (--beam-runner): 'local' runs the Beam-based steps inside their pods on Beam's FnApiRunner;
'dataflow' runs each of them as a Dataflow job whose workers run --image.

Through the TFX CLI (it runs this file with no arguments; pass flags in $CAPSNET_KFP_ARGS):
  CAPSNET_KFP_ARGS="--image gcr.io/P/capsnet-tfx:v1 --pipeline-root gs://B/root ..." \\
    tfx pipeline create --engine vertex --pipeline_path kubeflow_runner.py
(`--engine kubeflow` does not work in TFX 1.16: its KFP v1 runner was removed.)

Every step runs in --image (see Dockerfile): the project's code is baked into it and reached by
name (`models.trainer.run_fn`), so nothing is packaged into the pipeline root at compile time.
Build the image from the same checkout you compile from.
"""

import os
import sys
import time

from pipeline import kubeflow  # light: no TensorFlow


def parse_args(argv):
    """(args, RunConfig) of the command line (pipeline/kubeflow.py defines the flags)."""
    return kubeflow.parse_args(__doc__, argv)


def compile_pipeline(args, config) -> tuple:
    """Compiles to <output-dir>/pipeline.json and pipeline.yaml; returns their paths.

    Under `tfx pipeline create` the CLI redirects pipeline.json to its own directory
    ($VERTEX_HOME or ~/tfx/vertex, then the pipeline name); pipeline.yaml goes beside it.
    """
    import yaml
    from tfx import v1 as tfx

    from pipeline import pipeline as pipeline_module

    tfx_pipeline = pipeline_module.create_pipeline(
        pipeline_name=args.pipeline_name,
        pipeline_root=args.pipeline_root,
        data_root=args.data_root,
        serving_dir=args.serving_dir,
        config=config,
        beam_pipeline_args=args.beam_args,
        compare_to_baseline=args.target == "vertex",
        warm_start=args.warm_start,
        enable_cache=not args.no_cache,
        # With a Vertex training job the GPUs go to its replicas, not to the step submitting it.
        trainer_platform_config=(None if args.trainer_workers > 1
                                 else kubeflow.trainer_resources(args.gpus, args.accelerator)),
        vertex_training=kubeflow.vertex_training(args),
        robustness=args.robustness,
        schema_path=os.path.join(args.image_project_dir, pipeline_module.SCHEMA_RELPATH),
        affine_schema_path=os.path.join(args.image_project_dir,
                                        pipeline_module.AFFINE_SCHEMA_RELPATH))

    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
            default_image=args.image,
            # Schema 2.1: constants as `constant` and typed `parameterType`, which current
            # open-source KFP backends require (they reject 2.0's legacy `constantValue`).
            use_pipeline_spec_2_1=True),
        output_dir=args.output_dir,
        output_filename=kubeflow.PIPELINE_JSON)
    # One run() only: the TFX CLI intercepts it and refuses a second call.
    pipeline_job = runner.run(tfx_pipeline)
    # The CLI's patcher may have moved the output (runner._output_dir is where run() wrote).
    output_dir = getattr(runner, "_output_dir", args.output_dir)
    json_path = os.path.join(output_dir,
                             getattr(runner, "_output_filename", kubeflow.PIPELINE_JSON))
    yaml_path = os.path.join(output_dir, kubeflow.PIPELINE_YAML)
    spec = pipeline_job["pipelineSpec"]
    with open(yaml_path, "w") as f:
        f.write(f"# PIPELINE DEFINITION\n# Name: {spec['pipelineInfo']['name']}\n"
                f"# Compiled by kubeflow_runner.py (target {args.target}) with "
                f"{spec['sdkVersion']}; image {args.image}\n"
                "# The pipeline root is chosen when a run is created.\n")
        yaml.safe_dump(spec, f, sort_keys=True)
    return json_path, yaml_path


def submit(package_path: str, args, client=None) -> dict:
    """Uploads the package to open-source KFP (a new pipeline, or a new version of it) and starts
    a run of that version under --pipeline-root. Returns the ids it created.

    `client` is a kfp.Client; by default one for --endpoint and --namespace.
    """
    if client is None:
        import kfp
        client = kfp.Client(host=args.endpoint, namespace=args.namespace)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(args.pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            package_path, pipeline_name=args.pipeline_name,
            description="CapsNet on MNIST (TFX), compiled by kubeflow_runner.py",
            namespace=args.namespace).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id).pipeline_versions
        version_id = versions[0].pipeline_version_id
    else:
        version_id = client.upload_pipeline_version(
            package_path, pipeline_version_name=f"{args.pipeline_name}-{stamp}",
            pipeline_id=pipeline_id).pipeline_version_id
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id, job_name=f"{args.pipeline_name}-{stamp}",
        pipeline_id=pipeline_id, version_id=version_id, pipeline_root=args.pipeline_root,
        enable_caching=False if args.no_cache else None)
    return {"pipeline_id": pipeline_id, "version_id": version_id,
            "experiment_id": experiment.experiment_id, "run_id": run.run_id}


def main(argv=None) -> int:
    args, config = parse_args(sys.argv[1:] if argv is None else argv)
    for note in kubeflow.storage_notes(args):
        print(f"note: {note}", flush=True)
    started = time.time()
    json_path, yaml_path = compile_pipeline(args, config)
    print(f"Compiled {args.pipeline_name} (target {args.target}, preset {args.preset}, "
          f"image {args.image}, Beam {args.beam_runner}, {args.trainer_workers} Trainer "
          f"replica(s) with {args.gpus} x {args.accelerator} each) "
          f"in {time.time() - started:.0f} s:\n  {yaml_path}\n  {json_path}", flush=True)
    if args.submit:
        ids = submit(yaml_path, args)
        print(f"Submitted: {args.endpoint.rstrip('/')}/#/runs/details/{ids['run_id']} "
              f"(pipeline {ids['pipeline_id']}, version {ids['version_id']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
