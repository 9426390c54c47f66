"""Steering a running job through a file beside its results (``RESULTS.h5.control``).

No port is opened: a command is one JSON line appended to the control file,
from this machine or any other that shares the file system, and rank 0 of the
running job reads new lines twice a second.  Commands today: ``loglevel``.
"""

from __future__ import annotations

import json
import os
import threading

from .errors import MpimapError


def control_path(results: str) -> str:
    return f"{results}.control"


def send(results: str, command: dict) -> None:
    """Append a command for the job writing ``results``; refuse if no job is writing it."""
    if not os.path.exists(f"{results}.lock"):
        raise MpimapError(f"no running job is writing {results}; commands reach only a running job")
    line = json.dumps(command) + "\n"
    fd = os.open(control_path(results), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines from several senders never interleave
    finally:
        os.close(fd)


class Watcher(threading.Thread):
    """Reads commands appended to the control file after the job started and hands each to ``apply``."""

    def __init__(self, results: str, apply, interval: float = 0.5):
        super().__init__(name="mpimap-control", daemon=True)
        self.path = control_path(results)
        self.apply = apply
        self.interval = interval
        self.stopped = threading.Event()
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0  # old commands are not ours

    def run(self):
        while not self.stopped.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                self.apply(json.loads(line))
            except Exception as exc:  # a bad command must not stop the job
                import logging

                logging.getLogger("mpimap.control").warning("ignored control command %r: %s", line, exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join()
