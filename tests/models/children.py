"""Training child processes for the distributed tests (tests/models/test_mirrored.py,
test_multiworker.py): each child script trains the real CapsNet from `initial.weights.h5` in the
test's tmp_path, saves its final weights to an .npz and prints one `RESULT {json}` line."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def start(script, tmp_path, mnist_cache_dir, out_name, *args, env=None):
    """Starts `tests/models/<script>` (not waiting for it): (process, path of its .npz)."""
    out = tmp_path / out_name
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "models", script),
         "--mnist-cache", mnist_cache_dir, "--weights", str(tmp_path / "initial.weights.h5"),
         "--out", str(out), *args],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def finish(proc, out):
    """Waits for a started child: (its RESULT dict, its final weights, its stdout)."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), weights_of(out), stdout


def weights_of(path):
    """The weights a child saved, in order."""
    saved = np.load(path)
    return [saved[k] for k in saved.files]
