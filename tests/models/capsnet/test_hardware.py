"""models/capsnet/hardware.py: the CPU's features -> TensorFlow's CPU runtime and the compute
dtype, chosen before TensorFlow starts; the user's environment and flags win."""

import logging
import sys

import pytest

from models.capsnet import hardware

AMX = hardware.parse_cpuinfo(
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n")
AVX512_BF16 = hardware.parse_cpuinfo("model name : AMD EPYC\nflags : avx2 avx512f avx512_bf16\n")
AVX2 = hardware.parse_cpuinfo("model name : AMD EPYC 7B12\nflags : fpu sse2 avx2 fma\n")


def test_cpuinfo_names_the_model_and_its_native_bf16():
    assert AMX.model == "Intel(R) Xeon(R) Platinum 8481C" and AMX.native_bf16 == "amx_bf16"
    assert AVX512_BF16.native_bf16 == "avx512_bf16"
    assert AVX2.native_bf16 is None
    assert hardware.parse_cpuinfo("").model == "unknown CPU"
    assert hardware.this_cpu("/nonexistent/cpuinfo").flags == frozenset()


@pytest.mark.parametrize("choice, cpu, policy, onednn", [
    ("auto", AMX, "mixed_bfloat16", "1"), ("auto", AVX512_BF16, "mixed_bfloat16", "1"),
    ("auto", AVX2, None, "0"), ("none", AMX, None, "0"), (None, AMX, None, "0"),
    ("mixed_bfloat16", AVX2, "mixed_bfloat16", "1"), ("mixed_float16", AMX, "mixed_float16", "0"),
])
def test_the_runtime_follows_the_cpus_compute_dtype(choice, cpu, policy, onednn):
    assert hardware.cpu_policy(choice, cpu) == policy
    assert hardware.compute_policy(choice, cpu, gpus=()) == policy
    assert hardware.tf_env(choice, cpu) == {"TF_ENABLE_ONEDNN_OPTS": onednn,
                                            "TF_CPU_ALLOCATOR_USE_BFC": "true"}


def test_auto_on_gpus_is_bf16_from_compute_capability_8():
    assert hardware.compute_policy("auto", AVX2, gpus=[(8, 0), (9, 0)]) == "mixed_bfloat16"
    assert hardware.compute_policy("auto", AMX, gpus=[(7, 5)]) is None  # a T4 computes float32
    assert hardware.compute_policy("auto", AMX, gpus=[(8, 6), (7, 0)]) is None
    assert hardware.compute_policy("none", AVX2, gpus=[(9, 0)]) is None
    assert hardware.compute_policy("mixed_float16", AVX2, gpus=[(7, 0)]) == "mixed_float16"


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError, match=r"mixed_precision must be one of .*got 'bf16'"):
        hardware.compute_policy("bf16", AMX, gpus=())


def test_apply_tf_env_fills_in_what_the_user_did_not_set(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    environ = {"TF_ENABLE_ONEDNN_OPTS": "0", "OTHER": "x"}
    effective = hardware.apply_tf_env("auto", environ, cpu=AMX)
    assert effective == {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    assert environ == {**effective, "OTHER": "x"}
    assert hardware.apply_tf_env("auto", {}, cpu=AMX)["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert hardware.apply_tf_env("auto", {}, cpu=AVX2)["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_apply_tf_env_warns_when_tensorflow_is_already_loaded(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    with caplog.at_level(logging.WARNING, logger=hardware.__name__):
        hardware.apply_tf_env("auto", {}, cpu=AVX2)
    assert "TensorFlow was imported before" in caplog.text
    monkeypatch.delitem(sys.modules, "tensorflow")
    caplog.clear()
    hardware.apply_tf_env("auto", {}, cpu=AVX2)
    assert caplog.text == ""


def test_describe_names_cpu_bf16_runtime_and_dtype():
    environ = {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert hardware.describe("mixed_bfloat16", AMX, environ) == {
        "cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_bf16": "amx_bf16",
        "tf_runtime": "oneDNN", "compute_dtype": "bfloat16"}
    described = hardware.describe(None, AVX2, {"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert described["tf_runtime"] == "Eigen" and described["compute_dtype"] == "float32"
    assert hardware.runtime_name({}) == "oneDNN"  # TensorFlow's own default on x86
    assert hardware.format_description(described) == (
        "CPU AMD EPYC 7B12 (bf16: none), TensorFlow runtime Eigen, compute float32")


def test_hardware_loads_no_backend():
    import subprocess
    code = ("import sys; import models.capsnet.hardware; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))")
    from tests.conftest import REPO
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
