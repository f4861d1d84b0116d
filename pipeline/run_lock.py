"""One local run per pipeline root at a time.

Two LocalDagRunner processes on one pipeline root would interleave executions of the same nodes
and race on the same output dirs. `hold` takes an exclusive, non-blocking `flock` on
`<pipeline_root>/.run.lock`; the kernel drops it when the process ends, however it ends
(kill -9 included), so a crashed run never leaves a stale lock behind.
"""

import contextlib
import fcntl
import json
import os
import time


class Busy(RuntimeError):
    """Another process holds the pipeline root."""


@contextlib.contextmanager
def hold(pipeline_root: str):
    """Holds the lock on pipeline_root for the duration of the block; raises Busy if taken."""
    os.makedirs(pipeline_root, exist_ok=True)
    path = os.path.join(pipeline_root, ".run.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise Busy(f"pipeline root {pipeline_root} is in use by another run ({holder}); "
                       f"wait for it to finish or use another --output-dir/--pipeline-root") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
