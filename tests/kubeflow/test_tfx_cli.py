"""`tfx pipeline create --engine vertex --pipeline_path kubeflow_runner.py` compiles offline.

The run itself is the tfx_cli_create fixture (tests/kubeflow/conftest.py): a subprocess with HOME,
VERTEX_HOME and its working directory in a temp dir, flags in $CAPSNET_KFP_ARGS.
"""

import json
import os

import yaml

from tests.kubeflow.conftest import IMAGE


def test_cli_creates_the_pipeline(tfx_cli_create):
    returncode, stdout, stderr = tfx_cli_create.result()
    assert returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert 'Pipeline "capsnet-mnist" created successfully.' in stdout


def test_cli_stores_both_files_under_its_home_and_writes_nothing_else(tfx_cli_create):
    tfx_cli_create.result()
    pipeline_dir = os.path.join(tfx_cli_create.vertex_home, "capsnet-mnist")
    assert sorted(os.listdir(pipeline_dir)) == ["pipeline.json", "pipeline.yaml"]
    # Only HOME was written to: not the working dir, not $CAPSNET_OUTPUT_DIR.
    assert os.listdir(tfx_cli_create.tmp_dir) == ["home"]


def test_cli_compile_uses_the_flags_from_the_environment(tfx_cli_create):
    tfx_cli_create.result()
    pipeline_dir = os.path.join(tfx_cli_create.vertex_home, "capsnet-mnist")
    with open(os.path.join(pipeline_dir, "pipeline.json")) as f:
        job = json.load(f)
    with open(os.path.join(pipeline_dir, "pipeline.yaml")) as f:
        assert yaml.safe_load(f) == job["pipelineSpec"]
    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    assert int(executors["Trainer_executor"]["container"]["resources"]["accelerator"]["count"]) == 3
    assert "latest_blessed_model_resolver" not in str(job["pipelineSpec"]["root"])
