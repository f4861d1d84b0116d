"""The Trainer on two workers (MultiWorkerMirroredStrategy), proven on the CPU: two real worker
processes on 127.0.0.1, each with its own TF_CONFIG, train the real CapsNet through the
Trainer's own loop (tests/models/multiworker_child.py) while this process trains it alone
(MirroredStrategy, one replica), from the same initial weights on the same 100 images."""

import json
import os
import re

import keras
import numpy as np
import pytest

from components.multi_worker_trainer import cluster_configs, free_ports
from models.capsnet import build_capsnet
from pipeline import console
from tests.models import children, multiworker_child

HEADS = ("loss", "lengths_loss", "recon_loss", "lengths_accuracy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_cache_dir):
    """(two workers' (result, weights, stdout), one worker's (result, weights), the initial
    weights): both workers run as processes while this one trains alone."""
    tmp_path = tmp_path_factory.mktemp("multiworker")
    keras.utils.set_random_seed(3)
    initial, _ = build_capsnet()
    initial.save_weights(str(tmp_path / "initial.weights.h5"))
    workers = [children.start("multiworker_child.py", tmp_path, mnist_cache_dir,
                              f"worker{i}.npz", env={"TF_CONFIG": config})
               for i, config in enumerate(cluster_configs(free_ports(2)))]
    assert "TF_CONFIG" not in os.environ
    alone = multiworker_child.run(mnist_cache_dir, str(tmp_path / "initial.weights.h5"),
                                  str(tmp_path / "alone.npz"))
    return ([children.finish(*w) for w in workers],
            (alone, children.weights_of(tmp_path / "alone.npz")),
            initial.get_weights())


def test_two_workers_train_in_sync_on_the_chiefs_start(trained):
    (chief, w_chief, _), (other, w_other, _) = trained[0]
    assert chief["strategy"] == other["strategy"] == "CollectiveAllReduceStrategy"  # MWMS
    assert chief["replicas"] == other["replicas"] == 2
    assert chief["chief"] and not other["chief"]
    # The other worker proposed epoch 7 and weights + 1: it got the chief's, exactly, and after
    # the step (its gradients all-reduced with the chief's) both hold the very same weights.
    assert chief["start"] == other["start"] == 0
    assert len(w_chief) == len(w_other) == 11
    assert all(np.array_equal(a, b) for a, b in zip(w_chief, w_other))
    assert chief["logs"] == other["logs"] and chief["batch_logs"] == other["batch_logs"]


def test_one_step_on_two_workers_gives_the_weights_of_one_worker(trained):
    """One step on 100 images: two workers with 50 each (the global batch split by
    `trainer.distribute`, same shuffle and shifts, drawn from (seed, epoch) per global batch)
    against one worker with all 100, from the same initial weights, in float32.

    Tolerance: each worker's loss is its 50-image mean / 2 and the all-reduce sums the two
    halves' gradients, so the gradient g differs from the 100-image one only by the order of the
    float32 additions: ~1e-7 relative. Adam's first step moves a weight by
    lr * g / (|g| + eps / sqrt(1 - beta_2)) (lr = 1e-3, eps = 1e-7): +-lr, insensitive to g,
    where |g| >> 3e-6; 316 * g below, where g's rounding (~1e-7 * |g| < 1e-12) moves it by
    < 1e-9. The weights are < 0.1 in magnitude, where float32's spacing is <= 7.5e-9; so the two
    must agree to atol 1e-7 (seen: <= 2e-9), while each weight tensor moved in the step."""
    (_, w_two, _), _ = trained[0]
    (_, w_one), initial = trained[1], trained[2]
    for two, one, start in zip(w_two, w_one, initial):
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-7)
        assert not np.array_equal(one, start)  # trained


def test_the_weights_moving_average_is_kept_in_sync_on_every_worker(trained):
    """`--ema-momentum` under MultiWorkerMirroredStrategy: Adam's update of the averages runs in
    the distributed step, and every worker holds the same averages (here, after the first step,
    the weights themselves: Keras' average starts there; had the update not run, they would
    still be the initial weights, which the step moved)."""
    (chief, _, _), (other, _, _) = trained[0]
    alone = trained[1][0]
    for result in (chief, other, alone):
        assert result["ema"]["averaged"] and result["ema"]["equal_to_the_weights"]
    assert chief["ema"]["digest"] == other["ema"]["digest"]


def test_the_logs_are_every_replicas_and_match_one_worker(trained):
    """The epoch logs: Keras' per-head losses and accuracy over both workers' halves, and the
    `val_` metrics over the whole validation set (60 images: 30 per worker), equal to one
    worker's up to float32 summation order; the total loss is margin + recon_weight x recon."""
    (chief, _, _), _ = trained[0]
    alone = trained[1][0]
    assert set(chief["logs"]) == {*HEADS, *(f"val_{h}" for h in HEADS)}
    assert set(chief["batch_logs"][0]) == set(HEADS)
    assert chief["logs"] == pytest.approx(alone["logs"], rel=1e-5)
    logs = chief["logs"]
    assert logs["loss"] == pytest.approx(logs["lengths_loss"] + 0.392 * logs["recon_loss"],
                                         rel=1e-5)
    # 60 validation images: accuracy is a multiple of 1/60 only if every image counted once.
    assert logs["val_lengths_accuracy"] * 60 == pytest.approx(
        round(logs["val_lengths_accuracy"] * 60), abs=1e-4)


