"""Offline compiles of kubeflow_runner.py, shared by the Kubeflow tests (no cluster, no Docker)."""

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Dict
from unittest import mock

import pytest
import yaml

import kubeflow_runner
from pipeline import kubeflow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "registry.example.com/capsnet-tfx:test"
BUCKET = "gs://test-bucket/capsnet"
DATAFLOW_FLAGS = ("--beam-runner", "dataflow", "--project", "test-project",
                  "--region", "europe-west4", "--temp-location", f"{BUCKET}/beam-tmp")
# What DATAFLOW_FLAGS must compile to on every Beam-based step.
DATAFLOW_ARGS = ("--runner=DataflowRunner --project=test-project --region=europe-west4 "
                 f"--temp_location={BUCKET}/beam-tmp --sdk_container_image={IMAGE}")


@dataclasses.dataclass
class Compiled:
    """One compile: the files it wrote, their parsed contents and the parsed command line."""
    json_path: str
    yaml_path: str
    job: Dict[str, Any]     # pipeline.json: the PipelineJob
    spec: Dict[str, Any]    # pipeline.yaml: the PipelineSpec
    args: Any
    config: Any

    @property
    def tasks(self) -> Dict[str, Any]:
        return self.spec["root"]["dag"]["tasks"]

    @property
    def executors(self) -> Dict[str, Any]:
        return self.spec["deploymentSpec"]["executors"]

    def executor(self, task_name: str) -> Dict[str, Any]:
        component = self.spec["components"][self.tasks[task_name]["componentRef"]["name"]]
        return self.executors[component["executorLabel"]]["container"]

    def parameter(self, task_name: str, name: str):
        return self.tasks[task_name]["inputs"]["parameters"][name]["runtimeValue"]["constant"]


def parse_flags(*flags):
    """kubeflow_runner.parse_args, ignoring any $CAPSNET_KFP_ARGS of the calling shell."""
    with mock.patch.dict(os.environ):
        os.environ.pop(kubeflow.ARGS_ENV, None)
        return kubeflow_runner.parse_args(list(flags))


def compile_kfp(out_dir, *flags) -> Compiled:
    args, config = parse_flags("--output-dir", str(out_dir), *flags)
    json_path, yaml_path = kubeflow_runner.compile_pipeline(args, config)
    with open(json_path) as f:
        job = json.load(f)
    with open(yaml_path) as f:
        spec = yaml.safe_load(f)
    return Compiled(json_path, yaml_path, job, spec, args, config)


class TfxCliCreate:
    """`tfx pipeline create --engine vertex --pipeline_path kubeflow_runner.py`, run in a
    subprocess confined to a temp dir: HOME and VERTEX_HOME (where the CLI stores pipelines) and
    the working directory are in it; flags reach the runner through $CAPSNET_KFP_ARGS.

    Started on construction, awaited by result(): meanwhile the tests go on.
    """

    FLAGS = f"--image {IMAGE} --pipeline-root {BUCKET}/root --preset smoke --gpus 3"

    def __init__(self, tmp_dir):
        self.tmp_dir = str(tmp_dir)
        self.home = os.path.join(self.tmp_dir, "home")
        self.vertex_home = os.path.join(self.home, "vertex")
        os.makedirs(self.home)
        venv_bin = os.path.dirname(sys.executable)
        tfx_cli = os.path.join(venv_bin, "tfx")
        command = ([tfx_cli] if os.path.exists(tfx_cli)
                   else [sys.executable, "-m", "tfx.tools.cli.cli_main"])
        env = {**os.environ, "HOME": self.home, "VERTEX_HOME": self.vertex_home,
               # the CLI shells out to `pip freeze` to find kfp: the venv's pip
               "PATH": venv_bin + os.pathsep + os.environ["PATH"],
               "CAPSNET_OUTPUT_DIR": os.path.join(self.tmp_dir, "outputs"),
               kubeflow.ARGS_ENV: self.FLAGS}
        env.pop("XDG_CACHE_HOME", None)
        env.pop("MNIST_CACHE_DIR", None)
        self._proc = subprocess.Popen(
            command + ["pipeline", "create", "--engine", "vertex",
                       "--pipeline_path", os.path.join(REPO, "kubeflow_runner.py")],
            cwd=self.tmp_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self._result = None

    def result(self):
        """(returncode, stdout, stderr), waiting for the CLI to finish."""
        if self._result is None:
            stdout, stderr = self._proc.communicate(timeout=300)
            self._result = (self._proc.returncode, stdout, stderr)
        return self._result

    def stop(self):
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


@pytest.fixture(scope="session")
def tfx_cli_create(tmp_path_factory):
    cli = TfxCliCreate(tmp_path_factory.mktemp("tfx_cli"))
    yield cli
    cli.stop()


@pytest.fixture(scope="session")
def kfp_compiled(tmp_path_factory, tfx_cli_create) -> Compiled:
    """The open-source Kubeflow variant, full preset, 2 GPUs, Beam on Dataflow.

    Requests tfx_cli_create so that the CLI's subprocess overlaps this process's TFX import.
    """
    return compile_kfp(
        tmp_path_factory.mktemp("kfp"), "--image", IMAGE, "--pipeline-root", f"{BUCKET}/root",
        "--data-root", f"{BUCKET}/mnist", "--serving-dir", f"{BUCKET}/serving", "--gpus", "2",
        *DATAFLOW_FLAGS)


@pytest.fixture(scope="session")
def local_pipeline():
    """The pipeline exactly as local_runner.py builds it (with the Resolver)."""
    from pipeline import configs
    from pipeline.pipeline import create_pipeline

    return create_pipeline(pipeline_name=configs.PIPELINE_NAME, pipeline_root="/tmp/unused/root",
                           data_root="/tmp/unused/mnist", serving_dir="/tmp/unused/serving",
                           config=configs.preset("full"),
                           beam_pipeline_args=configs.LOCAL_BEAM_ARGS)


def dependency_edges(tfx_pipeline) -> set:
    """{(upstream id, downstream id)} of a TFX pipeline object."""
    return {(up.id, node.id) for node in tfx_pipeline.components for up in node.upstream_nodes}


def compiled_edges(compiled: Compiled) -> set:
    """{(upstream task, downstream task)} of a compiled spec."""
    return {(up, name) for name, task in compiled.tasks.items()
            for up in task.get("dependentTasks", [])}
