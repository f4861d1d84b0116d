"""One benchmark sitting: this project and the seed timed alternately, round after round, on this
machine; the medians as a table in the form docs/results.md records them, with the CPU named and
the speed targets of its class of CPU judged (TARGETS).

  python -m bench.sitting [--rounds 3] [--baseline DIR] [--log FILE]

Every round runs, in this order, each as its own process (the runtime and dtype are chosen
before TensorFlow starts, so one process cannot time two of them):

  train_auto   python -m bench.train_throughput --mode train      (--mixed-precision auto)
  train_none   the same with --mixed-precision none               (float32)
  seed_train   python SEED_BENCH/seed_speed.py SEED_CODE STEPS    (the seed's train_on_batch)
  serve_f32    python -m bench.train_throughput --mode serve      (the default float32 export)
  serve_bf16   the same with --serving-precision mixed_bfloat16
  seed_serve   python SEED_BENCH/seed_infer_speed.py SEED_CODE    (the seed's predict)

then, with --baseline DIR (another checkout, e.g. `git worktree add /tmp/base <commit>`), this
project's four runs again from DIR, named baseline_*. Alternating like this is the point: the
machines are shared VMs and a figure swings by 20 % from one minute to the next, so only figures
taken side by side in one sitting compare. Batch 100 throughout, the batch of the targets.

The environment passes through untouched: a TF_ENABLE_ONEDNN_OPTS you set wins over the chooser
(models/capsnet/hardware.py) in every run, and ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN to emulate an
AVX2-only CPU (docs/results.md says what that does and does not emulate). The header names them.

Prints a line per run on stderr as it goes, then the markdown table on stdout. --log appends one
JSON line per run: round, name, command, directory, exit status, and the run's own JSON line or
the tail of its stderr. Exits 1 when a run failed (its cells read "failed"), after the table.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from models.capsnet import hardware  # light: no TensorFlow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TARGET_BATCH = 100
# The speed targets at batch 100, images/s of these runs' medians, by the CPU's best native bf16:
# AMX-BF16 (set on a Sapphire Rapids) and AVX512_BF16 without AMX (set on an AMD EPYC Zen 5).
# CPUs without native bf16 have none: there the rule is "no slower than before", a comparison
# with --baseline.
TARGETS = {
    "amx_bf16": {"train_auto": 450.0, "serve_bf16": 1500.0},
    "avx512_bf16": {"train_auto": 400.0, "serve_bf16": 1400.0},
}
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", *hardware.TF_ENV_KEYS)


@dataclasses.dataclass(frozen=True)
class Run:
    """One benchmark process of a round: `argv` after the Python executable, run in `cwd`;
    `field` is the images/s key of the JSON line it prints last; `versus` the run it is
    compared with in the table ('' for none)."""
    name: str
    label: str
    argv: tuple
    cwd: str
    field: str = "images_per_s"
    versus: str = ""


def plan(args) -> List[Run]:
    """The runs of one round, in the order they run."""
    train = ("-m", "bench.train_throughput", "--mode", "train", "--steps", str(args.train_steps),
             "--warmup", str(args.warmup), "--batch-size", str(TARGET_BATCH), *args.ours_args)
    serve = ("-m", "bench.train_throughput", "--mode", "serve", "--steps", str(args.serve_steps),
             "--warmup", str(args.warmup), "--batch-size", str(TARGET_BATCH), *args.ours_args)

    def ours(cwd, prefix, tag):
        return [
            Run(prefix + "train_auto", f"training, auto{tag}", train, cwd, versus="seed_train"),
            Run(prefix + "train_none", f"training, float32 (`none`){tag}",
                train + ("--mixed-precision", "none"), cwd, versus="seed_train"),
            Run(prefix + "serve_f32", f"serving, float32 export (the default){tag}", serve, cwd,
                versus="seed_serve"),
            Run(prefix + "serve_bf16", f"serving, bfloat16 export{tag}",
                serve + ("--serving-precision", "mixed_bfloat16"), cwd, versus="seed_serve"),
        ]

    tag = f", {commit_of(REPO)}" if args.baseline else ""
    mine = ours(REPO, "", tag)
    seed = [] if args.no_seed else [
        Run("seed_train", "training, the seed (`train_on_batch`)",
            (os.path.join(args.seed_bench, "seed_speed.py"), args.seed_code,
             str(args.train_steps)), REPO),
        Run("seed_serve", "inference, the seed (`predict`)",
            (os.path.join(args.seed_bench, "seed_infer_speed.py"), args.seed_code), REPO,
            field="seed_infer_images_per_s")]
    runs = mine[:2] + seed[:1] + mine[2:] + seed[1:]
    if args.baseline:
        runs += ours(os.path.abspath(args.baseline), "baseline_", f", {commit_of(args.baseline)}")
    return runs


def select(runs: Sequence[Run], names: Optional[Sequence[str]]) -> List[Run]:
    """The runs named (all for None), in plan order; a run compared with one left out is
    compared with nothing. ValueError for a name the plan does not have."""
    unknown = sorted(set(names or ()) - {run.name for run in runs})
    if unknown:
        raise ValueError(f"unknown runs {unknown}; this plan has {[r.name for r in runs]}")
    runs = [run for run in runs if names is None or run.name in names]
    kept = {run.name for run in runs}
    return [run if run.versus in kept else dataclasses.replace(run, versus="") for run in runs]


def commit_of(directory: str) -> str:
    """The short commit of a git checkout ('-dirty' after it with uncommitted changes), else
    the directory's name."""
    proc = subprocess.run(["git", "-C", directory, "describe", "--always", "--dirty",
                           "--abbrev=7"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else os.path.basename(directory)


def last_json(stdout: str) -> Optional[dict]:
    """The last line of `stdout` that parses as a JSON object, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def execute(run: Run, timeout: float) -> dict:
    """Runs one benchmark process; its log record: exit status, images/s (None when it failed),
    its JSON line or the tail of its stderr."""
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        proc = subprocess.run([sys.executable, *run.argv], cwd=run.cwd, capture_output=True,
                              text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, "", f"timed out after {timeout:.0f} s: {e}"
    result = last_json(stdout) if rc == 0 else None
    value = result.get(run.field) if result else None
    record = {"name": run.name, "utc": started.strftime("%H:%M:%S"), "cwd": run.cwd,
              "argv": ["python", *run.argv], "rc": rc,
              "images_per_s": value if isinstance(value, (int, float)) else None}
    if record["images_per_s"] is None:
        record["error"] = (stderr or stdout)[-2000:]
    else:
        record["result"] = result
    return record


def describe_run(records: Sequence[dict]) -> str:
    """' → bfloat16, oneDNN' from the first successful record that names its dtype and
    runtime (train_throughput's JSON does), else ''."""
    for record in records:
        result = record.get("result") or {}
        if "compute_dtype" in result:
            runtime = result.get("tf_runtime")
            return f" → {result['compute_dtype']}" + (f", {runtime}" if runtime else "")
    return ""


def medians(records: Dict[str, List[dict]]) -> Dict[str, Optional[float]]:
    """Each run's median images/s over the rounds that measured one; None where every round
    failed."""
    present = {name: [r["images_per_s"] for r in rs if r["images_per_s"] is not None]
               for name, rs in records.items()}
    return {name: statistics.median(v) if v else None for name, v in present.items()}


def table(runs: Sequence[Run], records: Dict[str, List[dict]], rounds: int) -> str:
    """The markdown table: a row per run, a column per round, the median and the ratio of
    medians against the run it is compared with."""
    middle = medians(records)
    head = ["images/s", *[f"round {i + 1}" for i in range(rounds)], "**median**", "vs the seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run.label + describe_run(records[run.name])]
        cells += [fmt(r["images_per_s"]) for r in records[run.name]]
        cells += [""] * (rounds - len(records[run.name]))
        mine, theirs = middle[run.name], middle.get(run.versus)
        cells.append(f"**{fmt(mine)}**")
        cells.append(f"{mine / theirs:.2f}×" if mine and theirs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value: Optional[float]) -> str:
    return "failed" if value is None else f"{value:,.1f}"


def verdict(cpu: hardware.Cpu, medians: Dict[str, Optional[float]]) -> List[str]:
    """The targets of this CPU's class (TARGETS, by its best native bf16) against the medians;
    a CPU without native bf16 has none, and saying so is the verdict."""
    targets = TARGETS.get(cpu.native_bf16)
    if targets is None:
        return ["This CPU has no native bf16 (AMX-BF16 or AVX512_BF16): no speed target applies; "
                "compare with --baseline (no slower than before)."]
    lines = []
    for name, target in targets.items():
        value = medians.get(name)
        state = ("not run" if name not in medians else "failed" if value is None
                 else "met" if value >= target else "NOT met")
        lines.append(f"{cpu.native_bf16} target {name} ≥ {target:,.0f} images/s: median "
                     f"{fmt(value) if name in medians else '-'}, {state}")
    return lines


def header(cpu: hardware.Cpu, environ=os.environ) -> List[str]:
    """What the sitting ran on: the CPU, its SIMD and bf16 flags, the cores, the environment
    variables that change the runtime."""
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
            if f in cpu.flags]
    env = [f"{key}={environ[key]}" for key in ISA_ENV if key in environ]
    return [f"CPU: {cpu.model}, {os.cpu_count()} cores; flags: {' '.join(simd) or 'none listed'}; "
            f"native bf16: {cpu.native_bf16 or 'none'}",
            "environment: " + (" ".join(env) if env else "none of " + ", ".join(ISA_ENV))]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--train-steps", type=int, default=10,
                   help="timed training steps per run (default: 10)")
    p.add_argument("--serve-steps", type=int, default=20,
                   help="timed serving batches per run (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--baseline", help="another checkout whose four runs join every round")
    p.add_argument("--seed-code", default=os.path.join(SHARED, "seed-capsnet-keras"),
                   help="the seed's code (default: ../shared/seed-capsnet-keras)")
    p.add_argument("--seed-bench", default=os.path.join(SHARED, "bench-seed"),
                   help="the seed's timing harness (default: ../shared/bench-seed)")
    p.add_argument("--no-seed", action="store_true", help="leave the seed out")
    p.add_argument("--runs", type=lambda s: s.split(","), default=None,
                   help="only these runs, comma-separated names (default: all)")
    p.add_argument("--ours-args", type=shlex.split, default=[],
                   help="more flags for every train_throughput run, e.g. '--data-cache-dir D'")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (default: 900)")
    p.add_argument("--log", help="append a JSON line per run to this file")
    args = p.parse_args(argv)
    for name in ("rounds", "train_steps", "serve_steps", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.baseline and not os.path.isdir(args.baseline):
        p.error(f"--baseline {args.baseline!r} is not a directory")
    wants_seed = args.runs is None or {"seed_train", "seed_serve"} & set(args.runs)
    if wants_seed and not args.no_seed:
        for path in (args.seed_code, args.seed_bench):
            if not os.path.isdir(path):
                p.error(f"the seed's {path!r} is not a directory: pass --seed-code and "
                        "--seed-bench, or --no-seed")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = select(plan(args), args.runs)
    except ValueError as e:
        print(f"bench.sitting: {e}", file=sys.stderr)
        return 2
    cpu = hardware.this_cpu()
    started = datetime.datetime.now(datetime.timezone.utc)
    records = {run.name: [] for run in runs}
    for round_ in range(1, args.rounds + 1):
        for run in runs:
            record = {"round": round_, **execute(run, args.timeout)}
            records[run.name].append(record)
            print(f"round {round_} {record['utc']} {run.name}: {fmt(record['images_per_s'])}",
                  file=sys.stderr, flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
    ended = datetime.datetime.now(datetime.timezone.utc)
    print("\n".join([
        *header(cpu), f"sitting: {started:%Y-%m-%d %H:%M}–{ended:%H:%M} UTC, {args.rounds} "
        f"alternating rounds, batch {TARGET_BATCH}", "", table(runs, records, args.rounds), "",
        *verdict(cpu, medians(records))]))
    failed = any(r["images_per_s"] is None for rs in records.values() for r in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
