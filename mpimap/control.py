"""Steering a running job through a control file: one JSON command per line, appended.

No port is opened: a command is one line appended to the job's control file
(``DIR/control`` for a submitted job, ``RESULTS.h5.control`` beside the
results of a plain ``mpimap run``), from this machine or any other that
shares the file system; rank 0 of the running job reads new lines twice a
second.  Commands: ``pause``, ``resume``, ``cancel``, ``loglevel``.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from .errors import MpimapError

COMMANDS = ("pause", "resume", "cancel", "loglevel")
log = logging.getLogger("mpimap.control")


def control_path(results: str) -> str:
    """The control file of a plain ``mpimap run`` writing ``results``."""
    return f"{results}.control"


def results_control(results: str) -> str:
    """The control file of the job writing ``results``; refuse if no job is writing it.

    The results file of a submitted job (``DIR/results.h5`` beside
    ``DIR/job.json``) is steered through the job's own control file.
    """
    if not os.path.exists(f"{results}.lock"):
        raise MpimapError(f"no running job is writing {results}; commands reach only a running job")
    folder = os.path.dirname(os.path.abspath(results))
    if os.path.basename(results) == "results.h5" and os.path.exists(os.path.join(folder, "job.json")):
        return os.path.join(folder, "control")
    return control_path(results)


def send(path: str, command: dict) -> None:
    """Append ``command`` (``{"command": NAME, ...}``) to the control file ``path``."""
    if command.get("command") not in COMMANDS:
        raise MpimapError(f"unknown control command {command.get('command')!r}; known: {', '.join(COMMANDS)}")
    line = json.dumps(command) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise MpimapError(f"cannot write the control file {path}: {exc.strerror}") from None
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines from several senders never interleave
    finally:
        os.close(fd)


class Watcher(threading.Thread):
    """Reads commands appended to the control file ``path`` after it was created and hands each to ``apply``.

    Lines already there when the watcher is made belong to an earlier run of
    the job; lines appended between making and starting it are read at once.
    """

    def __init__(self, path: str, apply, interval: float = 0.5):
        super().__init__(name="mpimap-control", daemon=True)
        self.path = path
        self.apply = apply
        self.interval = interval
        self.stopped = threading.Event()
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def run(self):
        self.poll()
        while not self.stopped.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:  # a file system hiccup must not stop the job: try again next time
            log.warning("cannot read the control file %s: %s", self.path, exc)
            return
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                self.apply(json.loads(line))
            except Exception as exc:  # a bad command must not stop the job
                log.warning("ignored control command %r: %s", line, exc)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()