def test_a_nan_loss_stops_every_worker_at_the_same_step(trained):
    (chief, _, _), (other, _, _) = trained[0]
    alone = trained[1][0]
    expected = "training loss is nan at global step 2 (epoch 2, step 1 of the epoch)"
    assert chief["error"].startswith(expected) and other["error"].startswith(expected)
    assert alone["error"].startswith(expected)


def test_the_chiefs_output_feeds_the_compact_view(trained):
    """pipeline/console.py reads Keras' verbose=2 lines; the loop prints them as fit did."""
    (chief, _, stdout), _ = trained[0]
    view = console.CompactView(batch_size=100)
    shown = [text for second, line in enumerate(stdout.splitlines())  # a line a second
             for text in view.feed(line, float(second))]
    logs = chief["logs"]
    assert len(shown) == 1, stdout
    assert re.fullmatch(
        rf"\S+    epoch 1/2  loss {logs['loss']:.4f}  valid acc "
        rf"{100 * logs['val_lengths_accuracy']:.2f} %  \d+ img/s  Trainer ETA .+", shown[0])


# ----------------------------------------------- the local runner's workers (no training here)
@pytest.mark.parametrize("value, ok", [("2", True), ("1", True), ("0", False), ("-1", False)])
def test_local_runner_trainer_workers_flag(value, ok):
    import local_runner
    if ok:
        assert local_runner.parse_args(["--trainer-workers", value])[0].trainer_workers == \
            int(value)
    else:
        with pytest.raises(SystemExit) as exc:
            local_runner.parse_args(["--trainer-workers", value])
        assert exc.value.code == 2
    assert local_runner.parse_args([])[0].trainer_workers == 1  # in-process by default
    with pytest.raises(SystemExit):  # logical CPU devices are the in-process Trainer's
        local_runner.parse_args(["--trainer-workers", "2", "--cpu-replicas", "2"])


@pytest.mark.parametrize("workers", [1, 3])
def test_the_pipelines_trainer_runs_on_the_local_workers_executor_only_when_asked(workers):
    from components import multi_worker_trainer
    from pipeline import configs
    from pipeline.pipeline import create_pipeline
    pipeline = create_pipeline(pipeline_name="p", pipeline_root="/tmp/unused/root",
                               data_root="/tmp/unused/mnist", serving_dir="/tmp/unused/serving",
                               config=configs.preset("smoke"), trainer_workers=workers)
    (trainer_node,) = [c for c in pipeline.components if c.id == "Trainer"]
    executor = trainer_node.executor_spec.executor_class
    custom_config = json.loads(trainer_node.exec_properties["custom_config"])
    if workers == 1:  # exactly as before: TFX's own executor, nothing added to the config
        assert executor is not multi_worker_trainer.Executor
        assert multi_worker_trainer.WORKERS_KEY not in custom_config
    else:
        assert executor is multi_worker_trainer.Executor
        assert custom_config[multi_worker_trainer.WORKERS_KEY] == workers
        assert multi_worker_trainer.workers_of(
            {"custom_config": json.dumps(custom_config)}) == workers


def test_each_local_worker_gets_its_task_in_one_cluster_on_free_ports():
    from components import multi_worker_trainer
    ports = multi_worker_trainer.free_ports(3)
    assert len(set(ports)) == 3
    configs = [json.loads(c) for c in multi_worker_trainer.cluster_configs(ports)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == {"worker": [f"127.0.0.1:{p}" for p in ports]} for c in configs)
    assert multi_worker_trainer.workers_of({}) == 1
    with pytest.raises(ValueError, match=r"custom_config\['trainer_workers'\] must be an "
                                         r"integer >= 1, got 0"):
        multi_worker_trainer.workers_of({"custom_config": json.dumps({"trainer_workers": 0})})


def test_the_workers_lines_reach_stdout_whole_and_in_order(tmp_path, monkeypatch):
    """Two relays at once (as every worker prints `Epoch k/n` at the same moment) into an
    unbuffered stdout (PYTHONUNBUFFERED, as the tests run the runner): each line is written
    whole, the chief's as it is, worker 1's after its prefix; the tail keeps the last lines
    within TAIL_CHARS."""
    import io
    from components import multi_worker_trainer
    path = tmp_path / "stdout"
    with open(path, "wb", buffering=0) as raw:
        monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, write_through=True))
        lines = [f"Epoch {i}/2000\n" for i in range(2000)]
        relays = [multi_worker_trainer.Relay(io.StringIO("".join(lines)), prefix)
                  for prefix in ("", "worker 1: ")]
        for relay in relays:
            relay.join()
    out = path.read_text().splitlines()
    assert [l for l in out if not l.startswith("worker 1: ")] == [l.rstrip() for l in lines]
    assert [l for l in out if l.startswith("worker 1: ")] == [f"worker 1: {l.rstrip()}"
                                                            for l in lines]
    tail = relays[1].tail()
    assert tail.endswith("Epoch 1999/2000\n") and len(tail) <= multi_worker_trainer.TAIL_CHARS
