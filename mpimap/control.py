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
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise MpimapError(f"cannot write the control file {path}: {exc.strerror}") from None
    try:
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            line = "\n" + line  # after a line cut short (a sender killed mid-write), start a line of our own
        os.write(fd, line.encode())  # one small O_APPEND write: lines from several senders never interleave
    finally:
        os.close(fd)


def paused_before(path: str, offset: int) -> bool:
    """Whether the commands of the control file ``path`` before ``offset`` leave the job paused.

    A pause lasts until a resume, also across runs of the job (an interrupted
    job that was paused starts paused again); a cancel ends a run, so the next
    run starts unpaused.
    """
    paused = False
    try:
        with open(path, "rb") as f:
            data = f.read(offset)
    except OSError:
        return False
    if len(data) < offset:  # the file was replaced since: what it said before is gone
        return False
    for line in data.splitlines():
        try:
            name = json.loads(line).get("command")
        except (ValueError, AttributeError):
            continue
        if name in ("pause", "resume", "cancel"):
            paused = name == "pause"
    return paused


class Watcher(threading.Thread):
    """Reads commands appended to the control file ``path`` from ``offset`` on and hands each to ``apply``.

    ``offset`` None starts at the file's end when the watcher is made: the
    lines already there belong to an earlier run.  A job's run starts where
    the previous run of the job stopped reading (its ``status.json`` says
    where), so commands sent while no run was reading are obeyed too.  A
    control file removed, replaced or truncated during the run is read again
    from its start.
    """

    def __init__(self, path: str, apply, interval: float = 0.5, offset: int | None = None):
        super().__init__(name="mpimap-control", daemon=True)
        self.path = path
        self.apply = apply
        self.interval = interval
        self.stopped = threading.Event()
        if offset is None:
            offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.offset = offset  # bytes read and obeyed (read by the status writer of a job)
        self._inode = None    # of the file read so far
        self._last = b""      # the last line read: the file still holds it just before offset, unless replaced

    def run(self):
        self.poll()
        while not self.stopped.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Obey the complete lines appended since the last poll."""
        try:
            with open(self.path, "rb") as f:
                info = os.fstat(f.fileno())
                start = max(0, self.offset - len(self._last))
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:  # a file system hiccup must not stop the job: try again next time
            log.warning("cannot read the control file %s: %s", self.path, exc)
            return
        seen = data[:self.offset - start]
        if (self._inode not in (None, info.st_ino) or info.st_size < self.offset
                or not seen.endswith(self._last)):
            log.warning("the control file %s was replaced or truncated: reading it from its start", self.path)
            self.offset, data = 0, self._reread()
        else:
            data = data[self.offset - start:]
        self._inode = info.st_ino
        complete = data[:data.rfind(b"\n") + 1]
        for line in complete.splitlines(keepends=True):
            self.offset += len(line)  # before obeying it: a report made meanwhile counts it as read
            self._last = line
            try:
                self.apply(json.loads(line))
            except Exception as exc:  # a bad command must not stop the job
                log.warning("ignored control command %r: %s", line.rstrip(b"\n"), exc)

    def _reread(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join()
