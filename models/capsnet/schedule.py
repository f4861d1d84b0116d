"""The recipe's learning-rate schedule and weight averaging, as options of any Keras Adam
(keras.optimizers.Adam, or the Trainer's FusedAdam) and in keras.ops only (any backend).

The schedule lives in the optimizer: it is a function of the optimizer's step count, which the
checkpoint holds (models/capsnet/resume.py), so a resumed run continues it with no callback.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from models.capsnet.recipe import Recipe


@keras.saving.register_keras_serializable(package="capsnet")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Recipe.learning_rate_at as a table of one float32 per training step, looked up at the
    optimizer's step count: step n is step n % steps_per_epoch of epoch n // steps_per_epoch.
    Steps past the last epoch keep the last step's rate.

    Tabulating keeps the formula defined once (recipe.py, plain Python); the table is small
    (epochs x steps_per_epoch: 27,500 floats for 50 epochs of 550 steps).
    """

    def __init__(self, recipe: Recipe, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch!r}")
        self.recipe, self.steps_per_epoch = recipe, steps_per_epoch
        self.table = np.array([recipe.learning_rate_at(epoch, step, steps_per_epoch)
                               for epoch in range(recipe.epochs)
                               for step in range(steps_per_epoch)], dtype="float32")

    def __call__(self, step):
        """step: the optimizer's iteration count (0-based: the step about to be taken)."""
        index = ops.minimum(ops.cast(step, "int32"), len(self.table) - 1)
        return ops.take(ops.convert_to_tensor(self.table), index)

    def get_config(self):
        return {"recipe": self.recipe.to_custom_config(), "steps_per_epoch": self.steps_per_epoch}

    @classmethod
    def from_config(cls, config):
        return cls(Recipe.from_custom_config(config["recipe"]), config["steps_per_epoch"])


def optimizer_options(recipe: Recipe, steps_per_epoch: int) -> dict:
    """Keyword arguments of a Keras Adam that trains `recipe` in epochs of `steps_per_epoch`
    steps: its learning-rate schedule and, with ema_momentum > 0, weight averaging."""
    return {"learning_rate": LearningRate(recipe, steps_per_epoch),
            "use_ema": recipe.ema_momentum > 0, "ema_momentum": recipe.ema_momentum}


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block, `model`'s trainable variables hold its optimizer's moving averages of
    them (use_ema); after it, the trained values again, exactly (copied back, not swapped by
    arithmetic). Every model sharing the variables (the inference model) sees the same. Without
    use_ema: nothing changes. Yields whether the weights are the averaged ones.

    Keras keeps the averages in the optimizer's `_model_variables_moving_average`, in the order
    of `model.trainable_variables` (as keras.callbacks.SwapEMAWeights reads them); at the end of
    fit() it writes them into the model for good (`finalize_variable_values`).
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # LossScale's
    if not optimizer.use_ema:
        yield False
        return
    variables = model.trainable_variables
    trained = [ops.convert_to_numpy(v) for v in variables]
    for variable, average in zip(variables, optimizer._model_variables_moving_average):
        variable.assign(average)
    try:
        yield True
    finally:
        for variable, value in zip(variables, trained):
            variable.assign(value)
