"""bench.sitting: the plan of a round, the table and the verdict on the targets from known
records, and two real sittings of one short run (no wall-clock assertions: only that the figures it prints are the
ones its runs measured)."""

import json
import subprocess

import pytest

from bench import sitting
from models.capsnet import hardware


@pytest.fixture
def seed_dirs(tmp_path):
    """Stand-in paths for the seed's code and harness: the plan only names them."""
    code, bench = tmp_path / "seed_code", tmp_path / "seed_bench"
    code.mkdir()
    bench.mkdir()
    return ["--seed-code", str(code), "--seed-bench", str(bench)]


def record(value, round_=1):
    return {"round": round_, "images_per_s": value}


def test_a_round_alternates_ours_and_the_seed_at_batch_100(seed_dirs, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    runs = sitting.plan(sitting.parse_args([*seed_dirs, "--baseline", str(base)]))
    assert [r.name for r in runs] == [
        "train_auto", "train_none", "seed_train", "serve_f32", "serve_bf16", "seed_serve",
        "baseline_train_auto", "baseline_train_none", "baseline_serve_f32", "baseline_serve_bf16"]
    by_name = {r.name: r for r in runs}
    for run in runs:
        if not run.name.startswith("seed"):
            argv = list(run.argv)
            assert argv[:2] == ["-m", "bench.train_throughput"]
            assert argv[argv.index("--batch-size") + 1] == "100"
            assert run.cwd == (str(base) if run.name.startswith("baseline") else sitting.REPO)
            assert run.versus == ("seed_train" if "train" in run.name else "seed_serve")
    assert "--mixed-precision" not in by_name["train_auto"].argv  # auto: the default
    assert by_name["train_none"].argv[-2:] == ("--mixed-precision", "none")
    assert by_name["serve_bf16"].argv[-2:] == ("--serving-precision", "mixed_bfloat16")
    assert by_name["seed_serve"].field == "seed_infer_images_per_s"
    assert by_name["seed_train"].argv[0].endswith("seed_speed.py")


def test_selecting_runs_keeps_plan_order_and_drops_comparisons_with_runs_left_out(seed_dirs):
    runs = sitting.plan(sitting.parse_args(seed_dirs))
    chosen = sitting.select(runs, ["seed_train", "serve_f32", "train_auto"])
    assert [(r.name, r.versus) for r in chosen] == [
        ("train_auto", "seed_train"), ("seed_train", ""), ("serve_f32", "")]
    with pytest.raises(ValueError, match="unknown runs \\['trian_auto'\\]"):
        sitting.select(runs, ["trian_auto"])


def test_the_table_quotes_medians_of_the_rounds_that_ran_and_their_ratio():
    runs = [sitting.Run("train_auto", "training, auto", (), "", versus="seed_train"),
            sitting.Run("seed_train", "training, the seed", (), "")]
    records = {"train_auto": [record(300.0), record(None, 2), record(350.0, 3)],
               "seed_train": [record(90.0), record(100.0, 2), record(95.0, 3)]}
    rows = sitting.table(runs, records, rounds=3).splitlines()
    assert rows[0] == "| images/s | round 1 | round 2 | round 3 | **median** | vs the seed |"
    assert rows[2] == "| training, auto | 300.0 | failed | 350.0 | **325.0** | 3.42× |"
    assert rows[3] == "| training, the seed | 90.0 | 100.0 | 95.0 | **95.0** |  |"


def test_a_run_that_never_succeeded_has_no_median_and_no_ratio():
    runs = [sitting.Run("serve_bf16", "serving", (), "", versus="seed_serve"),
            sitting.Run("seed_serve", "the seed", (), "")]
    records = {"serve_bf16": [record(None)], "seed_serve": [record(1_234.5)]}
    rows = sitting.table(runs, records, rounds=1).splitlines()
    assert rows[2] == "| serving | failed | **failed** |  |"
    assert rows[3] == "| the seed | 1,234.5 | **1,234.5** |  |"


def test_each_class_of_cpu_is_judged_against_its_own_targets():
    plain = hardware.Cpu("AMD EPYC", frozenset({"avx2"}))
    (line,) = sitting.verdict(plain, {"train_auto": 999.0, "serve_bf16": 9999.0})
    assert "no native bf16" in line and "--baseline" in line
    amx = hardware.Cpu("Intel Xeon", frozenset({"avx512_bf16", "amx_bf16"}))
    assert sitting.verdict(amx, {"train_auto": 450.0, "serve_bf16": 1_499.9}) == [
        "amx_bf16 target train_auto ≥ 450 images/s: median 450.0, met",
        "amx_bf16 target serve_bf16 ≥ 1,500 images/s: median 1,499.9, NOT met"]
    assert sitting.verdict(amx, {"train_auto": None}) == [
        "amx_bf16 target train_auto ≥ 450 images/s: median failed, failed",
        "amx_bf16 target serve_bf16 ≥ 1,500 images/s: median -, not run"]
    avx512 = hardware.Cpu("AMD EPYC", frozenset({"avx2", "avx512_bf16"}))
    assert sitting.verdict(avx512, {"train_auto": 399.9, "serve_bf16": 1_400.0}) == [
        "avx512_bf16 target train_auto ≥ 400 images/s: median 399.9, NOT met",
        "avx512_bf16 target serve_bf16 ≥ 1,400 images/s: median 1,400.0, met"]


def test_the_last_json_object_line_is_the_result():
    assert sitting.last_json('log\n{"a": 1}\nnoise\n{"b": 2}\n{broken\n') == {"b": 2}
    assert sitting.last_json("no json at all\n") is None


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--no-seed", "--baseline", "/no/such/dir"], "is not a directory"),
    (["--seed-code", "/no/such/seed"], "pass --seed-code and --seed-bench, or --no-seed"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sitting.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_real_sitting_prints_the_figures_its_runs_measured(tmp_path, capsys, mnist_cache_dir):
    log = tmp_path / "sitting.jsonl"
    rc = sitting.main(["--rounds", "1", "--runs", "train_none", "--no-seed", "--train-steps",
                       "1", "--warmup", "1", "--log", str(log),
                       "--ours-args", f"--examples 64 --data-cache-dir {mnist_cache_dir}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["round"], r["name"], r["rc"]) for r in records] == [(1, "train_none", 0)]
    values = [r["images_per_s"] for r in records]
    assert all(v > 0 for v in values)
    for r in records:  # the run's own JSON line: float32 under the chooser's runtime, batch 100
        assert r["result"]["compute_dtype"] == "float32" and r["result"]["batch"] == 100
        assert r["result"]["cpu"] == hardware.this_cpu().model
    row = next(line for line in out.splitlines() if line.startswith("| training, float32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "training, float32 (`none`) → float32, " + records[0]["result"]["tf_runtime"]
    assert cells[1] == f"{values[0]:,.1f}"
    assert cells[2] == f"**{values[0]:,.1f}**" and cells[3] == ""  # the median of one round
    assert out.splitlines()[0].startswith(f"CPU: {hardware.this_cpu().model}, ")
    assert ("no native bf16" in out) == (hardware.this_cpu().native_bf16 is None)


def test_a_failing_run_reads_failed_and_fails_the_sitting(tmp_path, capsys):
    log = tmp_path / "sitting.jsonl"
    rc = sitting.main(["--rounds", "1", "--runs", "serve_f32", "--no-seed", "--log", str(log),
                       "--ours-args", "--steps 0"])  # the benchmark's own usage error
    assert rc == 1
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["rc"] == 2 and entry["images_per_s"] is None
    assert "--steps must be >= 1" in entry["error"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| serv"))
    assert row == "| serving, float32 export (the default) | failed | **failed** |  |"


def test_a_checkout_is_named_by_its_commit_and_marked_dirty_with_changes(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert sitting.commit_of(str(repo)) == head
    (repo / "f").write_text("2")
    assert sitting.commit_of(str(repo)) == head + "-dirty"
    assert sitting.commit_of(str(tmp_path)) == tmp_path.name  # not a checkout
