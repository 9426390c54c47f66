"""This machine as a batch system: the job script runs detached (its own session), no queue.

The batch id is ``HOST:PID`` of the script's shell, the leader of a new
session; the job lives as long as that session (mpiexec ``exec``s in the
shell's place).  Open MPI's ranks stay in the session, each in a process group
of its own; MPICH gives each rank a session of its own: signals reach them
through mpiexec, and they die with their launcher (:mod:`mpimap.orphans`).  Only
this host can tell whether it is alive: from another host its state is unknown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from ..errors import MpimapError
from .batch import COMMAND_TIMEOUT, BatchSystem, BatchView

KILL_WAIT = 10.0  # seconds between SIGTERM and SIGKILL, as Slurm's KillWait


class Local(BatchSystem):
    name = "local"
    template = "local.sh"
    submit_command = ("setsid",)
    env_job_id = "MPIMAP_BATCH_ID"

    def env_exports(self):
        return 'export MPIMAP_BATCH_ID="$(hostname):$$"\nexport MPIMAP_NODELIST="$(hostname)"'

    def submit(self, script, workdir, log):
        # setsid from a background job of a non-interactive shell (not a group leader) does not fork: $! is the
        # session leader.  The shell exits at once, so the job is nobody's child here (no zombie, no wait).
        launch = 'setsid bash "$1" </dev/null >>"$2" 2>&1 & echo $!'
        try:
            proc = subprocess.run(["bash", "-c", launch, "mpimap-submit", script, log], cwd=workdir,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            pid = int(proc.stdout.strip())
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise MpimapError(f"could not start {script} on this machine: {exc}") from None
        return f"{socket.gethostname()}:{pid}"

    def views(self, batch_ids):
        alive = _live_sessions()
        here = socket.gethostname()
        views = {}
        for batch_id in batch_ids:
            host, _, pid = batch_id.rpartition(":")
            if host != here or not pid.isdigit():
                views[batch_id] = BatchView("unknown", reason=f"runs on {host}: ask there")
            else:
                views[batch_id] = BatchView("running", nodes=host) if int(pid) in alive else BatchView("gone")
        return views

    def cancel(self, batch_id):
        """SIGTERM to every process of the job's session, SIGKILL after :data:`KILL_WAIT` seconds to what is left."""
        host, _, pid = batch_id.rpartition(":")
        if host != socket.gethostname():
            raise MpimapError(f"job {batch_id} runs on {host}: cancel it from there")
        session = int(pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
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
