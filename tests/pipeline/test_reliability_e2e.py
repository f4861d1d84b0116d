"""Bad days, end to end: serving bad requests, the blessing gate, NaN, kill -9, two runners.

Continues from the `runs` fixture's state (tests/conftest.py): the smoke model is blessed (bar 1.0) and
pushed as the one version in the serving dir. Each scenario is a real local_runner.py process.
"""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx

from pipeline import configs, mlmd, run_lock
from tests.conftest import kill_when, latest_nodes, run_local, serving_versions

pytestmark = pytest.mark.e2e
UPSTREAM = {"MnistExampleGen", "StatisticsGen", "ImportSchemaGen", "ExampleValidator",
            "AnomaliesGate", "Transform"}


def blessed(nodes) -> bool:
    return nodes["Evaluator"].output("blessing").custom_properties["blessed"].int_value == 1


def pushed(nodes) -> bool:
    return nodes["Pusher"].output("pushed_model").custom_properties["pushed"].int_value == 1


# ---------------------------------------------------------------- serving, on the exported model
@pytest.fixture(scope="module")
def serve(runs):
    model_dir = os.path.join(runs["nodes"][0]["Trainer"].output("model").uri, "Format-Serving")
    return tf.saved_model.load(model_dir).signatures


def examples_of(images):
    return [tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()]))
    })).SerializeToString() for img in images]


@pytest.mark.parametrize("n", [1, 1000])
def test_batches_of_1_and_1000_answer(serve, mnist_arrays, n):
    images = mnist_arrays.x_test[:n]
    by_images = serve["serving_images"](images=tf.constant(images))
    by_examples = serve["serving_default"](examples=tf.constant(examples_of(images)))
    assert by_images["scores"].shape == (n, 10) and by_examples["classes"].shape == (n,)
    np.testing.assert_array_equal(by_images["classes"], by_examples["classes"])


def test_empty_batch_answers_with_empty_outputs(serve):
    out = serve["serving_images"](images=tf.zeros([0, 28, 28], tf.uint8))
    assert out["scores"].shape == (0, 10) and out["classes"].shape == (0,)
    out = serve["serving_default"](examples=tf.constant([], tf.string))
    assert out["scores"].shape == (0, 10)


EDGE_BATCHES_CHILD = """
import sys
import tensorflow as tf
signatures = tf.saved_model.load(sys.argv[1]).signatures
for n in (0, 1):
    out = signatures["serving_images"](images=tf.zeros([n, 28, 28], tf.uint8))
    assert out["scores"].shape == (n, 10) and out["classes"].shape == (n,), (n, out)
out = signatures["serving_default"](examples=tf.constant([], tf.string))
assert out["scores"].shape == (0, 10), out
from tensorflow.python.util import _pywrap_util_port
print("oneDNN" if _pywrap_util_port.IsMklEnabled() else "Eigen")
"""


@pytest.mark.parametrize("onednn, runtime", [("0", "Eigen"), ("1", "oneDNN")])
def test_edge_batches_answer_under_each_cpu_runtime(runs, onednn, runtime):
    """TF Serving runs with oneDNN, and oneDNN's convolution misshapes a zero-size batch: the
    exported model must answer batches of 0 and 1 under either runtime (a fresh process each,
    since the runtime is fixed when TensorFlow starts)."""
    model_dir = os.path.join(runs["nodes"][0]["Trainer"].output("model").uri, "Format-Serving")
    proc = subprocess.run([sys.executable, "-c", EDGE_BATCHES_CHILD, model_dir],
                          env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == runtime


@pytest.mark.parametrize("images", [
    np.zeros([2, 28, 28], np.float32),                # float pixels: the signature takes uint8
    np.full([2, 28, 28], 1.5, np.float32),            # (so out-of-range floats never get in)
    np.zeros([2, 28, 28], np.int32),
])
def test_image_signature_refuses_other_dtypes(serve, images):
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="uint8"):
        serve["serving_images"](images=tf.constant(images))


@pytest.mark.parametrize("shape", [(2, 784), (2, 28, 27), (2, 32, 32), (2, 28, 28, 3),
                                   (28, 28), (1, 2, 28, 28, 1)])
def test_image_signature_refuses_wrong_shapes(serve, shape):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"images must be uint8 \[N,28,28\] or \[N,28,28,1\]; got shape"):
        serve["serving_images"](images=tf.zeros(shape, tf.uint8))


