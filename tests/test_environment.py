"""The installed stack is the one the README promises (requirements.lock)."""

import subprocess
import sys

import keras
import tensorflow as tf
import tfx


def test_stack_versions():
    assert sys.version_info[:2] == (3, 10)
    assert tfx.__version__ == "1.16.0" and tf.__version__ == "2.16.2"
    assert keras.__version__.startswith("3.")


def test_pip_is_in_the_venv():
    # TFX pip-installs module-file wheels at run time.
    assert subprocess.run([sys.executable, "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


def test_tensorboard_runs_in_the_venv():
    # TensorBoard 2.16 imports pkg_resources (setuptools < 82): the lock must keep it working.
    out = subprocess.run([sys.executable, "-m", "tensorboard.main", "--version_tb"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().startswith("2.16"), out.stderr[-500:]
