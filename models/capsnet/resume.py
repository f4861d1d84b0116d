"""Resuming an interrupted training run at the next epoch, from a checkpoint written after every
epoch: the weights and the optimizer state (one Keras .weights.h5) and a small JSON record (the
epochs done, the run's fingerprint, when it was saved).

Keras' own BackupAndRestore writes in place (a kill mid-write leaves a broken file) and restores
any checkpoint it finds. Here:
  * every write is atomic: the new file is written beside the old one and renamed over it, the
    record last, so a checkpoint is the last complete epoch or nothing;
  * a checkpoint belongs to one run: its fingerprint (of the inputs, the code and the recipe)
    must equal the new run's, else training starts fresh and says why;
  * a checkpoint that cannot be read is refused with the reason, removed, and training starts
    fresh; nothing else is lost;
  * the checkpoint is removed once training has finished (the caller exports the model).
The learning-rate schedule is a function of the optimizer's step count (models/capsnet/
schedule.py), which the checkpoint holds, so epoch k gets the same rates whether or not the run
was interrupted.

Files go through `fs`, so the Trainer can keep checkpoints on gs:// (tf.io.gfile) while the
standalone trainer uses the local disk; Keras writes .weights.h5 to either.
"""

import datetime
import json
import logging
import os

import keras

RECORD = "checkpoint.json"

log = logging.getLogger(__name__)


class LocalFiles:
    """The file operations a checkpoint needs, on the local disk (the Trainer passes gfile's)."""

    exists = staticmethod(os.path.exists)
    remove = staticmethod(os.remove)
    listdir = staticmethod(os.listdir)

    @staticmethod
    def makedirs(path):
        os.makedirs(path, exist_ok=True)

    @staticmethod
    def rename(src, dst):
        os.replace(src, dst)

    @staticmethod
    def read_text(path):
        with open(path) as f:
            return f.read()

    @staticmethod
    def write_text(path, text):
        with open(path, "w") as f:
            f.write(text)


class Resume(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch into `directory`; `restore()` before fit() gives the
    epoch to start at (0: fresh) and a line for the run log and summary. The caller removes the
    checkpoint (`remove()`) once the trained model is safely exported.

    fingerprint: what is being trained (inputs, code, recipe); a checkpoint with another
    fingerprint is never restored.
    """

    def __init__(self, directory, fingerprint, epochs, fs=LocalFiles):
        super().__init__()
        self.directory, self.fingerprint, self.epochs, self.fs = directory, fingerprint, epochs, fs
        self.record = os.path.join(directory, RECORD)

    def restore(self, model):
        """(initial_epoch, message): loads the checkpoint into `model` (built and compiled) when
        it belongs to this run; 0 and why not otherwise."""
        if not self.fs.exists(self.record):
            return 0, f"no checkpoint in {self.directory}: training from epoch 1 of {self.epochs}"
        try:
            record = json.loads(self.fs.read_text(self.record))
            if record.get("fingerprint") != self.fingerprint:
                return self._fresh("it is of another run (other inputs, code or recipe)")
            epoch, weights, saved_at = int(record["epoch"]), record["weights"], record["saved_at"]
            if not 0 < epoch < self.epochs:
                return self._fresh(f"it records epoch {epoch}, outside 1..{self.epochs - 1}")
        except Exception as e:  # an unreadable record: refuse it, start fresh
            return self._fresh(f"it cannot be read ({type(e).__name__}: {e})")
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        state = model.weights + model.optimizer.variables
        before = [v.numpy() for v in state]
        try:
            model.load_weights(os.path.join(self.directory, weights))
        except Exception as e:  # an unreadable weights file: nothing of it stays in the model
            for variable, value in zip(state, before):
                variable.assign(value)
            return self._fresh(f"it cannot be read ({type(e).__name__}: {e})")
        return epoch, (f"resumed at epoch {epoch + 1} of {self.epochs} "
                       f"(checkpoint from {saved_at})")

    def _fresh(self, why):
        self.remove()
        return 0, (f"refused the checkpoint in {self.directory}: {why}; removed it, training "
                   f"from epoch 1 of {self.epochs}")

    def on_epoch_end(self, epoch, logs=None):
        """Weights under a new name, then the record (renamed into place: the commit), then the
        previous weights go. A kill at any point leaves the last committed epoch readable."""
        self.fs.makedirs(self.directory)
        previous = self._committed_weights()
        weights = f"epoch-{epoch + 1:04d}.weights.h5"
        partial = os.path.join(self.directory, f".partial-{weights}")
        self.model.save_weights(partial)
        self.fs.rename(partial, os.path.join(self.directory, weights))
        record = {"epoch": epoch + 1, "epochs": self.epochs, "weights": weights,
                  "fingerprint": self.fingerprint,
                  "saved_at": datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds")}
        partial = os.path.join(self.directory, f".partial-{RECORD}")
        self.fs.write_text(partial, json.dumps(record))
        self.fs.rename(partial, self.record)
        if previous and previous != weights:
            self.fs.remove(os.path.join(self.directory, previous))

    def _committed_weights(self):
        try:
            return json.loads(self.fs.read_text(self.record))["weights"]
        except Exception:
            return None

    def remove(self):
        """Removes the checkpoint: its record first (so nothing half-removed is ever restored),
        then every file of the directory."""
        if self.fs.exists(self.record):
            self.fs.remove(self.record)
        if self.fs.exists(self.directory):
            for name in self.fs.listdir(self.directory):
                self.fs.remove(os.path.join(self.directory, name))
