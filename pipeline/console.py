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
"""

import contextlib
import dataclasses
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

    batch_size   the Trainer's global batch, for images/s = steps * batch / epoch wall time
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
                return [f"{clock}  {name:<30} started"]
            how = " (from cache)" if self.cached else ""
            self.component = None
            return [f"{clock}  {name:<30} done in {duration(now - self.component_started)}{how}"]
        if _CACHED.search(line):
            self.cached = True
            return []
        if m := _EPOCH.match(line):
            self.epoch, self.epochs = int(m.group(1)), int(m.group(2))
            self.epoch_started = now
            return []
        if (m := _EPOCH_END.match(line)) and self.epoch_started is not None:
            return [f"{clock}    {self._epoch_line(int(m.group(1)), m.group(2), now)}"]
        if m := _TRAINER.search(line):
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


def log_path(output_dir: str, now: Optional[float] = None) -> str:
    """<output_dir>/logs/run-<UTC time>.log: one file per run, never overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return os.path.join(output_dir, "logs", f"run-{stamp}-{os.getpid()}.log")


class Capture(contextlib.AbstractContextManager):
    """Redirects file descriptors 1 and 2 (so C++ and child-process output too) into a pipe; a
    thread writes every line to `path` and shows what `view` returns on the real terminal.

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
                    os.write(self._terminal[0], (text + "\n").encode())

    def __exit__(self, *exc_info):
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, self._END)
        self._pump.join(timeout=30)  # it stops at _END, whoever else still holds the pipe
        os.dup2(self._terminal[0], 1)
        os.dup2(self._terminal[1], 2)
        for fd in self._terminal:
            os.close(fd)
        if self._line_buffering is not None:
            sys.stdout.reconfigure(line_buffering=self._line_buffering)
        return False
