"""bench.train_throughput runs each mode end to end with one timed step and prints one JSON line.
No wall-clock assertions: the numbers are only checked for being there and sane."""

import json
import math

import pytest

from bench import train_throughput
from models.capsnet import hardware

COMMON_KEYS = {"mode", "images_per_s", "ms_per_step", "ms_per_step_median", "ms_per_step_min",
               "cpu_ms_per_step", "batch", "steps", "warmup", "device", "tf_version",
               "keras_version", "keras_backend", "tf_env", "cpu", "cpu_bf16", "tf_runtime",
               "compute_dtype"}


def run(capsys, *argv):
    assert train_throughput.main(list(argv)) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert COMMON_KEYS <= set(result)
    assert result["images_per_s"] > 0 and math.isfinite(result["images_per_s"])
    assert result["steps"] == 1 and result["tf_version"].startswith("2.")
    return result


def test_flops_per_image_match_the_spec():
    flops = train_throughput.capsnet_flops_per_image(routings=3)
    assert flops["forward"] == 2 * 203_202_560  # capsnet-spec.md section 11: 203.2 M MAC
    assert flops["train"] == pytest.approx(1.20e9, rel=0.01)
    assert flops["serve"] < flops["forward"]


def test_train_mode_one_step(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "train", "--steps", "1", "--warmup", "1", "--batch-size", "16",
                 "--examples", "64", "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "train" and result["batch"] == 16
    auto = hardware.describe(hardware.compute_policy("auto"))
    assert result["workers"] == result["replicas"] == 1
    assert result["compute_dtype"] == auto["compute_dtype"]
    assert {k: result[k] for k in auto} == auto  # the CPU, its bf16, the runtime, the dtype
    assert result["flops_per_image"] == train_throughput.capsnet_flops_per_image()["train"]
    assert result["gflop_per_s"] > 0
    assert 0.5 < result["loss_first"] < 1.5 and math.isfinite(result["loss_last"])


def test_train_mode_times_the_baseline_cnn_with_its_recipe(capsys, mnist_cache_dir):
    """--network cnn: the Trainer's step of the paper's CNN, at the CNN's learning rate unless
    told otherwise; its FLOPs are the CNN's (3.9 GFLOP an image forward)."""
    flops = train_throughput.cnn_flops_per_image()
    assert flops["forward"] == pytest.approx(3.93e9, rel=0.01)  # about 10x the CapsNet's
    assert train_throughput.parse_args(["--network", "cnn"]).recipe.learning_rate == 1e-4
    result = run(capsys, "--mode", "train", "--network", "cnn", "--steps", "1", "--warmup", "1",
                 "--batch-size", "2", "--examples", "16", "--data-cache-dir", mnist_cache_dir)
    assert result["network"] == "cnn" and result["batch"] == 2
    assert result["flops_per_image"] == flops["train"]
    assert 1.0 < result["loss_first"] < 4.0  # cross-entropy of 10 classes starts near ln 10


def test_train_mode_on_two_workers_with_the_compute_dtype_flag(capsys, mnist_cache_dir):
    """Two processes of the script on 127.0.0.1, MultiWorkerMirroredStrategy; the chief's line."""
    result = run(capsys, "--mode", "train", "--steps", "1", "--warmup", "1",
                 "--batch-size", "4",
                 "--examples", "16", "--mixed-precision", "none", "--routings", "1",
                 "--workers", "2", "--data-cache-dir", mnist_cache_dir)
    assert result["workers"] == 2 and result["replicas"] == 2 and result["batch"] == 4
    assert result["compute_dtype"] == "float32"
    assert 0.5 < result["loss_first"] < 1.5


def test_input_mode_one_step(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "input", "--steps", "1", "--warmup", "1",
                 "--examples", "300", "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "input" and result["batch"] == 100
    assert "flops_per_image" not in result


def test_serve_mode_one_step_on_a_fresh_export(capsys, mnist_cache_dir):
    """Without --model, an untrained CapsNet is exported through models.serving with a real
    tf.Transform graph, then timed through its serving_images signature."""
    result = run(capsys, "--mode", "serve", "--steps", "1", "--warmup", "1", "--batch-size", "10",
                 "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "serve" and result["signature"] == "serving_images"
    assert result["compute_dtype"] == "float32"  # the default export, whatever the CPU
    assert result["flops_per_image"] == train_throughput.capsnet_flops_per_image()["serve"]


def test_digitcaps_mode_one_step(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "digitcaps", "--steps", "1", "--warmup", "1",
                 "--batch-size", "8",
                 "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "digitcaps" and result["gflop_per_s"] > 0


def test_digitcaps_mode_under_xla(capsys, mnist_cache_dir, monkeypatch):
    """--jit-compile: the timed step is an XLA-compiled tf.function."""
    import tensorflow as tf
    compiled = []
    real_function = tf.function

    def function(*args, **kwargs):
        compiled.append(kwargs.get("jit_compile"))
        return real_function(*args, **kwargs)

    monkeypatch.setattr(tf, "function", function)
    result = run(capsys, "--mode", "digitcaps", "--jit-compile", "--steps", "1", "--warmup", "1",
                 "--batch-size", "8", "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "digitcaps" and result["gflop_per_s"] > 0
    assert compiled.count(True) == 1


def test_digitcaps_mode_with_chosen_chunks_forward_only(capsys, mnist_cache_dir):
    """The chunk sweep's form: two chunks of 576 children, the forward alone (a third of the
    forward-and-backward FLOPs); flags for other modes are refused."""
    result = run(capsys, "--mode", "digitcaps", "--steps", "1", "--warmup", "1",
                 "--batch-size", "8",
                 "--chunks", "2", "--forward-only", "--data-cache-dir", mnist_cache_dir)
    flops = train_throughput.capsnet_flops_per_image()["digitcaps"]
    assert result["mode"] == "digitcaps" and result["flops_per_image"] == flops // 3
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--mode", "train", "--chunks", "2"])


def test_primarycaps_mode_times_ours_and_the_backend_gradient(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "primarycaps", "--steps", "1", "--warmup", "1",
                 "--batch-size", "4",
                 "--data-cache-dir", mnist_cache_dir)
    assert result["mode"] == "primarycaps" and result["gflop_per_s"] > 0
    assert result["flops_per_image"] == 3 * 2 * 6 * 6 * 256 * 9 * 9 * 256
    assert result["backend_gradient"]["images_per_s"] > 0
    # Each gradient alone: the input's in conv2d_valid's two forms and by autodiff.
    gradients = result["gradients"]
    assert set(gradients["input"]) == {"col2im", "transposed", "backend"}
    assert set(gradients["kernel"]) == {"model", "backend"}
    assert all(ms > 0 for forms in gradients.values() for ms in forms.values())


def test_primarycaps_mode_forward_only(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "primarycaps", "--forward-only", "--steps", "1", "--warmup",
                 "1", "--batch-size", "2", "--data-cache-dir", mnist_cache_dir)
    assert result["flops_per_image"] == 2 * 6 * 6 * 256 * 9 * 9 * 256
    assert "backend_gradient" not in result


def test_matmul_mode_times_the_three_gemms_of_primarycaps(capsys, mnist_cache_dir):
    result = run(capsys, "--mode", "matmul", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                 "--data-cache-dir", mnist_cache_dir)
    gemms = result["gemms"]
    assert {name: g["shape"] for name, g in gemms.items()} == {
        "forward": [72, 20736, 256], "input_gradient": [72, 256, 20736],
        "kernel_gradient": [20736, 72, 256]}
    # The three GEMMs are the convolution's FLOPs, and the step is their sum.
    assert sum(2 * m * k * n for m, k, n in (g["shape"] for g in gemms.values())) == \
        2 * result["flops_per_image"]
    assert result["ms_per_step_median"] == pytest.approx(
        sum(g["ms_per_step_median"] for g in gemms.values()), abs=0.2)
    assert result["images_per_s"] == pytest.approx(2000 / result["ms_per_step_median"], rel=1e-3)
    for g in gemms.values():
        m, k, n = g["shape"]
        assert g["gflop_per_s"] == pytest.approx(2 * m * k * n / g["ms_per_step_median"] / 1e6,
                                                 rel=1e-2)
    assert result["compute_dtype"] == hardware.describe(
        hardware.compute_policy("auto"))["compute_dtype"]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--warmup", "0"], ["--batch-size", "0"],
                                  ["--mode", "train", "--model", "x"], ["--max-shift", "14"],
                                  ["--workers", "0"], ["--mode", "serve", "--workers", "2"],
                                  ["--mode", "train", "--forward-only"],
                                  ["--mode", "primarycaps", "--chunks", "2"],
                                  ["--mode", "primarycaps", "--jit-compile"],
                                  ["--mode", "digitcaps", "--network", "cnn"]])
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        train_throughput.parse_args(argv)
    assert exc.value.code == 2
