"""Shared fixtures: the real MNIST, verified once per test session, and the smoke pipeline runs
that the end-to-end tests (tests/pipeline, tests/notebooks) share."""

import os
import subprocess
import sys

from models.capsnet import hardware

# Before anything loads TensorFlow: the runtime local_runner.py would choose on this CPU.
hardware.apply_tf_env()

import pytest  # noqa: E402
from ml_metadata.metadata_store import metadata_store  # noqa: E402
from tfx import v1 as tfx  # noqa: E402

from data import mnist  # noqa: E402
from pipeline import configs, mlmd  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_local(out_dir, *flags, expect_rc=0):
    """python local_runner.py --output-dir OUT ...; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "local_runner.py", "--output-dir", str(out_dir), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def kill_when(command, marker):
    """Starts `command` in REPO and SIGKILLs it as soon as a line of its output contains
    `marker` (a real kill -9: nothing runs after it); returns its exit status (-SIGKILL)."""
    import signal
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in child.stdout:
            if marker in line:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.wait(timeout=120)
    return child.returncode


def latest_nodes(out):
    """{node id: summary.NodeRun} of the latest run recorded in OUT's metadata store."""
    config = tfx.orchestration.metadata.sqlite_metadata_connection_config(
        str(out / "metadata.sqlite"))
    return mlmd.latest_run(metadata_store.MetadataStore(config), configs.PIPELINE_NAME)


def serving_versions(out):
    serving = out / "serving_model"
    return sorted(os.listdir(serving)) if serving.exists() else []


@pytest.fixture(scope="session")
def runs(tmp_path_factory, mnist_cache_dir):
    """Three smoke runs on one output dir: as is, the same again, then with a bar it passes and
    the robustness evaluation (--robustness)."""
    out = tmp_path_factory.mktemp("smoke")
    flags = ["--preset", "smoke", "--data-cache-dir", mnist_cache_dir]
    result = {"out": out, "flags": flags, "stdout": [], "nodes": []}
    for extra in ([], [], ["--max-test-error", "1.0", "--robustness"]):
        result["stdout"].append(run_local(out, *flags, *extra).stdout)
        result["nodes"].append(latest_nodes(out))
        if len(result["nodes"]) == 1:
            result["serving_after_first"] = serving_versions(out)
    result["serving_after_third"] = serving_versions(out)
    return result


@pytest.fixture(scope="session")
def mnist_cache_dir(tmp_path_factory) -> str:
    """A cache dir holding the verified canonical mnist.npz, filled from the offline copy."""
    cache = tmp_path_factory.mktemp("mnist_cache")
    mnist.ensure_cached(cache_dir=str(cache), allow_network=False)
    return str(cache)


@pytest.fixture(scope="session")
def mnist_arrays(mnist_cache_dir) -> mnist.Mnist:
    """The verified MNIST arrays (uint8), from the session's cache."""
    return mnist.load(cache_dir=mnist_cache_dir, allow_network=False)[0]
