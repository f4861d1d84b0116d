"""What a local run shows on the terminal: a compact view of the full log, which goes to a file.

A run prints thousands of lines (absl, Beam, TensorFlow). `Capture` sends all of them (every
write to file descriptors 1 and 2: Python's, TensorFlow's C++ logging's, Beam's) to the log file,
and `CompactView` picks out, line by line, what a person follows:

    01:05:39  Transform                      started
    01:05:39  Transform                      done in 0.0 s (from cache)
    01:05:39  Trainer                        started
    01:05:40    Trainer: resumed at epoch 15 of 50 (checkpoint from 2026-12-02T00:49:07+00:00)
    01:09:10    epoch 15/50  loss 0.0140  valid acc 99.44 %  206 img/s  Trainer ETA 2 h 00 min

plus the run's own messages and its summary. The view reads the log as written, not the code
that writes it: TFX's "Component X is running/finished" and "A cached execution N is used",
Keras' `verbose=2` epoch lines ("Epoch 15/50", "550/550 - 267s - ... - loss: ... -
val_lengths_accuracy: ..."), and the Trainer's "Trainer: ..." lines.

On a terminal (a TTY), the `Terminal` also shows, within an epoch, a live line redrawn in place
about once a second and cleared before the next line of the view:

    01:06:12    epoch 15/50  step 120/550  275 img/s  epoch ETA 2 min 36 s  Trainer ETA 1 h 58 min

It comes from the Trainer's `models.progress` records, which never reach the log (that logger
does not propagate; `Capture` attaches its own handler). Elsewhere the view is as above.
"""

import contextlib
import dataclasses
import logging
import os
import re
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional

_COMPONENT = re.compile(r"\babsl: Component (\S+) is (running|finished)\.$")
_CACHED = re.compile(r"\babsl: A cached execution \d+ is used\.$")
_EPOCH = re.compile(r"^Epoch (\d+)/(\d+)$")
_EPOCH_END = re.compile(r"^(\d+)/\1 - \d+s - (.*)$")   # "550/550 - 267s - 486ms/step - loss: ..."
_TRAINER = re.compile(r"\babsl: (Trainer: .*)$")
# A Trainer's recipe (models/trainer.py logs it): its global batch, for images/s.
_RECIPE = re.compile(r"\babsl: \w+ training with Keras .*\bbatch_size=(\d+)")
# The Trainer's first epoch: Keras prints no "Epoch 1/1" line for a run of one epoch.
_FIRST_EPOCH = re.compile(r"\babsl: Trainer: .*(?:training from|resumed at) epoch (\d+) of (\d+)")
_OWN = re.compile(r"^(MNIST source: |Compute: |Pipeline root .* is locked)")
_SUMMARY = re.compile(r"^=== .* ===$")                 # local_runner's summary header
FAILED = "pipeline run failed"                         # local_runner logs it with the traceback


