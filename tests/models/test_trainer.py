"""models/trainer.py's own pieces (the TFX run_fn is exercised end to end in tests/pipeline):
the compute dtype, the config, the input pipeline's augmentation."""

import numpy as np
import pytest
import tensorflow as tf

from models import trainer
from models.capsnet.recipe import Recipe
from models.optimizers import FusedAdam


def test_compute_policy_is_the_hardware_choice_and_says_so(monkeypatch):
    from models.capsnet import hardware
    # The message itself, not log capture: which loggers earlier tests quieted varies.
    messages = []
    monkeypatch.setattr(trainer.logging, "info", lambda msg, *args: messages.append(msg % args))
    assert trainer.compute_policy("mixed_bfloat16") == "mixed_bfloat16"  # forced
    assert trainer.compute_policy("none") is None
    assert trainer.compute_policy("auto") == hardware.compute_policy("auto")
    cpu = hardware.this_cpu()
    assert len(messages) == 3 and all(cpu.model in m and "tf_runtime" in m for m in messages)
    assert "compute_dtype bfloat16" in messages[0] and "compute_dtype float32" in messages[1]


def test_build_models_compiles_under_mirrored_strategy_with_fused_adam():
    config = Recipe(epochs=1, batch_size=4, learning_rate=2e-3, routings=2)
    strategy, train_model, inference_model = trainer.build_models(config)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert isinstance(train_model.optimizer, FusedAdam)
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


def test_bfloat16_training_keeps_variables_and_optimizer_state_in_float32():
    config = Recipe(epochs=1, batch_size=2, max_shift=0, routings=1,
                    mixed_precision="mixed_bfloat16")
    _, train_model, _ = trainer.build_models(config)
    assert train_model.get_layer("primary_caps").compute_dtype == "bfloat16"
    x = np.zeros((2, 28, 28, 1), "float32")
    x[:, 10:18, 10:18] = 1.0
    y = np.eye(10, dtype="float32")[[3, 7]]
    loss = train_model.train_on_batch({"image": x, "label": y},
                                      {"lengths": y, "recon": x.reshape(2, -1)})[0]
    assert np.isfinite(loss)
    assert {w.dtype for w in train_model.weights} == {"float32"}
    slots = [v for v in train_model.optimizer.variables if v.name not in ("iteration",
                                                                         "learning_rate")]
    assert len(slots) == 2 * len(train_model.trainable_weights)  # Adam's m and v
    assert {v.dtype for v in slots} == {"float32"}
    assert all(np.any(v.numpy()) for v in slots[::7])  # the step updated them


def test_a_rerun_of_the_same_inputs_finds_the_checkpoint_and_another_recipe_does_not():
    import types
    from pipeline import configs
    def fn_args(**recipe):
        return types.SimpleNamespace(
            train_files=["/root/Transform/transformed_examples/5/Split-train/*"],
            eval_files=["/root/Transform/transformed_examples/5/Split-valid/*"],
            transform_output="/root/Transform/transform_graph/5",
            custom_config={**configs.preset("smoke", **recipe).recipe.to_custom_config(),
                           "code_fingerprint": "abc", "resume_root": "/root/Trainer/resume"},
            train_steps=40, model_run_dir="/root/Trainer/model_run/9", base_model=None)
    first = trainer.run_fingerprint(fn_args())
    rerun = fn_args()
    rerun.model_run_dir = "/root/Trainer/model_run/12"  # a new execution id
    assert trainer.run_fingerprint(rerun) == first
    assert trainer.resume_dir(rerun, first) == trainer.resume_dir(fn_args(), first) == \
        f"/root/Trainer/resume/{first[:16]}"
    assert trainer.run_fingerprint(fn_args(learning_rate=2e-3)) != first
    other_code = fn_args()
    other_code.custom_config["code_fingerprint"] = "abd"
    assert trainer.run_fingerprint(other_code) != first
    warm = fn_args()
    warm.base_model = "/root/Trainer/model/7/Format-Serving"  # warm-started: another run
    assert trainer.run_fingerprint(warm) != first


def test_warm_start_without_a_base_model_trains_from_scratch_and_says_so():
    assert trainer.warm_start(None, None).endswith("training from scratch")
