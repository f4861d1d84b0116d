"""End to end: `local_runner.py --beam-workers 2` runs the Beam-based components on Beam's
FnApiRunner with 2 SDK worker processes (gRPC on loopback) and produces what the in-process run
produces.

One smoke run with 2 Beam workers (1 training step: the Trainer is not what is tested), in a
temp dir with its own HOME, compared with:
  - the in-process smoke run of tests/conftest.py's `runs` (same data): the same examples in
    every split and the same statistics;
  - TFX's Evaluator executor run here, in-process, on the same examples and model with the same
    properties: the same metrics.
"""

import glob
import os
from unittest import mock

import pytest
import tensorflow as tf
from tensorflow_metadata.proto.v0 import statistics_pb2

from pipeline import configs, mlmd
from tests.conftest import latest_nodes, run_local

pytestmark = pytest.mark.e2e
SPLITS = ("train", "valid", "test")
# Marks the run's processes: whatever still carries it after the run is a leftover.
TAG_VARIABLE = "CAPSNET_BEAM_WORKERS_TEST"


def tagged_processes(tag: str) -> list:
    """Command lines of the live processes whose environment holds TAG_VARIABLE=tag."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{TAG_VARIABLE}={tag}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        found.append(c.read().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, mnist_cache_dir):
    out = tmp_path_factory.mktemp("beam_workers")
    home = tmp_path_factory.mktemp("beam_workers_home")
    tag = str(out)
    with mock.patch.dict(os.environ, {"HOME": str(home), TAG_VARIABLE: tag}):
        proc = run_local(out, "--preset", "smoke", "--data-cache-dir", mnist_cache_dir,
                         "--epochs", "1", "--steps-per-epoch", "1", "--no-baseline",
                         "--beam-workers", "2")
    return {"out": out, "home": home, "stdout": proc.stdout, "nodes": latest_nodes(out),
            "left_behind": tagged_processes(tag)}


def test_the_run_used_two_sdk_worker_processes_and_left_none_behind(two_workers):
    with open(two_workers["stdout"].splitlines()[-1].removeprefix("Full log: ")) as f:
        relayed = [line for line in f if " Worker: " in line]
    # The runner relays its SDK workers' log lines; at WARNING level each worker process says
    # once at its start, from sdk_worker_main, that it has no semi-persistent directory. Two
    # workers for each of the four Beam-based components' pipelines.
    starts = [line for line in relayed if "No semi_persistent_directory" in line
              and "/apache_beam/runners/worker/sdk_worker_main.py:" in line]
    assert len(starts) >= 2 * 4, relayed[:5]
    assert two_workers["left_behind"] == []
    assert not (two_workers["home"] / ".apache_beam").exists()


def examples(examples_uri: str, split: str) -> list:
    """The split's tf.Examples, canonically serialized, in sorted order. (Canonically: how a
    process orders a feature map when it serializes varies, so equal examples can come as
    different bytes.)"""
    files = glob.glob(os.path.join(examples_uri, f"Split-{split}", "*.gz"))
    assert files, (examples_uri, split)
    return sorted(tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True)
                  for r in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def test_example_gen_writes_the_same_examples_as_in_process(two_workers, runs):
    mine = two_workers["nodes"]["MnistExampleGen"].output("examples").uri
    theirs = runs["nodes"][0]["MnistExampleGen"].output("examples").uri
    sizes = configs.PRESETS["smoke"].split_sizes()
    for split in SPLITS:
        got = examples(mine, split)
        assert len(got) == sizes[split]
        assert got == examples(theirs, split), split


def statistics(statistics_uri: str, split: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    stats = statistics_pb2.DatasetFeatureStatisticsList()
    with open(os.path.join(statistics_uri, f"Split-{split}", "FeatureStats.pb"), "rb") as f:
        stats.ParseFromString(f.read())
    return stats


def without_moments(stats: statistics_pb2.DatasetFeatureStatisticsList) -> tuple:
    """(stats without the numeric features' mean and std_dev, those means and std_devs).

    The moments are float sums, which workers add up in pieces and merge in their own order,
    so they may differ in the last bit (seen: a label std_dev of 2.8518041498481113 against
    ...117). Everything else is counts and integer-valued, which no merge order changes."""
    rest, moments = statistics_pb2.DatasetFeatureStatisticsList(), []
    rest.CopyFrom(stats)
    for feature in rest.datasets[0].features:
        if feature.HasField("num_stats"):
            moments += [feature.num_stats.mean, feature.num_stats.std_dev]
            feature.num_stats.ClearField("mean")
            feature.num_stats.ClearField("std_dev")
    return rest, moments


def test_statistics_gen_computes_the_same_statistics_as_in_process(two_workers, runs):
    # Equal to the bit but for the float moments, which match to rounding.
    mine = two_workers["nodes"]["StatisticsGen"].output("statistics").uri
    theirs = runs["nodes"][0]["StatisticsGen"].output("statistics").uri
    for split in SPLITS:
        got, got_moments = without_moments(statistics(mine, split))
        want, want_moments = without_moments(statistics(theirs, split))
        assert got.datasets[0].num_examples == configs.PRESETS["smoke"].split_sizes()[split]
        assert got_moments  # the label's
        assert got == want, split
        assert got_moments == pytest.approx(want_moments, rel=1e-12), split


def evaluate_in_process(evaluator: mlmd.ComponentRun, out_dir) -> str:
    """Runs TFX's Evaluator executor in this process, on Beam's in-process runner, with the
    inputs and properties of a recorded Evaluator execution; returns the evaluation's URI."""
    from tfx.components.evaluator import executor
    from tfx.types import standard_artifacts

    examples, model = standard_artifacts.Examples(), standard_artifacts.Model()
    examples.set_mlmd_artifact(evaluator.input("examples"))
    model.set_mlmd_artifact(evaluator.input("model"))
    evaluation, blessing = standard_artifacts.ModelEvaluation(), standard_artifacts.ModelBlessing()
    evaluation.uri, blessing.uri = str(out_dir / "evaluation"), str(out_dir / "blessing")
    properties = {key: value.string_value
                  for key, value in evaluator.execution.custom_properties.items()}
    context = executor.Executor.Context(beam_pipeline_args=list(configs.LOCAL_BEAM_ARGS),
                                        tmp_dir=str(out_dir / "tmp"))
    executor.Executor(context).Do({"examples": [examples], "model": [model]},
                                  {"evaluation": [evaluation], "blessing": [blessing]},
                                  properties)
    return evaluation.uri


def test_evaluator_computes_the_same_metrics_as_in_process_on_the_same_model(two_workers,
                                                                            tmp_path):
    evaluator = two_workers["nodes"]["Evaluator"]
    mine = mlmd.slice_metrics(evaluator.output("evaluation").uri)
    in_process = mlmd.slice_metrics(evaluate_in_process(evaluator, tmp_path))
    assert mine[()]["example_count"] == configs.PRESETS["smoke"].split_sizes()["test"]
    assert len(mine) == 11  # overall and one slice per digit
    assert mine.keys() == in_process.keys()
    for key, metrics in mine.items():
        assert metrics == pytest.approx(in_process[key], rel=1e-6), key
