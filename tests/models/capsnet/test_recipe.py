"""models/capsnet/recipe.py: the one training recipe, its checks, and its round trip through the
Trainer's custom_config."""

import dataclasses

import pytest

from models.capsnet.losses import RECON_WEIGHT
from models.capsnet.recipe import LATER_FIELDS, Recipe
from pipeline import configs


def test_recipe_reads_old_and_new_custom_configs():
    new = configs.preset("full", mixed_precision="mixed_float16").recipe.to_custom_config()
    assert Recipe.from_custom_config(new).mixed_precision == "mixed_float16"
    old = {k: v for k, v in new.items() if k not in LATER_FIELDS}  # before the fields existed
    assert Recipe.from_custom_config(old) == dataclasses.replace(
        Recipe(), mixed_precision="none", serving_precision="float32", seed=0,
        lr_schedule="exponential", warmup_epochs=0.0, ema_momentum=0.0, recon_weight=0.392)
    assert configs.RunConfig().recipe.to_custom_config()["mixed_precision"] == "auto"
    with pytest.raises(KeyError):
        Recipe.from_custom_config({k: v for k, v in old.items() if k != "epochs"})


def test_every_field_travels_through_custom_config():
    recipe = Recipe(epochs=3, batch_size=7, learning_rate=2e-3, lr_decay=0.5, max_shift=1,
                    routings=2, mixed_precision="none", serving_precision="mixed_bfloat16",
                    seed=5, lr_schedule="cosine", warmup_epochs=0.5, ema_momentum=0.99,
                    recon_weight=0.1)
    custom_config = {**recipe.to_custom_config(), "code_fingerprint": "abc"}  # as the pipeline
    assert set(recipe.to_custom_config()) == {f.name for f in dataclasses.fields(Recipe)}
    assert Recipe.from_custom_config(custom_config) == recipe


def test_recipe_refuses_bad_values_naming_the_field():
    for field, value in [("epochs", 0), ("batch_size", -1), ("routings", 0),
                         ("learning_rate", 0.0), ("lr_decay", 1.5), ("max_shift", 14),
                         ("mixed_precision", "bf16"), ("serving_precision", "float16"),
                         ("seed", -1), ("seed", 1.5), ("lr_schedule", "step"),
                         ("warmup_epochs", 1.0), ("ema_momentum", 1.0), ("recon_weight", -0.1)]:
        with pytest.raises(ValueError, match=f"{field} must be"):
            Recipe(**{field: value})
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[0, epochs = 5\), got 5"):
        Recipe(epochs=5, lr_schedule="cosine", warmup_epochs=5)
    with pytest.raises(ValueError, match="routings must be > 0, got 0"):
        Recipe.from_custom_config({**Recipe().to_custom_config(), "routings": 0})


def test_learning_rate_schedule_and_serving_policy():
    recipe = Recipe()
    assert [recipe.learning_rate_at(e) for e in range(3)] == pytest.approx([1e-3, 9e-4, 8.1e-4])
    assert recipe.learning_rate_at(2, 549, 550) == recipe.learning_rate_at(2)  # per epoch
    cosine = Recipe(epochs=10, learning_rate=2e-3, lr_schedule="cosine", warmup_epochs=1.0)
    # per step: linear from 0 over epoch 1, the peak at epoch 2's first step, half of it half-way
    # through the remaining 4,950 steps (epoch 5, step 275), about 0 at the last step
    assert [cosine.learning_rate_at(e, s, 550) for e, s in [(0, 0), (0, 275), (1, 0), (5, 275),
                                                           (9, 549)]] == pytest.approx(
        [0.0, 1e-3, 2e-3, 1e-3, 0.0], abs=1e-9)
    assert recipe.recon_weight == RECON_WEIGHT == pytest.approx(0.0005 * 784)
    assert recipe.serving_policy() is None
    assert Recipe(serving_precision="mixed_bfloat16").serving_policy() == "mixed_bfloat16"
