"""kubeflow_runner.py's command line and its submission call (no TFX import, no cluster)."""

import os
import types

import pytest

import kubeflow_runner
from pipeline import kubeflow
from pipeline import configs
from tests.kubeflow.conftest import DATAFLOW_FLAGS, parse_flags

READY = ["--image", "gcr.io/p/capsnet-tfx:v1", "--pipeline-root", "gs://b/root",
         "--data-root", "gs://b/mnist", "--serving-dir", "gs://b/serving"]


def test_defaults_target_open_source_kubeflow_with_one_gpu():
    args, config = parse_flags()
    assert (args.target, args.gpus, args.accelerator) == ("kubeflow", 1, "nvidia.com/gpu")
    assert args.beam_args == list(configs.LOCAL_BEAM_ARGS)
    assert args.beam_args[0] == "--runner=FnApiRunner"  # named: never Beam's Prism download
    assert (args.beam_runner, args.trainer_workers) == ("local", 1)
    assert args.pipeline_name == "capsnet-mnist"
    assert args.image == kubeflow.PLACEHOLDER_IMAGE
    assert args.image_project_dir == "/pipeline"
    assert config == configs.PRESETS["full"]
    assert not args.submit and not args.no_cache


def test_vertex_target_defaults_to_a_vertex_accelerator_name():
    args, _ = parse_flags("--target", "vertex")
    assert args.accelerator == "NVIDIA_TESLA_T4"
    args, _ = parse_flags("--target", "vertex", "--accelerator", "NVIDIA_L4", "--gpus", "4")
    assert (args.accelerator, args.gpus) == ("NVIDIA_L4", 4)


def test_preset_and_beam_args():
    args, config = parse_flags("--preset", "smoke",
                               "--beam-args=--runner=FlinkRunner --flink_master=flink:8081")
    assert config == configs.PRESETS["smoke"]
    assert args.beam_args == ["--runner=FlinkRunner", "--flink_master=flink:8081"]


def test_dataflow_options_name_the_pipeline_image_and_take_extra_beam_args_after_them():
    args, _ = parse_flags("--image", "gcr.io/p/capsnet-tfx:v1", *DATAFLOW_FLAGS,
                          "--beam-args=--max_num_workers=20 --machine_type=n2-standard-4")
    assert args.beam_args == [
        "--runner=DataflowRunner", "--project=test-project", "--region=europe-west4",
        "--temp_location=gs://test-bucket/capsnet/beam-tmp",
        "--sdk_container_image=gcr.io/p/capsnet-tfx:v1",
        "--max_num_workers=20", "--machine_type=n2-standard-4"]


def test_flags_from_the_environment_come_first_and_argv_overrides_them(monkeypatch):
    monkeypatch.setenv(kubeflow.ARGS_ENV, "--image env/image:1 --gpus 4 --preset smoke")
    args, config = kubeflow_runner.parse_args(["--gpus", "2"])
    assert (args.image, args.gpus, config) == ("env/image:1", 2, configs.PRESETS["smoke"])


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "-1"], "--gpus must be >= 0"),
    (["--pipeline-name", "capsnet_mnist"], "--pipeline-name must match"),
    (["--beam-args=DataflowRunner"], "--beam-args takes --option=value words"),
    (["--image-project-dir", "pipeline"], "--image-project-dir must be absolute"),
    (["--endpoint", "http://kfp"], "--endpoint is only used with --submit"),
    (["--submit", *READY], "--submit needs --endpoint"),
    (["--submit", "--endpoint", "http://kfp", "--target", "vertex", *READY],
     "--submit uploads to open-source KFP"),
    (["--submit", "--endpoint", "http://kfp", "--pipeline-root", "gs://b/root"],
     "placeholder values: set --image, --data-root, --serving-dir"),
    (["--preset", "huge"], "invalid choice"),
    (["--warm-start"], "--warm-start needs the latest-blessed-model Resolver"),
    (["--trainer-workers", "2"], "--trainer-workers > 1 needs --target vertex: TFX 1.16 trains "
                                 "on several machines only as a Vertex AI training job"),
    (["--trainer-workers", "2"], "no Kubeflow TFJob/Training Operator integration"),
    (["--trainer-workers", "0"], "--trainer-workers must be >= 1, got 0"),
    (["--target", "vertex", "--trainer-workers", "2"], "--trainer-workers > 1 needs --project"),
    (["--target", "vertex", "--trainer-workers", "2", "--project", "p"],
     "--trainer-workers > 1 needs --region"),
    (["--machine-type", "n1-standard-4"], "--machine-type is only used with --trainer-workers"),
    (["--beam-runner", "dataflow", "--region", "r", "--temp-location", "gs://b/t"],
     "--beam-runner dataflow needs --project"),
    (["--beam-runner", "dataflow", "--project", "p", "--region", "r"],
     "--beam-runner dataflow needs --temp-location"),
    (["--beam-runner", "dataflow", "--project", "p", "--region", "r", "--temp-location",
      "/tmp/beam"], "--temp-location must be a gs:// directory for Dataflow, got '/tmp/beam'"),
    ([*DATAFLOW_FLAGS, "--beam-args=--runner=FlinkRunner"],
     "--beam-args ['--runner=FlinkRunner'] conflicts with --beam-runner dataflow"),
    (["--project", "p"], "--project is only used with --beam-runner dataflow or"),
    (["--temp-location", "gs://b/t"], "--temp-location is only used with --beam-runner dataflow"),
    (["--beam-runner", "spark"], "invalid choice"),
])
def test_bad_command_lines_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(*flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "tfx pipeline create --engine vertex --pipeline_path kubeflow_runner.py" in out
    assert "--preset {smoke,full}" in out and "--robustness" in out and "--epochs" in out
    for action in kubeflow.build_parser(kubeflow_runner.__doc__)._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in out
        assert "default" in action.help.lower(), action.dest


def test_storage_notes_flag_locations_the_stock_image_cannot_use():
    args, _ = parse_flags("--pipeline-root", "s3://b/root", "--data-root", "/mnt/data/mnist")
    notes = kubeflow.storage_notes(args)
    assert len(notes) == 2
    assert "s3://b/root" in notes[0] and "tensorflow-io" in notes[0]
    assert "/mnt/data/mnist" in notes[1] and "every pod mounts" in notes[1]
    assert kubeflow.storage_notes(parse_flags(*READY)[0]) == []


class FakeKfpClient:
    """Records the kfp.Client calls submit() makes; `existing` is the pipeline id already there."""

    def __init__(self, existing=None):
        self.existing = existing
        self.calls = []

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))

    def get_pipeline_id(self, name):
        self._record("get_pipeline_id", name)
        return self.existing

    def upload_pipeline(self, path, **kwargs):
        self._record("upload_pipeline", path, **kwargs)
        return types.SimpleNamespace(pipeline_id="p-new")

    def list_pipeline_versions(self, pipeline_id):
        self._record("list_pipeline_versions", pipeline_id)
        return types.SimpleNamespace(
            pipeline_versions=[types.SimpleNamespace(pipeline_version_id="v-first")])

    def upload_pipeline_version(self, path, **kwargs):
        self._record("upload_pipeline_version", path, **kwargs)
        return types.SimpleNamespace(pipeline_version_id="v-next")

    def create_experiment(self, name, **kwargs):
        self._record("create_experiment", name, **kwargs)
        return types.SimpleNamespace(experiment_id="e-1")

    def run_pipeline(self, **kwargs):
        self._record("run_pipeline", **kwargs)
        return types.SimpleNamespace(run_id="r-1")


