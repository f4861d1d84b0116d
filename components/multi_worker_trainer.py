"""Trainer executor for local runs on N worker processes: TFX's GenericExecutor, run the way
Vertex runs a multi-worker Trainer, on 127.0.0.1.

With `custom_config[WORKERS_KEY]` = N > 1, `Do` starts N processes of TFX's own entry point,
`python -m tfx.scripts.run_executor --executor_class_path <GenericExecutor> --inputs ...
--outputs ... --exec-properties ...` (the same arguments Vertex's training client passes), each
with its TF_CONFIG: a cluster of N `worker` tasks on free ports of 127.0.0.1, task index i.
run_fn (models/trainer.py) then trains under MultiWorkerMirroredStrategy, and worker 0 (the
chief) writes the model. Every worker's output reaches this process's output as it comes, worker
0's as is (the run log and the compact view read its epoch lines), the others' after a
`worker <i>: ` prefix. The first worker to fail stops the others and fails the component with
its output's tail; a killed runner takes its workers with it. Without the key, or with 1:
GenericExecutor in this process, as before.
"""

import collections
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

from absl import logging
from tfx import types
from tfx.components.trainer import executor as trainer_executor
from tfx.types import artifact_utils

WORKERS_KEY = "trainer_workers"
GENERIC_EXECUTOR = "tfx.components.trainer.executor.GenericExecutor"
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_CHARS = 6000
_STDOUT_LOCK = threading.Lock()  # the relays' lines never interleave
# A run_fn message as absl writes it in a worker: "I1202 19:46:12.739953 1402 trainer.py:395] ..."
_TRAINER_MESSAGE = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] (Trainer: .*)$")  # of a failed worker's output, in the error


def workers_of(exec_properties: Dict[str, Any]) -> int:
    """N from the Trainer's custom_config (a JSON string in exec_properties); 1 when absent."""
    custom_config = json.loads(exec_properties.get("custom_config") or "null") or {}
    workers = custom_config.get(WORKERS_KEY, 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"custom_config[{WORKERS_KEY!r}] must be an integer >= 1, got "
                         f"{workers!r}")
    return workers


def free_ports(n: int) -> List[int]:
    """n TCP ports of 127.0.0.1 that were free a moment ago (held together, so distinct)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_configs(ports: List[int]) -> List[str]:
    """The TF_CONFIG of each of len(ports) workers on 127.0.0.1 (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]


def executor_command(input_dict, output_dict, exec_properties) -> List[str]:
    """TFX's entry point running GenericExecutor on this execution's artifacts and properties."""
    return [sys.executable, "-m", "tfx.scripts.run_executor",
            "--executor_class_path", GENERIC_EXECUTOR,
            "--inputs", artifact_utils.jsonify_artifact_dict(input_dict),
            "--outputs", artifact_utils.jsonify_artifact_dict(output_dict),
            "--exec-properties", json.dumps(exec_properties, sort_keys=True)]


def worker_env(tf_config: str) -> Dict[str, str]:
    """This process's environment, with the worker's TF_CONFIG and the project on PYTHONPATH
    (TFX imports the run_fn by name)."""
    path = os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TF_CONFIG": tf_config, "PYTHONPATH": path}


# Each worker starts as `python -c DIE_WITH_PARENT <command>`: that process asks the kernel to
# SIGKILL it when this one dies (PR_SET_PDEATHSIG, kept across exec), then becomes <command>.
# (A subprocess preexec_fn would run Python in the forked child, unsafe with gRPC's threads.)
DIE_WITH_PARENT = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def run_workers(command: List[str], workers: int, poll_seconds: float = 0.5) -> None:
    """Runs `command` as `workers` processes, one TF_CONFIG each, and waits for all of them;
    RuntimeError naming the first that fails (its exit status and output's tail), after stopping
    the others."""
    procs, relays = [], []
    try:
        for index, config in enumerate(cluster_configs(free_ports(workers))):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", DIE_WITH_PARENT, *command], env=worker_env(config),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"))
            relays.append(Relay(procs[-1].stdout, "" if index == 0 else f"worker {index}: "))
        while True:
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                index = failed[0]
                relays[index].join()
                raise RuntimeError(
                    f"Trainer worker {index} of {workers} failed (exit status "
                    f"{procs[index].returncode}); its output's tail:\n{relays[index].tail()}")
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(poll_seconds)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for relay in relays:
            relay.join()


class Relay(threading.Thread):
    """Copies a worker's output lines to this process's stdout, each after `prefix` (worker 0's
    as they are: the compact view reads its epoch lines), keeping the last TAIL_CHARS. The
    chief's own messages ("Trainer: resumed at epoch ...", in absl's format there) are logged
    here too, so that the run's log and view show them as they show an in-process Trainer's."""

    def __init__(self, stream, prefix: str):
        super().__init__(daemon=True)
        self.stream, self.prefix = stream, prefix
        self.lines = collections.deque()
        self.chars = 0
        self.start()

    def run(self):
        for line in self.stream:
            with _STDOUT_LOCK:  # one write a line: unbuffered, print writes the newline apart
                sys.stdout.write(f"{self.prefix}{line.rstrip()}\n")
                sys.stdout.flush()
            if not self.prefix and (message := _TRAINER_MESSAGE.match(line)):
                logging.info("%s", message.group(1))
            self.lines.append(line)
            self.chars += len(line)
            while self.chars > TAIL_CHARS and len(self.lines) > 1:
                self.chars -= len(self.lines.popleft())

    def tail(self) -> str:
        return "".join(self.lines)


class Executor(trainer_executor.GenericExecutor):
    """GenericExecutor, on `custom_config[WORKERS_KEY]` local worker processes (module doc)."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]],
           output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        workers = workers_of(exec_properties)
        if workers == 1:
            return super().Do(input_dict, output_dict, exec_properties)
        logging.info("Trainer: %d worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy)",
                     workers)
        run_workers(executor_command(input_dict, output_dict, exec_properties), workers)