def duration(seconds: float) -> str:
    """'12.3 s', '4 min 05 s', '2 h 03 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def keras_metrics(text: str) -> Dict[str, float]:
    """{'loss': 0.014, 'val_lengths_accuracy': 0.9944, ...} from the part of a Keras `verbose=2`
    epoch line after the step count ('267s - 486ms/step - loss: 0.0140 - ...')."""
    metrics = {}
    for part in text.split(" - "):
        name, sep, value = part.partition(": ")
        if sep:
            try:
                metrics[name.strip()] = float(value)
            except ValueError:
                pass
    return metrics


@dataclasses.dataclass
class CompactView:
    """Turns the full log, line by line, into the terminal view (module docstring).

    batch_size   the Trainer's global batch, for images/s = steps * batch / epoch wall time;
                 each Trainer's own once it logs its recipe (the CapsNet's and the CNN's differ)
                 (wall time of the epoch as it reached the log: training and its validation pass)
    """
    batch_size: int
    component: Optional[str] = None
    component_started: float = 0.0
    cached: bool = False
    epoch: int = 0
    epochs: int = 0
    epoch_started: Optional[float] = None
    epoch_seconds: List[float] = dataclasses.field(default_factory=list)
    in_summary: bool = False
    failed: Optional[List[str]] = None  # from FAILED on

    def feed(self, line: str, now: float) -> List[str]:
        """What to show for one log line (without its newline), seen at time `now`."""
        if self.in_summary:
            return [line]
        if self.failed is not None:
            self.failed.append(line)
            return []
        if line.endswith(f": {FAILED}"):
            self.failed = [f"{self.component} failed after "
                           f"{duration(now - self.component_started)}:"] if self.component else []
            return []
        clock = time.strftime("%H:%M:%S", time.localtime(now))
        if m := _COMPONENT.search(line):
            name, state = m.groups()
            if state == "running":
                self.component, self.component_started, self.cached = name, now, False
                self.epoch_seconds = []  # each Trainer's time left from its own epochs
                return [f"{clock}  {name:<30} started"]
            how = " (from cache)" if self.cached else ""
            self.component = None
            return [f"{clock}  {name:<30} done in {duration(now - self.component_started)}{how}"]
        if _CACHED.search(line):
            self.cached = True
            return []
        if m := _RECIPE.search(line):
            self.batch_size = int(m.group(1))
            return []
        if m := _EPOCH.match(line):
            self.epoch, self.epochs = int(m.group(1)), int(m.group(2))
            self.epoch_started = now
            return []
        if (m := _EPOCH_END.match(line)) and self.epoch_started is not None:
            return [f"{clock}    {self._epoch_line(int(m.group(1)), m.group(2), now)}"]
        if m := _TRAINER.search(line):
            if first := _FIRST_EPOCH.search(line):
                self.epoch, self.epochs = int(first.group(1)), int(first.group(2))
                self.epoch_started = now
            return [f"{clock}    {m.group(1)}"]
        if _OWN.match(line):
            return [line]
        if _SUMMARY.match(line):
            self.in_summary = True
            return ["", line]
        return []

    def _epoch_line(self, steps: int, rest: str, now: float) -> str:
        seconds = now - self.epoch_started
        self.epoch_seconds.append(seconds)
        self.epoch_started = None
        metrics = keras_metrics(rest)
        accuracy = next((v for k, v in metrics.items()
                         if k.startswith("val_") and k.endswith("accuracy")), None)
        left = (self.epochs - self.epoch) * statistics.median(self.epoch_seconds)
        return "  ".join([
            f"epoch {self.epoch}/{self.epochs}",
            f"loss {metrics['loss']:.4f}" if "loss" in metrics else "loss ?",
            f"valid acc {accuracy:.2%}".replace("%", " %") if accuracy is not None
            else "valid acc ?",
            f"{steps * self.batch_size / max(seconds, 1e-6):.0f} img/s",
            f"Trainer ETA {duration(left)}" if left else "Trainer: last epoch done"])

    def failure(self) -> List[str]:
        """A failed run's error as the log has it: everything logged after local_runner's
        FAILED line (the traceback, chained ones included), under a line naming the component
        that was running; [] if the run logged no failure."""
        return self.failed or []


def progress_line(progress, now: float) -> str:
    """The live line for a `models.progress.Progress` (module docstring), logged at `now`."""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    return "  ".join([
        f"{clock}    epoch {progress.epoch}/{progress.epochs}",
        f"step {progress.step}/{progress.steps}",
        f"{progress.images_per_second:.0f} img/s",
        f"epoch ETA {duration(progress.epoch_seconds_left)}",
        f"Trainer ETA {duration(progress.run_seconds_left)}"])


class Terminal:
    """Where the view is shown: its lines, and on a TTY one live line redrawn in place ('\\r',
    then erase to the end of the line) and erased before the next line. Not a TTY (a pipe, a
    file): live lines are dropped, so the output is the view's lines alone.

    Thread-safe: `Capture` writes lines from its pump thread, live lines from the Trainer's.
    """
    ERASE = "\r\x1b[K"  # carriage return, then ANSI "erase to end of line"

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()
        self._lock = threading.Lock()
        self._showing = False  # a live line is on the screen

    def line(self, text: str) -> None:
        with self._lock:
            self.stream.write(self._erase() + text + "\n")
            self.stream.flush()

    def progress(self, text: str) -> None:
        """Redraws the live line, cut to the terminal's width (a wrapped line would not redraw
        in place)."""
        if not self.live:
            return
        with self._lock:
            self.stream.write(self.ERASE + text[:self._columns() - 1])
            self.stream.flush()
            self._showing = True

    def erase(self) -> None:
        """Erases the live line, if one is shown (at the end of the view)."""
        with self._lock:
            self.stream.write(self._erase())
            self.stream.flush()

    def _erase(self) -> str:
        showing, self._showing = self._showing, False
        return self.ERASE if showing else ""

    def _columns(self) -> int:
        """The terminal's width now (it may be resized); a huge one where the stream has none."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError):  # no file descriptor, or not a terminal's
            return sys.maxsize


class _ProgressHandler(logging.Handler):
    """Shows `models.progress` records as the terminal's live line."""

    def __init__(self, terminal: Terminal):
        super().__init__()
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        self.terminal.progress(progress_line(record.progress, record.created))


def log_path(output_dir: str, now: Optional[float] = None) -> str:
    """<output_dir>/logs/run-<UTC time>.log: one file per run, never overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return os.path.join(output_dir, "logs", f"run-{stamp}-{os.getpid()}.log")


class Capture(contextlib.AbstractContextManager):
    """Redirects file descriptors 1 and 2 (so C++ and child-process output too) into a pipe; a
    thread writes every line to `path` and shows what `view` returns on the real terminal, where
    a TTY also shows the Trainer's live progress line (never written to `path`).

    Leaving restores the terminal; a SIGKILL leaves the log written up to its last line.
    """
    _END = b"\x00capsnet-console-end\x00\n"

    def __init__(self, path: str, view: CompactView):
        self.path, self.view = path, view

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._terminal = os.dup(1), os.dup(2)
        self.terminal = Terminal(os.fdopen(self._terminal[0], "w", encoding="utf-8",
                                           errors="replace", closefd=False))
        self._live = None  # (logger, handler) while the terminal shows the live line
        if self.terminal.live:
            from models import progress  # loads Keras, as the run does anyway; only on a TTY
            self._live = progress.LOGGER, _ProgressHandler(self.terminal)
            self._live[0].addHandler(self._live[1])
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._line_buffering = getattr(sys.stdout, "line_buffering", None)
        if self._line_buffering is not None:  # lines reach the log (and the view) as printed
            sys.stdout.reconfigure(line_buffering=True)
        self._pump = threading.Thread(target=self._copy, args=(read_end,), daemon=True)
        self._pump.start()
        return self

    def _copy(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe, open(self.path, "ab") as log:
            for raw in pipe:
                if raw == self._END:
                    break
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                for text in self.view.feed(line, time.time()):
                    self.terminal.line(text)

    def __exit__(self, *exc_info):
        if self._live:
            self._live[0].removeHandler(self._live[1])
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, self._END)
        self._pump.join(timeout=30)  # it stops at _END, whoever else still holds the pipe
        self.terminal.erase()
        os.dup2(self._terminal[0], 1)
        os.dup2(self._terminal[1], 2)
        for fd in self._terminal:
            os.close(fd)
        if self._line_buffering is not None:
            sys.stdout.reconfigure(line_buffering=self._line_buffering)
        return False
