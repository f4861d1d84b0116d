"""Runs one compiled step on this machine the way a Kubeflow pod runs it.

The step is MnistExampleGen, the project's own executor: its container command and arguments are
taken from the compiled spec, `{{$}}` is replaced by an ExecutorInput built from the spec as the
KFP driver builds it (input parameters from the task's constants, one output artifact per output
definition under a task directory), and the process runs with the project on PYTHONPATH as in the
image. The pre-cache-check driver is not run, as on open-source KFP, which does not run it.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipeline import configs
from tests.kubeflow.conftest import compile_kfp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = "MnistExampleGen"


def executor_input(compiled, task_name: str, task_root: str) -> dict:
    """The ExecutorInput a KFP driver would hand this task (no upstream artifacts needed)."""
    task = compiled.tasks[task_name]
    component = compiled.spec["components"][task["componentRef"]["name"]]
    assert "artifacts" not in task["inputs"], "this helper only builds tasks without inputs"
    outputs = {
        key: {"artifacts": [{"name": f"{task_name}-{key}", "type": definition["artifactType"],
                             "uri": os.path.join(task_root, key), "metadata": {}}]}
        for key, definition in component["outputDefinitions"]["artifacts"].items()}
    return {"inputs": {"parameterValues": {name: compiled.parameter(task_name, name)
                                           for name in task["inputs"]["parameters"]}},
            "outputs": {"artifacts": outputs,
                        "outputFile": os.path.join(task_root, "executor_output.json")}}


def pod_command(container: dict, invocation: dict) -> list:
    return container["command"] + [json.dumps(invocation) if a == "{{$}}" else a
                                   for a in container["args"]]


@pytest.fixture(scope="module")
def ran_example_gen(tmp_path_factory, mnist_cache_dir):
    out = tmp_path_factory.mktemp("pod")
    # The checkout plays the image: its project dir is the repo, its python the venv's.
    compiled = compile_kfp(
        out / "spec", "--preset", "smoke", "--gpus", "0", "--image", "local/capsnet-tfx:test",
        "--image-project-dir", REPO, "--data-root", mnist_cache_dir,
        "--pipeline-root", str(out / "root"), "--serving-dir", str(out / "serving"),
        f"--beam-args={' '.join(configs.LOCAL_BEAM_ARGS)}")
    task_root = str(out / "root" / TASK)
    invocation = executor_input(compiled, TASK, task_root)
    env = {**os.environ, "PYTHONPATH": REPO,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(pod_command(compiled.executor(TASK), invocation), cwd=str(out),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return invocation, compiled


def test_pod_command_is_the_tfx_v2_entrypoint(ran_example_gen):
    _, compiled = ran_example_gen
    container = compiled.executor(TASK)
    assert container["command"] == [
        "python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]
    assert container["args"][:2] == ["--executor_class_path", "components.mnist_example_gen.Executor"]


def test_compiled_example_gen_writes_the_three_splits(ran_example_gen):
    invocation, compiled = ran_example_gen
    examples_uri = invocation["outputs"]["artifacts"]["examples"]["artifacts"][0]["uri"]
    for split, size in compiled.config.split_sizes().items():
        files = glob.glob(os.path.join(examples_uri, f"Split-{split}", "*.gz"))
        assert files, split
        assert sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP")) == size


def test_executor_output_is_what_the_launcher_reads(ran_example_gen):
    invocation, _ = ran_example_gen
    with open(invocation["outputs"]["outputFile"]) as f:
        output = json_format.Parse(f.read(), pipeline_spec_pb2.ExecutorOutput())
    (artifact,) = output.artifacts["examples"].artifacts
    assert artifact.uri == invocation["outputs"]["artifacts"]["examples"]["artifacts"][0]["uri"]
    assert json.loads(artifact.metadata["split_names"]) == ["train", "valid", "test"]
