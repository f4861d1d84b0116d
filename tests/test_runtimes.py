"""Edge batches (0 and 1 examples) under both of TensorFlow's CPU runtimes, whatever this CPU is.

TensorFlow's default on x86 is oneDNN, and oneDNN's convolution answers a zero-size batch with
the wrong shape; TensorFlow's own (Eigen) kernels do not. The runtime is fixed when TensorFlow
starts. The runtime this session runs under (the chooser's, tests/conftest.py) runs the tests
marked `edge_batch` in this process with the rest of the suite; the other runtime gets a child
pytest over them, with TF_ENABLE_ONEDNN_OPTS set in its environment (the chooser leaves a set
variable alone). The exported model's empty-batch answer is checked under both runtimes in
tests/pipeline/test_reliability_e2e.py.
"""

import os
import re
import subprocess
import sys

from tests.conftest import REPO

RUNTIMES = {"eigen": "0", "onednn": "1"}


def onednn_on(env) -> bool:
    """Whether TensorFlow started with `env` runs oneDNN, as TensorFlow itself reports it."""
    check = "from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())"
    return subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True).stdout.split()[-1] == "True"


def test_edge_batch_tests_pass_under_the_other_runtime():
    """This process ran them under its own runtime; a child runs them under the other one."""
    from tensorflow.python.util import _pywrap_util_port
    runtime = "eigen" if _pywrap_util_port.IsMklEnabled() else "onednn"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": RUNTIMES[runtime]}
    assert onednn_on(env) == (runtime == "onednn")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "edge_batch",
         "tests/models"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 8, proc.stdout[-2000:]
