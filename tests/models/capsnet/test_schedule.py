"""models/capsnet/schedule.py: the learning rate the optimizer uses at every step is the recipe's,
it continues after a resume, and the weight average is what the evaluation sees."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.capsnet.recipe import Recipe
from models.capsnet.resume import Resume
from models.capsnet.schedule import LearningRate, averaged_weights, optimizer_options
from models.optimizers import FusedAdam

COSINE = Recipe(epochs=4, learning_rate=2e-3, lr_schedule="cosine", warmup_epochs=1.5)


def rates(schedule, steps):
    return [float(keras.ops.convert_to_numpy(schedule(step))) for step in steps]


@pytest.mark.parametrize("recipe", [Recipe(epochs=4), COSINE], ids=["exponential", "cosine"])
def test_learning_rate_is_the_recipes_at_every_step(recipe):
    schedule = LearningRate(recipe, steps_per_epoch=10)
    steps = [0, 1, 7, 10, 14, 15, 16, 29, 30, 39]
    expected = [recipe.learning_rate_at(step // 10, step % 10, 10) for step in steps]
    assert rates(schedule, steps) == pytest.approx(expected, rel=1e-6)
    assert rates(schedule, [40, 1000]) == pytest.approx([expected[-1]] * 2)  # past the end
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert rates(restored, steps) == rates(schedule, steps)


def test_exponential_is_constant_within_an_epoch_and_x_decay_per_epoch():
    schedule = LearningRate(Recipe(), steps_per_epoch=550)
    assert rates(schedule, [0, 549, 550, 1099, 1100, 49 * 550]) == pytest.approx(
        [1e-3, 1e-3, 9e-4, 9e-4, 8.1e-4, 1e-3 * 0.9 ** 49], rel=1e-6)


def test_cosine_warms_up_linearly_then_decays_to_zero():
    at = COSINE.learning_rate_at  # 4 epochs of 20 steps, warm-up 30 steps, peak 2e-3
    assert [at(0, 0, 20), at(0, 10, 20), at(1, 9, 20)] == pytest.approx([0, 2e-3 / 3,
                                                                         2e-3 * 29 / 30])
    assert at(1, 10, 20) == pytest.approx(2e-3)  # the peak, then half way down the cosine:
    assert at(2, 15, 20) == pytest.approx(1e-3)  # step 55 = 30 + 50 / 2
    assert 0 < at(3, 19, 20) < 2e-3 * 1e-2 and at(4, 0, 20) == pytest.approx(0, abs=1e-12)


def test_a_resumed_optimizer_continues_the_schedule(tmp_path):
    """The step count travels in the checkpoint, so the restored optimizer's rate is the one
    the uninterrupted run would use next."""
    data = np.random.default_rng(0).normal(size=(2, 32, 4)).astype("float32")

    def model():
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        net.compile(optimizer=keras.optimizers.Adam(**optimizer_options(COSINE, 4)), loss="mse")
        return net

    first = model()
    first.fit(data[0], data[1], batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[Resume(str(tmp_path), "run", COSINE.epochs)])
    second = model()
    epoch, _ = Resume(str(tmp_path), "run", COSINE.epochs).restore(second)
    assert epoch == 2 and int(keras.ops.convert_to_numpy(second.optimizer.iterations)) == 8
    assert float(keras.ops.convert_to_numpy(second.optimizer.learning_rate)) == pytest.approx(
        COSINE.learning_rate_at(2, 0, 4), rel=1e-6)


def ema_run(optimizer_class, momentum=0.5, steps=4):
    """A Dense model stepped by fixed gradients with EMA on: (model, trained weights after each
    step)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    recipe = Recipe(learning_rate=0.1, ema_momentum=momentum)
    model.compile(optimizer=optimizer_class(**optimizer_options(recipe, 10)), loss="mse")
    rng = np.random.default_rng(1)
    history = []
    for _ in range(steps):
        grads = [tf.constant(rng.normal(size=v.shape).astype("float32"))
                 for v in model.trainable_variables]
        model.optimizer.apply(grads, model.trainable_variables)
        history.append([v.numpy() for v in model.trainable_variables])
    return model, history


def test_evaluation_sees_the_weight_average_and_training_resumes_with_its_own_weights():
    model, history = ema_run(keras.optimizers.Adam)
    average = history[0]  # Keras starts the average at the first step's weights
    for weights in history[1:]:
        average = [0.5 * a + 0.5 * w for a, w in zip(average, weights)]
    x = np.ones((1, 3), "float32")
    trained_output = model.predict(x, verbose=0)
    with averaged_weights(model) as averaged:
        assert averaged
        for variable, expected in zip(model.trainable_variables, average):
            np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
        assert np.abs(model.predict(x, verbose=0) - trained_output).max() > 1e-3
    for variable, trained in zip(model.trainable_variables, history[-1]):
        np.testing.assert_array_equal(variable.numpy(), trained)  # exactly back

    plain, history = ema_run(keras.optimizers.Adam, momentum=0.0)
    with averaged_weights(plain) as averaged:  # EMA off: the trained weights
        assert not averaged
        for variable, trained in zip(plain.trainable_variables, history[-1]):
            np.testing.assert_array_equal(variable.numpy(), trained)


def test_fused_adam_takes_the_options_and_averages_as_keras_adam():
    reference, _ = ema_run(keras.optimizers.Adam)
    fused, _ = ema_run(FusedAdam)
    assert fused.optimizer.use_ema and len(fused.optimizer.variables) == 1 + 3 * 2  # step,
    for a, b in zip(fused.optimizer.variables, reference.optimizer.variables):  # m, v, average
        np.testing.assert_allclose(np.asarray(a.numpy()), np.asarray(b.numpy()), rtol=1e-5,
                                   atol=1e-7)
    for a, b in zip(fused.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_optimizer_options_follow_the_recipe():
    options = optimizer_options(dataclasses.replace(COSINE, ema_momentum=0.999), 10)
    assert options["use_ema"] and options["ema_momentum"] == 0.999
    assert options["learning_rate"].steps_per_epoch == 10
    assert not optimizer_options(Recipe(), 10)["use_ema"]
    with pytest.raises(ValueError, match="steps_per_epoch must be > 0, got 0"):
        LearningRate(Recipe(), 0)
