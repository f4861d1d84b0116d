"""Training progress within an epoch, for a person watching the run.

An epoch of the full recipe lasts minutes, and Keras' `verbose=2` says nothing until it ends.
`ProgressLog`, a Keras callback, logs a `Progress` record (step k of n, images/s, the time left
in the epoch and in the training) to `LOGGER`, at most once every `every_seconds`. That logger
does not propagate: progress never reaches the run's log (a line a second for hours is noise
there) and shows only where a live view attaches its own handler to it (pipeline/console.py, on a
terminal). Records carry the `Progress` as their `progress` attribute.
"""

import dataclasses
import logging
import time

import keras

LOGGER = logging.getLogger(__name__)
LOGGER.propagate = False       # never into the run's log: only a live view's handler shows it
LOGGER.setLevel(logging.INFO)  # whatever the root's level: the live view decides what to show


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where training stands: `step` of `steps` done in epoch `epoch` of `epochs` (both from 1).

    images_per_second   in this epoch, since its first step ended (the first step of a run also
                        traces and compiles; an epoch's first also starts the data pipeline)
    epoch_seconds_left  its remaining steps at that rate, plus the last pause between epochs
                        (the validation pass, end-of-epoch callbacks such as the checkpoint)
    run_seconds_left    that, plus the later epochs at that rate, each with that pause
    """
    epoch: int
    epochs: int
    step: int
    steps: int
    images_per_second: float
    epoch_seconds_left: float
    run_seconds_left: float


def estimate(epoch: int, epochs: int, step: int, steps: int, batch_size: int,
             steps_per_second: float, pause_seconds: float) -> Progress:
    """The Progress after `step` of `steps` steps of epoch `epoch` (from 1) of `epochs`, training
    at `steps_per_second` batches of `batch_size` images, with `pause_seconds` between epochs
    (0 until the first epoch has ended)."""
    epoch_left = (steps - step) / steps_per_second + pause_seconds
    later_epochs = (epochs - epoch) * (steps / steps_per_second + pause_seconds)
    return Progress(epoch=epoch, epochs=epochs, step=step, steps=steps,
                    images_per_second=steps_per_second * batch_size,
                    epoch_seconds_left=epoch_left, run_seconds_left=epoch_left + later_epochs)


class ProgressLog(keras.callbacks.Callback):
    """Logs a `Progress` to `LOGGER` at most every `every_seconds` (0: after every step), from
    the second step of each epoch on: the end of its first step starts the epoch's clock.

    steps_per_epoch, epochs   as given to fit (epochs counts those done before a resume too)
    batch_size                the global batch: images per step, all replicas together
    The epoch number comes from `on_epoch_begin`, which counts from fit's initial_epoch, and the
    step from `on_train_batch_end`'s batch index, so steps_per_execution > 1 counts right.
    Cost per step: one clock read.
    """

    def __init__(self, steps_per_epoch: int, epochs: int, batch_size: int,
                 every_seconds: float = 1.0):
        super().__init__()
        for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"ProgressLog: {name} must be >= 1, got {value}")
        if every_seconds < 0:
            raise ValueError(f"ProgressLog: every_seconds must be >= 0, got {every_seconds}")
        self.steps, self.epochs, self.batch_size = steps_per_epoch, epochs, batch_size
        self.every_seconds = every_seconds
        self._epoch = 0               # from 1
        self._clock = None            # (steps done, time) at the end of the epoch's first step
        self._logged = 0.0            # time of the last record
        self._last_step_end = None    # time the last training step ended
        self._pause = 0.0             # seconds from the last epoch's last step to this epoch

    def on_epoch_begin(self, epoch, logs=None):
        now = time.monotonic()
        if self._last_step_end is not None:
            self._pause = now - self._last_step_end
        self._epoch, self._clock = epoch + 1, None

    def on_train_batch_end(self, batch, logs=None):
        now = self._last_step_end = time.monotonic()
        step = batch + 1  # Keras' batch index: the last step of the execution that ended
        if self._clock is None:
            self._clock, self._logged = (step, now), now
            return
        started_step, started = self._clock
        if now - self._logged < self.every_seconds or now == started:  # a coarse clock
            return
        self._logged = now
        progress = estimate(self._epoch, self.epochs, step, self.steps, self.batch_size,
                            (step - started_step) / (now - started), self._pause)
        LOGGER.info("%s", progress, extra={"progress": progress})
