"""models/capsnet/resume.py: a checkpoint after every epoch, resumed only by the same run,
written atomically; a broken one is refused with the reason and training starts fresh."""

import json
import os

import keras
import numpy as np
import pytest

from models.capsnet import resume as resume_lib
from models.capsnet.resume import Resume


def small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


DATA = (np.random.default_rng(0).normal(size=(32, 4)).astype("float32"),
        np.random.default_rng(1).normal(size=(32, 1)).astype("float32"))


def train(model, callback, epochs, initial_epoch=0):
    return model.fit(*DATA, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                     shuffle=False, callbacks=[callback])


def test_resumes_weights_optimizer_state_and_epoch(tmp_path):
    first = small_model()
    saver = Resume(str(tmp_path), "run-a", epochs=5)
    train(first, saver, epochs=2)  # epochs 1 and 2 done, as if killed now
    record = json.loads((tmp_path / resume_lib.RECORD).read_text())
    assert record["epoch"] == 2 and record["fingerprint"] == "run-a"
    assert sorted(os.listdir(tmp_path)) == [resume_lib.RECORD, "epoch-0002.weights.h5"]

    second = small_model()
    restorer = Resume(str(tmp_path), "run-a", epochs=5)
    epoch, message = restorer.restore(second)
    assert epoch == 2 and message.startswith("resumed at epoch 3 of 5 (checkpoint from ")
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(second.optimizer.iterations.numpy()) == int(first.optimizer.iterations.numpy()) == 8
    for a, b in zip(first.optimizer.variables, second.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    history = train(second, restorer, epochs=5, initial_epoch=epoch)
    assert len(history.history["loss"]) == 3
    restorer.remove()
    assert os.listdir(tmp_path) == []


def test_another_run_starts_fresh_and_says_so(tmp_path):
    train(small_model(), Resume(str(tmp_path), "run-a", epochs=5), epochs=1)
    epoch, message = Resume(str(tmp_path), "run-b", epochs=5).restore(small_model())
    assert epoch == 0
    assert "of another run (other inputs, code or recipe)" in message
    assert "training from epoch 1 of 5" in message
    assert os.listdir(tmp_path) == []  # refused, so removed
    epoch, message = Resume(str(tmp_path / "none"), "run-a", epochs=5).restore(small_model())
    assert epoch == 0 and message.startswith("no checkpoint in ")


@pytest.mark.parametrize("damage", ["weights", "record"])
def test_a_broken_checkpoint_is_refused_with_the_reason(tmp_path, damage):
    train(small_model(), Resume(str(tmp_path), "run-a", epochs=5), epochs=2)
    target = tmp_path / ("epoch-0002.weights.h5" if damage == "weights" else resume_lib.RECORD)
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # half-written
    model = small_model()
    before = [w.numpy().copy() for w in model.weights]
    epoch, message = Resume(str(tmp_path), "run-a", epochs=5).restore(model)
    assert epoch == 0 and "cannot be read (" in message and "training from epoch 1" in message
    assert os.listdir(tmp_path) == []
    for a, b in zip(before, model.weights):  # nothing half-loaded
        np.testing.assert_array_equal(a, b.numpy())


def test_a_kill_before_the_record_is_renamed_leaves_the_previous_epoch(tmp_path, monkeypatch):
    model = small_model()
    saver = Resume(str(tmp_path), "run-a", epochs=5)
    train(model, saver, epochs=1)
    renames = []
    real_rename = resume_lib.LocalFiles.rename

    def rename_then_die(src, dst):
        renames.append(dst)
        if dst.endswith(resume_lib.RECORD):
            raise KeyboardInterrupt  # killed between the weights and the record
        real_rename(src, dst)

    monkeypatch.setattr(resume_lib.LocalFiles, "rename", staticmethod(rename_then_die))
    with pytest.raises(KeyboardInterrupt):
        train(model, saver, epochs=2, initial_epoch=1)
    monkeypatch.undo()
    epoch, message = Resume(str(tmp_path), "run-a", epochs=5).restore(small_model())
    assert epoch == 1 and "resumed at epoch 2 of 5" in message
