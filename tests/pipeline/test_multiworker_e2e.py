"""`local_runner.py --trainer-workers 2`, end to end on the smoke data of the `runs` fixture
(tests/conftest.py; upstream components come from its cache): the Trainer runs as two processes
of TFX's own entry point (`python -m tfx.scripts.run_executor --executor_class_path
...GenericExecutor --inputs ... --outputs ... --exec-properties ...`), each with its TF_CONFIG,
as Vertex runs a multi-worker Trainer (components/multi_worker_trainer.py).

One scenario: a run warm-started from the fixture's blessed model; worker 1 is killed (SIGKILL)
once epoch 2 of 3 starts, which fails the run naming it; the same command again resumes both
workers at epoch 2 from the chief's checkpoint, exports one model (the chief's), which the
Evaluator evaluates. The run blesses nothing (bar 0), so the
`runs` fixture's blessed model stays the latest for the tests that follow it. (It lives in
tests/pipeline, after tests/notebooks: the notebooks' module reuses the fixture's runs only while
nothing has run after them, and makes a run of its own otherwise.)
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import pytest

from models import trainer
from models.capsnet.model import KERAS_MODEL_FILE
from pipeline import mlmd
from tests.conftest import REPO, latest_nodes, serving_versions

pytestmark = pytest.mark.e2e


def worker_pids(marker: str) -> dict:
    """{worker index: pid} of the run_executor processes whose arguments contain `marker`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split("=", 1) for item in
                               f.read().decode(errors="replace").split("\0") if "=" in item)
        except OSError:
            continue
        if "tfx.scripts.run_executor" in command and marker in command:
            found[json.loads(environ["TF_CONFIG"])["task"]["index"]] = int(pid)
    return found


def worker_scratch(tmp_dir) -> list:
    """The scratch dirs of workers that are not the chief (models.trainer.write_dirs)."""
    return [os.path.join(tmp_dir, d) for d in os.listdir(tmp_dir)
            if d.startswith("capsnet-worker-")]


def no_workers_left(marker: str, seconds: float = 30) -> bool:
    deadline = time.time() + seconds
    while worker_pids(marker) and time.time() < deadline:
        time.sleep(0.5)
    return not worker_pids(marker)


