"""TensorFlow settings that only act if made before TensorFlow starts, in one place.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it is imported and fixes its devices (and its CPU
allocator) when its runtime first runs an op. The pipeline runs every component in the
local_runner.py process, so these are applied at the top of its main(), before TFX or TF loads;
the benchmark and the MirroredStrategy test do the same.
"""

import logging
import os
import sys

# The CPU runtime the training step is fastest with on the 2-core dev machine: TensorFlow's own
# (Eigen) kernels instead of oneDNN's, and its BFC allocator, which reuses memory instead of
# handing out fresh pages for every large tensor. Measured together: train step ~62 vs ~56 img/s
# (medians of alternating runs, docs/results.md). The user's environment wins over these.
TF_CPU_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPU_ALLOCATOR_USE_BFC": "true"}

log = logging.getLogger(__name__)


def apply_cpu_env(environ=os.environ) -> dict:
    """Sets TF_CPU_ENV's variables not already set in `environ`; returns the values in effect.

    Logs a warning when TensorFlow is already imported: then they no longer act in this process.
    """
    for key, value in TF_CPU_ENV.items():
        environ.setdefault(key, value)
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before %s were set; they act in child processes "
                    "only", ", ".join(TF_CPU_ENV))
    return {key: environ[key] for key in TF_CPU_ENV}


def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into n logical devices, so that MirroredStrategy trains n replicas on it.

    Must run before TensorFlow runs any op (TF raises RuntimeError otherwise).
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
