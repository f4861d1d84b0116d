"""What this machine computes fast, and the runtime and compute dtype chosen from it: one chooser
for every entry point (local_runner.py, the standalone trainer, the benchmark, the Docker image,
the tests). Importing this module loads no Keras, TensorFlow or other backend: the TensorFlow
settings it makes act only if made before TensorFlow starts.

The rule: TensorFlow's CPU runtime is oneDNN exactly when the CPU will compute in bfloat16, and
TensorFlow's own (Eigen) kernels otherwise; TensorFlow's BFC allocator either way (it reuses
memory instead of handing out fresh pages). Why:
  * bfloat16 compute pays only where the CPU has it natively, AMX-BF16 or AVX512_BF16 (flags
    `amx_bf16` / `avx512_bf16` in /proc/cpuinfo), and only through oneDNN: TensorFlow's own bf16
    kernels emulate it, many times slower than float32;
  * in float32, TensorFlow's own kernels train faster than oneDNN's on the CPUs where the two
    were compared.
The measurements, with their CPUs and dates: docs/results.md and docs/lab/kernel-work.md.

`mixed_precision` (RunConfig, --mixed-precision):
  auto            bfloat16 compute with float32 variables on a CPU with native bf16 and on GPUs of
                  compute capability >= 8.0; float32 elsewhere (the default)
  none            float32
  mixed_bfloat16  forced (slow where bf16 is emulated)
  mixed_float16   forced (GPUs; with loss scaling)
"""

import dataclasses
import logging
import os
import subprocess
import sys
from typing import Dict, Optional, Sequence, Tuple

AUTO = "auto"
NONE = "none"
MIXED_PRECISION_CHOICES = (AUTO, NONE, "mixed_bfloat16", "mixed_float16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags, best first
BF16_GPU_CAPABILITY = (8, 0)  # Ampere and newer compute bf16 natively

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
BFC = "TF_CPU_ALLOCATOR_USE_BFC"
TF_ENV_KEYS = (ONEDNN, BFC)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cpu:
    """The CPU's model name and feature flags, as /proc/cpuinfo lists them."""
    model: str
    flags: frozenset

    @property
    def native_bf16(self) -> Optional[str]:
        """The best native bfloat16 instruction set ('amx_bf16', 'avx512_bf16'), or None."""
        return next((flag for flag in BF16_FLAGS if flag in self.flags), None)


def parse_cpuinfo(text: str) -> Cpu:
    """Cpu from the text of /proc/cpuinfo (the first processor's 'model name' and 'flags')."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return Cpu(model=fields.get("model name", "unknown CPU"),
               flags=frozenset(fields.get("flags", "").split()))


def this_cpu(path: str = "/proc/cpuinfo") -> Cpu:
    """This machine's Cpu; an unknown CPU without flags where /proc/cpuinfo is missing."""
    try:
        with open(path) as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return Cpu(model="unknown CPU", flags=frozenset())


def check_choice(mixed_precision: Optional[str]) -> str:
    """The mixed_precision setting, validated; None (configs written before 'auto') is 'none'."""
    choice = NONE if mixed_precision is None else mixed_precision
    if choice not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, "
                         f"got {mixed_precision!r}")
    return choice


def cpu_policy(mixed_precision: Optional[str], cpu: Cpu) -> Optional[str]:
    """The Keras dtype policy for training on this CPU: a mixed policy name, or None (float32)."""
    choice = check_choice(mixed_precision)
    if choice == AUTO:
        return "mixed_bfloat16" if cpu.native_bf16 else None
    return None if choice == NONE else choice


def tf_env(mixed_precision: Optional[str], cpu: Cpu) -> Dict[str, str]:
    """TensorFlow's CPU runtime for this choice on this CPU: oneDNN where the CPU computes in
    bfloat16 (TensorFlow's own bf16 kernels emulate it), TensorFlow's own kernels otherwise."""
    bf16 = cpu_policy(mixed_precision, cpu) == "mixed_bfloat16"
    return {ONEDNN: "1" if bf16 else "0", BFC: "true"}


def apply_tf_env(mixed_precision: Optional[str] = AUTO, environ=os.environ,
                 cpu: Optional[Cpu] = None) -> Dict[str, str]:
    """Sets `tf_env`'s variables that `environ` does not already set (the user's win); returns the
    values in effect. Logs a warning when TensorFlow is already imported: then they no longer act
    in this process, only in its children."""
    for key, value in tf_env(mixed_precision, cpu or this_cpu()).items():
        environ.setdefault(key, value)
    if "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before %s were set; they act in child processes "
                    "only", ", ".join(TF_ENV_KEYS))
    return {key: environ[key] for key in TF_ENV_KEYS}


def runtime_name(environ=os.environ) -> str:
    """'oneDNN' or 'Eigen': the TensorFlow CPU kernels the environment selects (x86: oneDNN unless
    TF_ENABLE_ONEDNN_OPTS is 0)."""
    return "Eigen" if environ.get(ONEDNN, "1").strip().lower() in ("0", "false") else "oneDNN"


def gpu_capabilities() -> Tuple[Tuple[int, int], ...]:
    """Compute capabilities (major, minor) of the GPUs, one per GPU the Keras backend sees;
    () without any. Keras has no API for the capability and this package imports no backend, so
    it asks `nvidia-smi` (installed with NVIDIA's driver); (0, 0) stands for a GPU whose
    capability it cannot tell, which `compute_policy` treats as no native bf16."""
    import keras

    try:
        visible = len(keras.distribution.list_devices("gpu"))
    except RuntimeError:  # JAX without a GPU platform says so by raising
        visible = 0
    if not visible:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        found = [tuple(int(p) for p in line.strip().split(".")[:2])
                 for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        found = []
    return tuple(found[:visible]) if len(found) >= visible else ((0, 0),) * visible


def compute_policy(mixed_precision: Optional[str], cpu: Optional[Cpu] = None,
                   gpus: Optional[Sequence[Tuple[int, int]]] = None) -> Optional[str]:
    """The Keras dtype policy to build the model with: a mixed policy name, or None (float32).

    'auto' on GPUs: bfloat16 when every GPU has compute capability >= 8.0, else float32; on the
    CPU alone: `cpu_policy`. `gpus` defaults to `gpu_capabilities()` (which loads the backend).
    """
    choice = check_choice(mixed_precision)
    gpus = gpu_capabilities() if gpus is None else tuple(gpus)
    if choice == AUTO and gpus:
        return ("mixed_bfloat16" if all(tuple(c) >= BF16_GPU_CAPABILITY for c in gpus)
                else None)
    return cpu_policy(choice, cpu or this_cpu())


def describe(policy: Optional[str], cpu: Optional[Cpu] = None, environ=os.environ) -> dict:
    """What the run log, the run summary and the benchmark's JSON say about the machine."""
    cpu = cpu or this_cpu()
    return {"cpu": cpu.model, "cpu_bf16": cpu.native_bf16 or "none",
            "tf_runtime": runtime_name(environ), "compute_dtype": _dtype_of(policy)}


def format_description(description: dict) -> str:
    """`describe`'s dict as one line: 'CPU <model> (bf16: <isa>), TensorFlow runtime <r>, compute
    <dtype>'."""
    return (f"CPU {description.get('cpu', '?')} (bf16: {description.get('cpu_bf16', '?')}), "
            f"TensorFlow runtime {description.get('tf_runtime', '?')}, "
            f"compute {description.get('compute_dtype', '?')}")


def _dtype_of(policy: Optional[str]) -> str:
    return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(policy, "float32")
