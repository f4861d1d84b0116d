"""Fast reliability checks: the run lock, the atomic Pusher, the NaN stop, refused flags, bad data."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import local_runner
from components import atomic_pusher
from models.trainer import NonFiniteLossError, StopOnNonFiniteLoss
from pipeline import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------ run lock
def test_run_lock_refuses_a_second_process_and_frees_on_exit(tmp_path):
    code = ("import sys; from pipeline import run_lock\n"
            "try:\n    with run_lock.hold(sys.argv[1]): pass\n"
            "except run_lock.Busy as e: print(e); sys.exit(3)\n")
    other = [sys.executable, "-c", code, str(tmp_path)]
    with run_lock.hold(str(tmp_path)):
        proc = subprocess.run(other, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 3
        assert "in use by another run" in proc.stdout and f'"pid": {os.getpid()}' in proc.stdout
    assert subprocess.run(other, cwd=REPO).returncode == 0  # released


def test_run_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline import run_lock\n"
         "with run_lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_lock.Busy):
        with run_lock.hold(str(tmp_path)):
            pass
    holder.kill()
    holder.wait()
    with run_lock.hold(str(tmp_path)):  # no stale lock after kill -9
        pass


# ------------------------------------------------------------------------------- atomic pusher
def make_model(path):
    os.makedirs(os.path.join(path, "variables"))
    for name, data in [("saved_model.pb", b"graph"), ("variables/variables.index", b"i")]:
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return str(path)


def test_push_writes_a_complete_version_with_its_origin(tmp_path):
    model = make_model(tmp_path / "model")
    serving = str(tmp_path / "serving")
    destination = atomic_pusher.push_atomically(model, "uri://model/7", serving)
    assert os.listdir(serving) == [os.path.basename(destination)]
    assert open(os.path.join(destination, "saved_model.pb"), "rb").read() == b"graph"
    with open(os.path.join(destination, atomic_pusher.PUSH_INFO)) as f:
        assert json.load(f)["model_uri"] == "uri://model/7"
    assert atomic_pusher.existing_version(serving, "uri://model/7") == os.path.basename(destination)
    assert atomic_pusher.existing_version(serving, "uri://model/8") is None


def test_versions_always_increase(tmp_path):
    serving = tmp_path / "serving"
    (serving / "2000000000").mkdir(parents=True)
    assert atomic_pusher.next_version(str(serving), now=1000.0) == "2000000001"
    assert atomic_pusher.next_version(str(tmp_path / "none"), now=1234.9) == "1234"


def test_failed_push_leaves_no_partial_version(tmp_path, monkeypatch):
    model = make_model(tmp_path / "model")
    serving = str(tmp_path / "serving")

    def copy_then_fail(src, dst):
        os.makedirs(dst)
        open(os.path.join(dst, "half"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(atomic_pusher.io_utils, "copy_dir", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_pusher.push_atomically(model, "uri://m", serving)
    assert os.listdir(serving) == []


# ------------------------------------------------------------------------------------ NaN stop
def test_non_finite_loss_stops_fit_at_the_first_bad_step():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 2), np.float32)
    x[5] = np.nan  # batch size 1: the 6th step sees the NaN
    with pytest.raises(NonFiniteLossError,
                       match=r"loss is nan at global step 6 \(epoch 1, step 6 of the epoch\)"):
        model.fit(x, np.ones((8, 1)), batch_size=1, epochs=2, verbose=0, shuffle=False,
                  callbacks=[StopOnNonFiniteLoss()])


# --------------------------------------------------------------------------- refused commands
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs must be > 0, got 0"),
    (["--epochs", "-3"], "epochs must be > 0"),
    (["--steps-per-epoch", "0"], "steps_per_epoch must be > 0"),
    (["--batch-size", "-1"], "batch_size must be > 0"),
    (["--data-fraction", "0"], "data_fraction must be in (0, 1]"),
    (["--data-fraction", "1.5"], "data_fraction must be in (0, 1]"),
    (["--learning-rate", "0"], "learning_rate must be > 0"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_bad_values_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        local_runner.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_locations_are_usage_errors(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flags, message in [
        (["--pipeline-root", str(a_file)], "is a file"),
        (["--serving-dir", str(a_file)], "is a file"),
        (["--output-dir", str(tmp_path), "--serving-dir", str(tmp_path / "pipeline_root" / "s")],
         "inside --pipeline-root"),
        (["--pipeline-root", str(tmp_path), "--serving-dir", str(tmp_path)], "inside"),
        (["--metadata-path", str(tmp_path)], "is a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            local_runner.parse_args(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_fails_before_any_tfx_work(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "local_runner.py", "--output-dir", str(out),
                           "--data-path", str(bad), "--data-cache-dir", str(tmp_path / "cache")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}")
    assert not out.exists()  # no pipeline root, no metadata
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
