"""models/trainer.py's own pieces (the TFX run_fn is exercised end to end in tests/pipeline, on
two workers in tests/models/test_multiworker.py): the compute dtype, the config, the cluster,
the input pipeline's order and augmentation, where each worker writes."""

import json
import os

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
    strategy, train_model, inference_model = trainer.build_models(config, steps_per_epoch=10)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    assert isinstance(train_model.optimizer, FusedAdam)
    assert float(train_model.optimizer.learning_rate.numpy()) == pytest.approx(2e-3)
    assert train_model.get_layer("digit_caps").routings == 2
    assert [id(w) for w in train_model.weights] == [id(w) for w in inference_model.weights]


def test_random_shift_is_a_per_image_integer_shift_with_zero_fill():
    images = np.zeros((64, 28, 28, 1), "float32")
    images[:, 12:16, 10:14] = 1.0
    shifted = trainer.random_shift(tf.constant(images), 2, seed=[5, 0]).numpy()
    assert shifted.shape == images.shape
    moves = set()
    for moved in shifted[..., 0]:
        rows, cols = np.nonzero(moved)
        assert moved.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        moves.add((rows.min() - 12, cols.min() - 10))
    assert moves <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(moves) > 10
    np.testing.assert_array_equal(trainer.random_shift(tf.constant(images), 0, [5, 0]).numpy(),
                                  images)
    np.testing.assert_array_equal(trainer.random_shift(tf.constant(images), 2, [5, 0]).numpy(),
                                  shifted)  # a function of the seed
    assert not np.array_equal(trainer.random_shift(tf.constant(images), 2, [5, 1]).numpy(),
                              shifted)


def test_bfloat16_training_keeps_variables_and_optimizer_state_in_float32():
    config = Recipe(epochs=1, batch_size=2, max_shift=0, routings=1,
                    mixed_precision="mixed_bfloat16")
    _, train_model, _ = trainer.build_models(config, steps_per_epoch=1)
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
            train_files=["/pipeline_root/Transform/transformed_examples/5/Split-train/*"],
            eval_files=["/pipeline_root/Transform/transformed_examples/5/Split-valid/*"],
            transform_output="/pipeline_root/Transform/transform_graph/5",
            custom_config={**configs.preset("smoke", **recipe).recipe.to_custom_config(),
                           "code_fingerprint": "abc",
                           "resume_root": "/pipeline_root/Trainer/resume"},
            train_steps=40, model_run_dir="/pipeline_root/Trainer/model_run/9", base_model=None)
    first = trainer.run_fingerprint(fn_args())
    rerun = fn_args()
    rerun.model_run_dir = "/pipeline_root/Trainer/model_run/12"  # a new execution id
    assert trainer.run_fingerprint(rerun) == first
    assert trainer.resume_dir(rerun, first) == trainer.resume_dir(fn_args(), first) == \
        f"/pipeline_root/Trainer/resume/{first[:16]}"
    assert trainer.run_fingerprint(fn_args(learning_rate=2e-3)) != first
    other_code = fn_args()
    other_code.custom_config["code_fingerprint"] = "abd"
    assert trainer.run_fingerprint(other_code) != first
    warm = fn_args()
    warm.base_model = "/pipeline_root/Trainer/model/7/Format-Serving"  # warm-started: another run
    assert trainer.run_fingerprint(warm) != first


def test_warm_start_without_a_base_model_trains_from_scratch_and_says_so():
    assert trainer.warm_start(None, None).endswith("training from scratch")


def test_the_cluster_comes_from_tf_config():
    assert trainer.tf_config({}) == {} and trainer.cluster_size({}) == 1
    assert trainer.is_chief({})  # no cluster: this process writes
    two = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}
    config = {**two, "task": {"type": "worker", "index": 1}}
    assert trainer.tf_config({"TF_CONFIG": json.dumps(config)}) == config
    assert trainer.cluster_size(config) == 2
    assert trainer.is_chief({**two, "task": {"type": "worker", "index": 0}})
    assert not trainer.is_chief(config)
    vertex = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}}  # Vertex's worker pools
    assert trainer.cluster_size(vertex) == 3
    assert trainer.is_chief({**vertex, "task": {"type": "chief", "index": 0}})
    assert not trainer.is_chief({**vertex, "task": {"type": "worker", "index": 0}})
    one = {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    assert isinstance(trainer.make_strategy(one), tf.distribute.MirroredStrategy)  # 1 task
    with pytest.raises(ValueError, match=r"TF_CONFIG must be JSON, got '\{cluster'"):
        trainer.tf_config({"TF_CONFIG": "{cluster"})


def transformed(n):
    """n distinct transformed examples: image i is all i / n, label i % 10."""
    return tf.data.Dataset.from_tensor_slices({
        trainer.IMAGE_XF: np.arange(n, dtype="float32")[:, None, None, None]
        * np.ones([1, 28, 28, 1], "float32") / n,
        trainer.LABEL_XF: (np.arange(n) % 10)[:, None].astype("int64")})


def batches_of(dataset):
    return [(x["image"].numpy(), x["label"].numpy(), y["recon"].numpy())
            for x, y in dataset]


def test_an_epochs_batches_are_drawn_from_the_seed_and_the_epoch_alone():
    """What a resumed run draws at epoch e is what an uninterrupted run draws there: the order
    and the shifts of an epoch depend on (seed, epoch) only, every pass is a new order, every
    batch is full, and the decoder's target is the shifted image."""
    def epoch(e, seed=5, steps=3):  # 3 steps of 8 from 20 examples: a second pass in epoch 1
        return batches_of(trainer.train_batches(transformed(20), 8, steps, 2, seed, e))

    first = epoch(1)
    assert len(first) == 3 and all(x.shape == (8, 28, 28, 1) for x, _, _ in first)
    for (x, y, recon), again in zip(first, epoch(1)):
        np.testing.assert_array_equal(x, again[0])
        np.testing.assert_array_equal(recon, x.reshape(8, -1))
    order = lambda batches: [round(float(x.max()) * 20) for b in batches for x in b[0]]
    assert order(epoch(0)) != order(first) != order(epoch(1, seed=6))
    assert sorted(order(first)[:16]) == sorted(set(order(first)[:16]))  # a pass: no repeats
    shifted = np.concatenate([x for x, _, _ in first])
    assert (shifted == 0).any(axis=(1, 2, 3)).mean() > 0.5  # zero fill: most were moved


def test_valid_batches_are_the_split_once_unshifted():
    batches = batches_of(trainer.valid_batches(transformed(20), 8))
    assert [len(x) for x, _, _ in batches] == [8, 8, 4]
    images = np.concatenate([x for x, _, _ in batches])
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(20, dtype="float32") / 20)


def test_only_the_chief_writes_where_it_is_told(tmp_path):
    with trainer.write_dirs(True, model=str(tmp_path / "model")) as dirs:
        assert dirs == {"model": str(tmp_path / "model")}
    with trainer.write_dirs(False, model=str(tmp_path / "model"), logs="gs://x/logs") as dirs:
        assert set(dirs) == {"model", "logs"} and str(tmp_path) not in dirs["model"]
        os.makedirs(dirs["model"])
        open(os.path.join(dirs["logs"] + ".txt"), "w").close()
        scratch = os.path.dirname(dirs["model"])
    assert not os.path.exists(scratch) and not os.path.exists(tmp_path / "model")