@pytest.fixture(scope="module")
def two_worker_runs(runs, tmp_path_factory):
    """(the failed run's output, the re-run's CompletedProcess, its nodes, each run's TMPDIR:
    where the workers that are not the chief write, and clean up)."""
    out = runs["out"]
    scratch = [tmp_path_factory.mktemp("worker_tmp") for _ in range(2)]
    command = [sys.executable, "local_runner.py", "--output-dir", str(out), *runs["flags"],
               "--trainer-workers", "2", "--epochs", "3", "--steps-per-epoch", "2",
               "--warm-start", "--max-test-error", "0", "--no-baseline", "--verbose"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    served = serving_versions(out)
    first = subprocess.Popen(command, cwd=REPO, env={**env, "TMPDIR": str(scratch[0])},
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines, killed = [], False
    for line in first.stdout:
        lines.append(line)
        if line.rstrip("\n") == "Epoch 2/3" and not killed:  # the chief's: epoch 1 is saved
            os.kill(worker_pids(str(out))[1], signal.SIGKILL)
            killed = True
    assert first.wait(timeout=300) == 1, "".join(lines[-50:])
    assert no_workers_left(str(out))
    rerun = subprocess.run(command, cwd=REPO, env={**env, "TMPDIR": str(scratch[1])},
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-6000:]
    assert serving_versions(out) == served  # bar 0: nothing blessed, nothing pushed
    return "".join(lines), rerun, latest_nodes(out), scratch


def test_a_killed_worker_fails_the_run_naming_it_and_takes_the_chief_down(two_worker_runs):
    failed = two_worker_runs[0]
    assert "Trainer: 2 worker processes on 127.0.0.1" in failed
    assert re.search(r"^error: the pipeline run failed: RuntimeError: Trainer worker 1 of 2 "
                     r"failed \(exit status -9\); its output's tail:$", failed, re.M)
    assert "worker 1 (not the chief) starts at epoch 1 of 3" in failed  # in the tail, too


def test_both_workers_warm_start_from_the_latest_blessed_model(two_worker_runs, runs):
    """The killed run started from the `runs` fixture's blessed model (the chief loaded it, the
    other worker got its weights): its first epoch's loss is far below a fresh start's."""
    failed = two_worker_runs[0]
    assert "absl: Trainer: warm start from the weights of " in failed
    warm = float(re.search(r"^2/2 - .* - loss: ([\d.]+)", failed, re.M).group(1))
    fresh = mlmd.epoch_scalars(runs["nodes"][0]["Trainer"].output("model_run").uri,
                               "epoch_loss")[0][1]
    assert warm < 0.75 * fresh, (warm, fresh)


def test_the_rerun_resumes_both_workers_at_the_next_epoch(two_worker_runs):
    _, rerun, nodes, _ = two_worker_runs
    log = rerun.stdout + rerun.stderr
    assert "absl: Trainer: resumed at epoch 2 of 3 (checkpoint from " in log  # the chief's
    assert "worker 0 (the chief) starts at epoch 2 of 3" in log
    assert "worker 1 (not the chief) starts at epoch 2 of 3" in log
    assert re.findall(r"^Epoch (\d)/3$", log, re.M) == ["2", "3"]            # the chief's
    assert re.findall(r"^worker 1: Epoch (\d)/3$", log, re.M) == ["2", "3"]  # worker 1's
    assert "Training: resumed at epoch 2 of 3" in rerun.stdout
    assert "Workers: 2 worker processes, 2 replicas in sync" in rerun.stdout
    resume_root = os.path.join(os.path.dirname(nodes["Trainer"].output("model").uri), "..",
                               "resume")
    assert all(not os.listdir(os.path.join(resume_root, d)) for d in os.listdir(resume_root))
    # The schedule went on from the checkpoint's step count (2 steps an epoch): TensorBoard logs
    # the optimizer's rate after each epoch, at step 4 after epoch 2 (epoch 3's: lr * 0.9^2),
    # where a schedule restarted at 0 would be at step 2 (lr * 0.9).
    rates = mlmd.epoch_scalars(nodes["Trainer"].output("model_run").uri, "epoch_learning_rate")
    assert sorted(rates) == [1, 2] and rates[1][1] == pytest.approx(1e-3 * 0.9 ** 2, rel=1e-5)


def test_one_model_from_the_chief_identical_on_both_workers_and_evaluated(two_worker_runs):
    _, rerun, nodes, scratch = two_worker_runs
    log = rerun.stdout + rerun.stderr
    digests = dict(re.findall(r"worker (\d) weights sha256 ([0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    serving_dir = os.path.join(nodes["Trainer"].output("model").uri, "Format-Serving")
    exported = keras.saving.load_model(os.path.join(serving_dir, KERAS_MODEL_FILE))
    assert trainer.weights_digest(exported) == digests["0"]
    with open(os.path.join(serving_dir, "assets.extra", "model_info.json")) as f:
        training = json.load(f)["training"]
    assert training["workers"] == 2 and training["replicas"] == 2
    # Worker 1 wrote its checkpoint and TensorBoard logs to a scratch dir (the killed one left
    # it behind) and removed it when it ended; the chief alone wrote to the pipeline root.
    (left,) = worker_scratch(scratch[0])
    assert {"resume", "tensorboard"} <= set(os.listdir(left))
    assert worker_scratch(scratch[1]) == []
    train_events = os.listdir(os.path.join(nodes["Trainer"].output("model_run").uri, "train"))
    assert len(train_events) == 1  # TensorBoard: the chief's alone
    # The Evaluator read the model: TFMA's metrics of this very model on the test split.
    assert not nodes["Evaluator"].cached
    assert nodes["Evaluator"].input("model").id == nodes["Trainer"].output("model").id
    assert re.search(r"Test error: \d+\.\d\d% \(\d+ of 500 test examples\)", rerun.stdout)
    assert "Model: NOT BLESSED" in rerun.stdout