def submit_args(*extra):
    return parse_flags("--submit", "--endpoint", "http://localhost:8080", *READY, *extra)[0]


def test_submit_uploads_a_new_pipeline_and_runs_its_version():
    client = FakeKfpClient()
    ids = kubeflow_runner.submit("/out/pipeline.yaml", submit_args("--namespace", "team"),
                                 client=client)
    assert ids == {"pipeline_id": "p-new", "version_id": "v-first", "experiment_id": "e-1",
                   "run_id": "r-1"}
    names = [name for name, _, _ in client.calls]
    assert names == ["get_pipeline_id", "upload_pipeline", "list_pipeline_versions",
                     "create_experiment", "run_pipeline"]
    _, (path,), upload = client.calls[1]
    assert (path, upload["pipeline_name"], upload["namespace"]) == (
        "/out/pipeline.yaml", "capsnet-mnist", "team")
    _, _, run = client.calls[-1]
    assert (run["pipeline_id"], run["version_id"], run["experiment_id"]) == ("p-new", "v-first",
                                                                             "e-1")
    # pipeline.yaml carries no pipeline root: the run gets it
    assert run["pipeline_root"] == "gs://b/root"
    assert run["enable_caching"] is None


def test_submit_adds_a_version_to_an_existing_pipeline():
    client = FakeKfpClient(existing="p-old")
    ids = kubeflow_runner.submit("/out/pipeline.yaml", submit_args("--no-cache", "--experiment",
                                                                   "nightly"), client=client)
    assert (ids["pipeline_id"], ids["version_id"]) == ("p-old", "v-next")
    names = [name for name, _, _ in client.calls]
    assert "upload_pipeline" not in names
    _, _, version = client.calls[names.index("upload_pipeline_version")]
    assert version["pipeline_id"] == "p-old"
    assert version["pipeline_version_name"].startswith("capsnet-mnist-")
    assert client.calls[names.index("create_experiment")][1] == ("nightly",)
    assert client.calls[-1][2]["enable_caching"] is False


def test_main_compiles_then_submits_the_yaml(monkeypatch, tmp_path, capsys):
    submitted = {}

    def fake_compile(args, config):
        return str(tmp_path / "pipeline.json"), str(tmp_path / "pipeline.yaml")

    def fake_submit(path, args, client=None):
        submitted.update(path=path, endpoint=args.endpoint)
        return {"pipeline_id": "p", "version_id": "v", "experiment_id": "e", "run_id": "r"}

    monkeypatch.delenv(kubeflow.ARGS_ENV, raising=False)
    monkeypatch.setattr(kubeflow_runner, "compile_pipeline", fake_compile)
    monkeypatch.setattr(kubeflow_runner, "submit", fake_submit)
    assert kubeflow_runner.main(["--submit", "--endpoint", "http://kfp:8080/", *READY]) == 0
    assert submitted == {"path": os.path.join(str(tmp_path), "pipeline.yaml"),
                         "endpoint": "http://kfp:8080/"}
    assert "http://kfp:8080/#/runs/details/r" in capsys.readouterr().out
