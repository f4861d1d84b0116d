"""models/trainer.py's own pieces (the TFX run_fn is exercised end to end in tests/pipeline):
the fused Adam, the GPU-only mixed precision, the config, the input pipeline's augmentation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import trainer


def test_fused_adam_equals_keras_adam():
    rng = np.random.default_rng(0)
    shapes = [(9, 9, 2, 3), (7,), (4, 5)]
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(6)]
    results = []
    for opt in (keras.optimizers.Adam(3e-2), trainer.FusedAdam(3e-2)):
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
    opt = trainer.FusedAdam(0.1, amsgrad=True)
    opt.apply([tf.constant([1.0, -1.0, 0.5])], [v])
    np.testing.assert_allclose(v.numpy(), [0.9, 1.1, 0.9], rtol=1e-4)


def test_mixed_precision_is_off_without_a_gpu(monkeypatch):
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    # The message itself, not log capture: which loggers earlier tests quieted varies.
    messages = []
    monkeypatch.setattr(trainer.logging, "info", lambda msg, *args: messages.append(msg % args))
    assert trainer.compute_policy("mixed_bfloat16") is None
    assert len(messages) == 1 and "mixed_bfloat16" in messages[0] and "no GPU" in messages[0]
    assert trainer.compute_policy(None) is None
    assert len(messages) == 1  # float32 asked for: nothing to say


def test_train_config_reads_old_and_new_custom_configs():
    from pipeline import configs
    new = configs.RunConfig(mixed_precision="mixed_float16").trainer_custom_config()
    assert trainer.TrainConfig.from_custom_config(new).mixed_precision == "mixed_float16"
    old = {k: v for k, v in new.items() if k != "mixed_precision"}  # before the field existed
    assert trainer.TrainConfig.from_custom_config(old).mixed_precision is None
    with pytest.raises(KeyError):
        trainer.TrainConfig.from_custom_config({k: v for k, v in old.items() if k != "epochs"})


def test_build_models_compiles_under_mirrored_strategy_with_fused_adam():
    config = trainer.TrainConfig(epochs=1, batch_size=4, learning_rate=2e-3, lr_decay=0.9,
                                 max_shift=2, routings=2)
    strategy, train_model, inference_model = trainer.build_models(config)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert isinstance(train_model.optimizer, trainer.FusedAdam)
    assert float(train_model.optimizer.learning_rate.numpy()) == pytest.approx(2e-3)
    assert train_model.get_layer("digit_caps").routings == 2
    assert [id(w) for w in train_model.weights] == [id(w) for w in inference_model.weights]


def test_random_shift_is_a_per_image_integer_shift_with_zero_fill():
    images = np.zeros((64, 28, 28, 1), "float32")
    images[:, 12:16, 10:14] = 1.0
    shifted = trainer.random_shift(tf.constant(images), 2).numpy()
    assert shifted.shape == images.shape
    moves = set()
    for moved in shifted[..., 0]:
        rows, cols = np.nonzero(moved)
        assert moved.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        moves.add((rows.min() - 12, cols.min() - 10))
    assert moves <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(moves) > 10
    np.testing.assert_array_equal(trainer.random_shift(tf.constant(images), 0).numpy(), images)
