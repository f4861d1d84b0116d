"""TensorFlow's device setup that only acts before TensorFlow runs its first op.

TensorFlow's CPU runtime (oneDNN or its own kernels) and allocator are chosen from the CPU by
`models.capsnet.hardware.apply_tf_env`, the one chooser every entry point calls.
"""


def configure_cpu_replicas(n: int) -> None:
    """Splits the CPU into n logical devices, so that MirroredStrategy trains n replicas on it.

    Must run before TensorFlow runs any op (TF raises RuntimeError otherwise).
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
