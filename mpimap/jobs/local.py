"""This machine as a batch system: the job script runs detached (its own session), no queue.

The batch id is ``HOST:PID`` of the script's shell, the leader of a new
session; the job lives as long as that session (mpiexec ``exec``s in the
shell's place).  Open MPI's ranks stay in the session, each in a process group
of its own; MPICH gives each rank a session of its own: signals reach them
through mpiexec, and they die with their launcher (:mod:`mpimap.orphans`).  Only
this host can tell whether it is alive: from another host its state is unknown.
A PID is reused once its process has ended, so the submission also records
the leader's start (boot id and start time, :meth:`Local.leader`): a session
whose leader started at another time is somebody else's, never the job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from ..errors import MpimapError
from .batch import COMMAND_TIMEOUT, BatchSystem, BatchView
from .records import Submission

KILL_WAIT = 10.0  # seconds between SIGTERM and SIGKILL, as Slurm's KillWait


class Local(BatchSystem):
    name = "local"
    template = "local.sh"
    submit_command = ("setsid",)
    env_job_id = "MPIMAP_BATCH_ID"

    def env_exports(self, walltime_seconds=None):
        return ('export MPIMAP_BATCH_ID="$(hostname):$$"\nexport MPIMAP_NODELIST="$(hostname)"\n'
                f'export MPIMAP_DEADLINE="{self.deadline_shell(walltime_seconds)}"')

    def submit(self, script, workdir, log, after=None):
        # setsid from a background job of a non-interactive shell (not a group leader) does not fork: $! is the
        # session leader.  The shell exits at once, so the job is nobody's child here (no zombie, no wait).
        # With `after`, the leader first waits for that session to end (this module run as a program), then
        # becomes the job script's shell: the same process, so the same batch id.
        command = ["bash", script]
        if after:
            command = [sys.executable, "-m", __name__, after, self.leader(after), *command]
        launch = 'log="$1"; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!'
        try:
            proc = subprocess.run(["bash", "-c", launch, "mpimap-submit", log, *command], cwd=workdir,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            pid = int(proc.stdout.strip())
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise MpimapError(f"could not start {script} on this machine: {exc}") from None
        return f"{socket.gethostname()}:{pid}"

    def leader(self, batch_id):
        return _start_of(int(batch_id.rpartition(":")[2])) or f"{_boot_id()}:gone"  # ended already: nothing is it

    def views(self, submissions):
        alive = _live_sessions()
        here = socket.gethostname()
        views = {}
        for sub in submissions:
            host, _, pid = sub.batch_id.rpartition(":")
            if host != here or not pid.isdigit():
                views[sub.batch_id] = BatchView("unknown", reason=f"runs on {host}: ask there")
            elif not (int(pid) in alive and _ours(sub)):
                views[sub.batch_id] = BatchView("gone")
            elif _waiting(int(pid)):
                views[sub.batch_id] = BatchView("pending", reason="Dependency")
            else:
                views[sub.batch_id] = BatchView("running", nodes=host)
        return views

    def cancel(self, submission):
        """SIGTERM to every process of the job's session, SIGKILL after :data:`KILL_WAIT` seconds to what is left."""
        host, _, pid = submission.batch_id.rpartition(":")
        if host != socket.gethostname():
            raise MpimapError(f"job {submission.batch_id} runs on {host}: cancel it from there")
        session = int(pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _ours(submission):  # ended, and its PID may be somebody else's by now
                return
            for member in _processes().get(session, ()):
                try:
                    os.kill(member, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_WAIT
            while session in _live_sessions() and time.monotonic() < deadline:
                time.sleep(0.2)
            if session not in _live_sessions():
                return


def _processes() -> dict[int, list[int]]:
    """Session id -> PIDs of its processes on this machine that are not zombies."""
    sessions: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # fields after the command name: state, ppid, pgrp, session, ...
            sessions.setdefault(int(fields[3]), []).append(int(entry))
    return sessions


def _live_sessions() -> set[int]:
    return set(_processes())


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _start_of(pid: int) -> str:
    """``BOOT_ID:START_TICKS`` of process ``pid`` (field 22 of /proc/PID/stat), or '' if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = f.read().rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3
    except (OSError, IndexError):
        return ""
    return f"{_boot_id()}:{ticks}"


def _ours(submission) -> bool:
    """Whether the session named by the submission's PID is still the job's: its leader is the one recorded, or
    has ended while members live on (the kernel reuses no PID that names a live session).  A submission without
    a recorded start (an older mpimap) is taken on trust."""
    return not submission.leader or _start_of(int(submission.batch_id.rpartition(":")[2])) in ("", submission.leader)


def _waiting(pid: int) -> bool:
    """Whether the session leader ``pid`` still waits for the job it runs after (see :func:`wait_then_run`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"-m\0{__name__}\0".encode() in f.read()
    except OSError:
        return False


def wait_then_run(after: str, leader: str, command: list[str]) -> None:
    """Wait until the local job ``after`` (whose leader started as ``leader``) has ended, then become ``command``."""
    session = int(after.rpartition(":")[2])
    before = Submission(batch_id=after, scheduler="local", submitted=0.0, leader=leader)
    while session in _live_sessions() and _ours(before):
        time.sleep(0.5)
    os.execvp(command[0], command)


if __name__ == "__main__":  # python -m mpimap.jobs.local AFTER LEADER COMMAND...: a continuation's leader
    wait_then_run(sys.argv[1], sys.argv[2], sys.argv[3:])
