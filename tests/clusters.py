"""What the test batch systems share (a real Slurm and a real Grid Engine, each on localhost from a private directory).

A cluster lives in one directory; several pytest sessions (other worktrees, CI beside a developer) may use
it at once: each holds a shared lock on ``users`` while it does, and only the last one to leave stops it.
Subclasses say how to start and stop it, where its daemons write their pid files and which environment its
commands need.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from dataclasses import dataclass


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for PID 1 to reap it does not: ``kill -0`` would say it does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass(frozen=True)
class LocalCluster:
    """A batch system whose files are all under ``path``."""

    path: str

    @property
    def mail_log(self) -> str:
        """One JSON line per mail the batch system sent (its mailer is a recorder)."""
        raise NotImplementedError

    def env(self) -> dict:
        """The environment for this batch system's commands."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def exports(self) -> str:
        """The shell line that points a shell's commands at this cluster (``start`` prints it)."""
        raise NotImplementedError

    def command(self, *args: str, timeout: float = 30, check: bool = True,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run one of the batch system's commands (``scontrol``, ``qstat``, ...) against this cluster; output as text."""
        proc = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def mails(self) -> list[dict]:
        """The mails sent so far (see :attr:`mail_log`)."""
        if not os.path.exists(self.mail_log):
            return []
        with open(self.mail_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _pidfile(self, daemon: str) -> str:
        raise NotImplementedError

    def pid(self, daemon: str) -> int | None:
        """The running daemon's pid from its pid file, or None (no file, not running, or the pid now names another
        program)."""
        try:
            with open(self._pidfile(daemon)) as f:
                pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/comm") as f:
                if not daemon.startswith(f.read().strip()):  # comm is cut at 15 characters
                    return None
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    @contextlib.contextmanager
    def _exclusive(self):
        """One start or stop at a time, across processes."""
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def session(self):
        """Use the cluster for the body: start it if needed; stop it after, unless another session still uses it."""
        os.makedirs(self.path, exist_ok=True)
        users = open(os.path.join(self.path, "users"), "w")
        with self._exclusive():
            self.start()
            fcntl.flock(users, fcntl.LOCK_SH)
        try:
            yield self
        finally:
            with self._exclusive():
                try:  # exclusive only if no other session holds it shared
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    last = True
                except BlockingIOError:
                    last = False
                users.close()
                if last:
                    self.stop()


def main(argv: list[str], cluster_class, default_dir: str, missing) -> int:
    """``python tests/NAME_cluster.py start|stop [DIR]``: start (printing the export line) or stop a cluster."""
    import sys

    if len(argv) not in (1, 2) or argv[0] not in ("start", "stop"):
        print(f"usage: python {sys.argv[0]} start|stop [DIR]   (default DIR: {default_dir})", file=sys.stderr)
        return 2
    cluster = cluster_class(os.path.abspath(argv[1]) if len(argv) == 2 else default_dir)
    with cluster._exclusive():
        if argv[0] == "start":
            why = missing()
            if why:
                print(why, file=sys.stderr)
                return 1
            cluster.start()
            print(cluster.exports())
        else:
            cluster.stop()
    return 0
