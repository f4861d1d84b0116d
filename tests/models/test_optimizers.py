"""models/optimizers.py: FusedAdam's update equals keras.optimizers.Adam's."""

import keras
import numpy as np
import tensorflow as tf

from models.optimizers import FusedAdam


def test_fused_adam_equals_keras_adam():
    rng = np.random.default_rng(0)
    shapes = [(9, 9, 2, 3), (7,), (4, 5)]
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(6)]
    results = []
    for opt in (keras.optimizers.Adam(3e-2), FusedAdam(3e-2)):
        variables = [keras.Variable(x) for x in start]
        for step_grads in grads:
            opt.apply([tf.constant(g) for g in step_grads], variables)
        results.append([v.numpy() for v in variables])
        assert int(opt.iterations.numpy()) == 6
    for fused, reference, initial in zip(results[1], results[0], start):
        assert np.abs(reference - initial).max() > 0.05  # the steps moved the weights
        np.testing.assert_allclose(fused, reference, rtol=1e-5, atol=1e-6)


def test_fused_adam_takes_keras_path_for_amsgrad():
    v = keras.Variable(np.ones(3, "float32"))
    opt = FusedAdam(0.1, amsgrad=True)
    opt.apply([tf.constant([1.0, -1.0, 0.5])], [v])
    np.testing.assert_allclose(v.numpy(), [0.9, 1.1, 0.9], rtol=1e-4)
