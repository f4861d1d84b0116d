"""Presets, splits and the command line of local_runner.py (no TFX run)."""

import subprocess
import sys

import pytest

import local_runner
from data import splits
from pipeline import configs


def test_splits_partition_the_official_arrays():
    ranges = splits.split_ranges(valid_size=5000, data_fraction=1.0)
    assert ranges == {"train": ("train", 0, 55000), "valid": ("train", 55000, 60000),
                      "test": ("test", 0, 10000)}


def test_data_fraction_keeps_the_first_rows_of_each_split():
    ranges = splits.split_ranges(valid_size=5000, data_fraction=0.05)
    assert ranges == {"train": ("train", 0, 2750), "valid": ("train", 55000, 55250),
                      "test": ("test", 0, 500)}
    assert splits.split_sizes(5000, 1e-6) == {"train": 1, "valid": 1, "test": 1}


@pytest.mark.parametrize("valid_size, fraction", [(0, 1.0), (60000, 1.0), (5000, 0.0),
                                                  (5000, 1.5), (5000, -0.1)])
def test_bad_split_arguments_are_refused(valid_size, fraction):
    with pytest.raises(ValueError, match="must be in"):
        splits.split_ranges(valid_size, fraction)


def test_full_preset_is_the_seed_projects_recipe_and_the_presets_differ():
    full = configs.PRESETS["full"]
    recipe = full.recipe
    assert (recipe.epochs, recipe.batch_size, recipe.learning_rate, recipe.lr_schedule,
            recipe.lr_decay, recipe.max_shift, full.data_fraction, recipe.routings,
            recipe.recon_weight, recipe.ema_momentum) == (50, 100, 1e-3, "exponential", 0.9, 2,
                                                          1.0, 3, 0.392, 0.0)
    assert full.train_steps_per_epoch() == 550
    assert full.max_test_error == 0.004
    assert list(configs.PRESETS) == ["smoke", "full"]
    assert configs.PRESETS["smoke"] != full  # no two names for one run


def test_a_removed_preset_is_refused_naming_the_presets():
    for removed in ("seed", "fast"):
        with pytest.raises(ValueError, match="the presets are smoke, full"):
            configs.preset(removed)
    proc = subprocess.run([sys.executable, "local_runner.py", "--preset", "fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'fast'" in proc.stderr
    assert "'smoke', 'full'" in proc.stderr


def test_the_baseline_cnn_shares_the_seed_and_dtypes_not_the_rest():
    config = configs.preset("full", seed=3, epochs=7, mixed_precision="none",
                            learning_rate=5e-4)
    assert config.recipe.seed == config.baseline.seed == 3
    assert config.recipe.mixed_precision == config.baseline.mixed_precision == "none"
    assert config.recipe.epochs == 7 and config.baseline.epochs == configs.FULL.baseline.epochs
    assert config.baseline.learning_rate == configs.FULL.baseline.learning_rate
    assert config.baseline.network == "cnn" and config.recipe.network == "capsnet"
    with pytest.raises(ValueError, match="baseline.network must be 'cnn'"):
        configs.RunConfig(baseline=configs.FULL.recipe)


def test_smoke_preset_is_small():
    smoke = configs.PRESETS["smoke"]
    assert sum(smoke.split_sizes().values()) == 3500
    assert smoke.recipe.epochs * smoke.train_steps_per_epoch() == 40


def test_preset_overrides_and_refusals():
    assert configs.preset("smoke", epochs=3, batch_size=None).recipe.epochs == 3
    assert configs.preset("smoke", epochs=3).recipe.batch_size == 32  # the preset's own
    with pytest.raises(ValueError, match="unknown preset 'huge'; the presets are smoke, full"):
        configs.preset("huge")
    for field, value in [("epochs", 0), ("batch_size", -1), ("steps_per_epoch", 0),
                         ("data_fraction", 0.0), ("data_fraction", 2.0)]:
        with pytest.raises(ValueError, match=field):
            configs.preset("smoke", **{field: value})


def test_runner_defaults_paths_under_output_dir(tmp_path):
    args, config = local_runner.parse_args(["--output-dir", str(tmp_path), "--epochs", "2"])
    assert args.preset == "smoke" and config.recipe.seed == 0
    assert args.pipeline_root == str(tmp_path / "pipeline_root")
    assert args.metadata_path == str(tmp_path / "metadata.sqlite")
    assert args.serving_dir == str(tmp_path / "serving_model")
    assert config.recipe.epochs == 2 and config.data_fraction == 0.05


def test_runner_help_explains_every_flag():
    out = subprocess.run([sys.executable, "local_runner.py", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ["--pipeline-root", "--serving-dir", "--preset", "--epochs", "--steps-per-epoch",
                 "--batch-size", "--data-fraction", "--data-path", "--max-test-error", "--seed"]:
        assert flag in out
    assert "--preset {smoke,full}" in out
    assert "--robustness" in out
    # The recipe's flags, from the Recipe dataclass, in a group of their own; then the checks.
    out = out[out.index("options:"):]  # past the usage lines
    recipe_group = out.index("the CapsNet's training recipe")
    checks = out.index("checking distributed execution")
    for flag in ["--epochs", "--learning-rate", "--lr-schedule", "--routings", "--seed",
                 "--mixed-precision", "--recon-weight"]:
        assert recipe_group < out.index(flag + " ") < checks, flag
    for flag in ["--cpu-replicas", "--beam-workers", "--trainer-workers"]:
        assert out.index(flag + " N") > checks, flag
    assert "--network" not in out  # the pipeline chooses each Trainer's network


def test_runner_presets_and_seed():
    for name in configs.PRESETS:
        _, config = local_runner.parse_args(["--preset", name, "--seed", "7"])
        assert config == configs.preset(name, seed=7) and config.recipe.seed == 7


def test_runner_refuses_bad_flags_with_usage_error():
    proc = subprocess.run([sys.executable, "local_runner.py", "--epochs", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "epochs must be > 0, got 0" in proc.stderr
