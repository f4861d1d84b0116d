"""models/progress.py: the estimate's arithmetic, and the callback in a real Keras fit and in the
Trainer's own loop (models.trainer.train), on a softmax classifier and real MNIST images: the
callback reads only Keras' hooks, not the model."""

import logging

import keras
import pytest
import tensorflow as tf

from models import progress, trainer


def test_estimate_extrapolates_the_rate_and_the_pause_between_epochs():
    p = progress.estimate(epoch=2, epochs=5, step=100, steps=500, batch_size=100,
                          steps_per_second=2.0, pause_seconds=30.0)
    assert p == progress.Progress(epoch=2, epochs=5, step=100, steps=500, images_per_second=200.0,
                                  epoch_seconds_left=400 / 2 + 30,  # 230
                                  run_seconds_left=230 + 3 * (500 / 2 + 30))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1, got 0"),
    ({"batch_size": -1}, "batch_size must be >= 1, got -1"),
    ({"every_seconds": -0.5}, "every_seconds must be >= 0, got -0.5")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        progress.ProgressLog(**{"steps_per_epoch": 6, "epochs": 3, "batch_size": 8, **kwargs})


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def fit_with(callback, mnist_arrays, initial_epoch, loop="fit"):
    """6 steps of 8 real MNIST images per epoch, epochs initial_epoch+1 .. 3, by Keras' `fit` or
    the Trainer's `train` (loop): (the records of a handler on progress.LOGGER, those of a handler
    on the root logger, as a log file's)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = mnist_arrays.x_train[:48].reshape(48, 784).astype("float32") / 255.0
    shown, logged = Records(), Records()
    progress.LOGGER.addHandler(shown)
    logging.getLogger().addHandler(logged)
    try:
        if loop == "fit":
            model.fit(x, mnist_arrays.y_train[:48], batch_size=8, epochs=3,
                      initial_epoch=initial_epoch, verbose=0, callbacks=[callback])
        else:
            batches = tf.data.Dataset.from_tensor_slices((x, mnist_arrays.y_train[:48])).batch(8)
            trainer.train(tf.distribute.get_strategy(), model, lambda epoch: batches,
                          batches.take(1), epochs=3, initial_epoch=initial_epoch,
                          steps_per_epoch=6, callbacks=[callback], verbose=0)
    finally:
        progress.LOGGER.removeHandler(shown)
        logging.getLogger().removeHandler(logged)
    return shown.records, logged.records


@pytest.mark.parametrize("loop", ["fit", "train"])
def test_every_step_after_the_first_of_each_epoch_is_logged_to_its_own_logger_only(
        mnist_arrays, loop):
    records, logged = fit_with(progress.ProgressLog(6, 3, 8, every_seconds=0), mnist_arrays,
                               initial_epoch=1, loop=loop)  # a resumed run: epochs 2 and 3
    shown = [r.progress for r in records]
    assert [(p.epoch, p.epochs, p.step, p.steps) for p in shown] == [
        (epoch, 3, step, 6) for epoch in (2, 3) for step in range(2, 7)]
    assert all(r.getMessage() == str(r.progress) for r in records)
    assert all(p.images_per_second > 0 for p in shown)
    for p in shown:
        if p.epoch == 3:  # the last epoch: what is left of the run is what is left of it
            assert p.run_seconds_left == p.epoch_seconds_left
        else:
            assert p.run_seconds_left > p.epoch_seconds_left
    assert shown[4].epoch_seconds_left == 0  # epoch 2 done, and no pause measured yet
    assert shown[9].epoch_seconds_left > 0  # the last step of epoch 3 still counts the pause
    assert not [r for r in logged if r.name == progress.LOGGER.name]  # it does not propagate


def test_nothing_is_logged_more_often_than_every_seconds(mnist_arrays):
    assert fit_with(progress.ProgressLog(6, 3, 8, every_seconds=3600), mnist_arrays,
                    initial_epoch=0)[0] == []
