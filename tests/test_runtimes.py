"""Edge batches (0 and 1 examples) under both of TensorFlow's CPU runtimes, whatever this CPU is.

TensorFlow's default on x86 is oneDNN, and oneDNN's convolution answers a zero-size batch with
the wrong shape; TensorFlow's own (Eigen) kernels do not. The runtime is fixed when TensorFlow
starts, so each runtime gets a child pytest over the tests marked `edge_batch`, with
TF_ENABLE_ONEDNN_OPTS set in its environment (the chooser leaves a set variable alone). The
exported model's empty-batch answer is checked the same way in tests/pipeline/test_reliability_e2e.py.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

RUNTIMES = {"eigen": "0", "onednn": "1"}


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_edge_batch_tests_pass_under_each_runtime(runtime):
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": RUNTIMES[runtime]}
    check = ("from tensorflow.python.util import _pywrap_util_port as p; "
             "print(p.IsMklEnabled())")  # oneDNN on or off, as TensorFlow itself reports it
    on = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True,
                        text=True, check=True).stdout.split()[-1]
    assert on == str(runtime == "onednn")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "edge_batch",
         "tests/models"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 8, proc.stdout[-2000:]