def test_examples_signature_refuses_malformed_requests(serve):
    with pytest.raises(tf.errors.InvalidArgumentError, match="parse|Could not parse"):
        serve["serving_default"](examples=tf.constant([b"not a serialized tf.Example"]))
    no_image = tf.train.Example(features=tf.train.Features(feature={
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))}))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image"):
        serve["serving_default"](examples=tf.constant([no_image.SerializeToString()]))
    short = examples_of([np.zeros(100, np.uint8)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="784 bytes"):
        serve["serving_default"](examples=tf.constant(short))


# --------------------------------------------------------------------------- the blessing gate
def test_reblessing_the_same_model_does_not_push_it_again(runs):
    out, flags = runs["out"], runs["flags"]
    before = serving_versions(out)
    assert len(before) == 1
    proc = run_local(out, *flags, "--max-test-error", "1.0")
    nodes = latest_nodes(out)
    # The Resolver now finds this very model as the latest blessed one, so the Evaluator runs again
    # (its baseline input changed) and blesses it; the Pusher sees it is already served.
    assert blessed(nodes) and pushed(nodes)
    assert nodes["Trainer"].cached
    assert serving_versions(out) == before
    assert f"Pushed to: {out / 'serving_model' / before[0]}" in proc.stdout


def test_model_passing_the_bar_but_worse_than_the_blessed_one_is_not_pushed(runs):
    out, flags = runs["out"], runs["flags"]
    before = serving_versions(out)
    proc = run_local(out, *flags, "--max-test-error", "1.0", "--epochs", "1",
                     "--steps-per-epoch", "1")
    nodes = latest_nodes(out)
    assert not nodes["Trainer"].cached and nodes["Trainer"].output("model").id != \
        runs["nodes"][2]["Trainer"].output("model").id
    assert not blessed(nodes) and not pushed(nodes)
    assert serving_versions(out) == before
    assert "FAILED: change threshold" in proc.stdout
    assert "Pushed: nothing" in proc.stdout


# ------------------------------------------------------------------------------------- training
def test_non_finite_loss_fails_the_run_naming_the_step(runs):
    """The compact view of a failed run: the Trainer's traceback and the error in full on the
    terminal (stderr), then the path of the full log, which has them too."""
    out, flags = runs["out"], runs["flags"]
    before = serving_versions(out)
    proc = run_local(out, *flags, "--max-test-error", "1.0", "--learning-rate", "1e9",
                     expect_rc=1)
    error = (r"NonFiniteLossError: training loss is (nan|inf) at global step \d+ "
             r"\(epoch 1, step \d+ of the epoch\)")
    report = proc.stderr.splitlines()
    assert re.fullmatch(r"Trainer failed after .+ s:", report[0]), proc.stderr
    assert report[1] == "Traceback (most recent call last):"
    assert re.search(error, "\n".join(report[2:-2]))
    assert re.match(f"error: the pipeline run failed: {error}", report[-2])
    log = re.fullmatch(r"Full log: (.+)", report[-1]).group(1)
    with open(log) as f:
        assert re.search(error, f.read())
    assert "Traceback" not in proc.stdout and len(proc.stdout.splitlines()) <= 60
    assert serving_versions(out) == before


def epoch_scalars(model_run_dir, tag):
    """{0-based epoch: value} of one per-epoch scalar of a Trainer's TensorBoard events."""
    return {epoch: value for epoch, (_, value) in mlmd.epoch_scalars(model_run_dir, tag).items()}


# ------------------------------------------------------------------ interruption and concurrency
def test_warm_started_run_killed_during_training_then_rerun_resumes_at_the_next_epoch(runs):
    """--warm-start, then SIGKILL while epoch 3 of 3 trains; the same command again resumes at
    epoch 3 from the checkpoint of epoch 2, with upstream components from cache, and exports,
    evaluates and (the bar passed) pushes; each epoch's learning rate is the uninterrupted
    schedule's. The warm start: the Trainer's base_model is the latest blessed model (the
    Resolver's: the `runs` fixture's smoke model, 40 steps, blessed at bar 1.0; the tests above
    bless nothing newer), and the first epoch's loss is far below a fresh start's."""
    out = runs["out"]
    flags = runs["flags"] + ["--epochs", "3", "--steps-per-epoch", "2", "--max-test-error", "1.0",
                             "--warm-start", "--no-baseline",
                             "--verbose"]  # every log line, on the terminal
    # Epoch 2's checkpoint is written once Keras starts epoch 3.
    assert kill_when([sys.executable, "local_runner.py", "--output-dir", str(out), *flags],
                     "Epoch 3/3") == -signal.SIGKILL

    before = serving_versions(out)
    proc = run_local(out, *flags)
    log = proc.stdout + proc.stderr
    assert "resumed at epoch 3 of 3 (checkpoint from " in log
    assert "absl: Component Trainer is running." in log and "Full log: " not in log  # --verbose
    assert re.findall(r"Epoch (\d+)/3", log) == ["3"]  # the re-run trained epoch 3 alone
    assert "Training: resumed at epoch 3 of 3" in proc.stdout  # the summary says so too
    nodes = latest_nodes(out)
    assert UPSTREAM <= {n for n, r in nodes.items() if r.cached}
    assert not nodes["Trainer"].cached
    assert nodes["Trainer"].execution.last_known_state == metadata_store_pb2.Execution.COMPLETE
    assert blessed(nodes) and pushed(nodes) and len(serving_versions(out)) == len(before) + 1
    # TensorBoard: the killed execution logged epochs 0-1, the re-run 2, at the same rates as
    # one uninterrupted run. Keras logs the optimizer's rate when the epoch ends, that of the
    # step about to be taken: lr * 0.9^(epoch + 1), the last epoch's kept after the last step.
    model_run = nodes["Trainer"].output("model_run").uri
    rates = epoch_scalars(model_run, "epoch_learning_rate")
    assert sorted(rates) == [2]
    runs_dir, rerun_id = os.path.split(model_run.rstrip("/"))
    killed_id = max(int(d) for d in os.listdir(runs_dir) if int(d) < int(rerun_id))
    rates.update(epoch_scalars(os.path.join(runs_dir, str(killed_id)), "epoch_learning_rate"))
    assert rates == pytest.approx({e: 1e-3 * 0.9 ** min(e + 1, 2) for e in range(3)}, rel=1e-5)
    # The warm start, which the re-run repeats before the checkpoint overrides it.
    assert "absl: Trainer: warm start from the weights of " in log
    assert nodes["Trainer"].input("base_model").id == runs["nodes"][2]["Trainer"].output("model").id
    warm = epoch_scalars(os.path.join(runs_dir, str(killed_id)), "epoch_loss")[0]
    fresh = epoch_scalars(runs["nodes"][0]["Trainer"].output("model_run").uri, "epoch_loss")[0]
    assert warm < 0.75 * fresh, (warm, fresh)
    # The checkpoint is gone once the model is exported.
    resume_root = os.path.join(str(out), "pipeline_root", "Trainer", "resume")
    assert all(not os.listdir(os.path.join(resume_root, d)) for d in os.listdir(resume_root))
    # The store is consistent: the killed execution is recorded as never finished, and every
    # execution of the latest run finished.
    store = metadata_store.MetadataStore(tfx.orchestration.metadata.sqlite_metadata_connection_config(
        str(out / "metadata.sqlite")))
    trainer_runs = store.get_executions_by_context(
        store.get_context_by_type_and_name("node", f"{configs.PIPELINE_NAME}.Trainer").id)
    assert [e.last_known_state for e in trainer_runs].count(metadata_store_pb2.Execution.RUNNING) == 1
    # The whole training's curves, across the kill (what docs/results.md is made from).
    from notebooks import analysis
    history = analysis.training_history(store, nodes["Trainer"])
    losses = history[(history["run"] == "train") & (history["metric"] == "loss")]
    assert list(losses["epoch"]) == [1, 2, 3]
    assert list(losses["execution"]) == [killed_id] * 2 + [int(rerun_id)]
    seconds = analysis.epoch_table(history)["seconds"]
    assert seconds.isna().tolist() == [True, False, True]  # no duration across the kill
    assert all(r.execution.last_known_state in (metadata_store_pb2.Execution.COMPLETE,
                                                metadata_store_pb2.Execution.CACHED)
               for r in nodes.values())


def test_second_runner_on_the_same_pipeline_root_fails_clearly(runs):
    out, flags = runs["out"], runs["flags"]
    executions_before = len(metadata_store.MetadataStore(
        tfx.orchestration.metadata.sqlite_metadata_connection_config(
            str(out / "metadata.sqlite"))).get_executions())
    with run_lock.hold(str(out / "pipeline_root")):  # a first runner, holding the root
        proc = run_local(out, *flags, expect_rc=1)
    assert "is in use by another run" in proc.stderr and '"pid"' in proc.stderr
    after = metadata_store.MetadataStore(tfx.orchestration.metadata.sqlite_metadata_connection_config(
        str(out / "metadata.sqlite"))).get_executions()
    assert len(after) == executions_before
