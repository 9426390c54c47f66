"""A real single-node Slurm on localhost for the tests: munged, slurmctld and slurmd run from one private directory.

Everything the cluster needs lives in that directory (config, munge key and socket, state, spool, logs,
pid files, the mails it sent); nothing is read from or written to /etc/slurm, /etc/munge or /run/munge,
and a machine's own slurm.conf is ignored, because every command gets ``SLURM_CONF`` pointing here.
Needs root and Debian's ``slurmctld slurmd slurm-client munge`` packages (``.ci/run`` installs them).

The directory is ``$MPIMAP_TEST_SLURM_DIR``, default /tmp/mpimap-test-slurm.  Several pytest sessions
(other worktrees, CI beside a developer) may use the cluster at once: each holds a shared lock on
``users`` while it does, and only the last one to leave stops the cluster.

From a shell (a cluster started this way is stopped by the next test session that ends)::

    python tests/slurm_cluster.py start      # prints: export SLURM_CONF=...
    python tests/slurm_cluster.py stop
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

from clusters import LocalCluster, alive, main

DEFAULT_DIR = os.environ.get("MPIMAP_TEST_SLURM_DIR", "/tmp/mpimap-test-slurm")
PACKAGES = "slurmctld slurmd slurm-client munge"
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
DAEMONS = ("slurmd", "slurmctld", "munged")  # in the order they are stopped
HELD_PARTITION = "held"  # State=DOWN: a job submitted to it stays queued until moved to "debug"

# Not Slurm's default ports, so that a Slurm the machine runs itself is left alone.
CONFIG = """\
# Written by tests/slurm_cluster.py: a single-node cluster on localhost for mpimap's tests.
ClusterName=mpimaptest
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
# The machine's cores do not matter: 8 CPUs are declared (config_overrides), and no cgroups are used.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A scheduler pass every 2 s; a requeued job restarts after cred_expire+1 s.
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.log
KillWait=5
MinJobAge=600
ReturnToService=2
MailProg={d}/mailprog
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName={held} Nodes=localhost MaxTime=INFINITE State=DOWN
"""

# Slurm calls MailProg as `mail -s SUBJECT USER`, with the job in SLURM_JOB_* variables: keep one JSON line per mail.
MAILPROG = """\
#!{python}
import json, os, sys
record = {{"args": sys.argv[1:], "stdin": sys.stdin.read() if not sys.stdin.isatty() else "",
           "env": {{k: v for k, v in os.environ.items() if k.startswith("SLURM_")}}}}
with open({log!r}, "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def missing() -> str:
    """Why a cluster cannot start here ("" if it can): the packages, or root."""
    absent = [p for p in PROGRAMS if shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if absent:
        return f"Slurm is not installed (no {', '.join(absent)}): apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root"
    return ""


@dataclass(frozen=True)
class SlurmCluster(LocalCluster):
    """The cluster whose files are all under ``path``."""

    path: str = DEFAULT_DIR

    @property
    def conf(self) -> str:
        """What ``SLURM_CONF`` must name for every Slurm command (jobs inherit it: sbatch exports the environment)."""
        return os.path.join(self.path, "slurm.conf")

    @property
    def mail_log(self) -> str:
        """One JSON line per mail Slurm sent: ``{"args": [...], "stdin": "...", "env": {SLURM_*}}``."""
        return os.path.join(self.path, "mail", "mails.jsonl")

    def env(self) -> dict:
        """The environment for Slurm commands: this one plus ``SLURM_CONF``, and the sbin directories on PATH."""
        path = os.environ.get("PATH", "")
        return {**os.environ, "SLURM_CONF": self.conf, "PATH": f"{path}:/usr/sbin:/sbin" if path else "/usr/sbin:/sbin"}

    # -- the daemons --------------------------------------------------------------------------------

    def _pidfile(self, daemon: str) -> str:
        return os.path.join(self.path, "run", f"{daemon}.pid")

    def exports(self) -> str:
        return f"export SLURM_CONF={self.conf}"

    def node_state(self) -> str:
        """The node's state as ``sinfo`` says it (idle, mixed, allocated, down*, ...), or "" if the controller does not answer."""
        proc = self.command("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T", timeout=15, check=False)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""

    def healthy(self) -> bool:
        """Every daemon runs, and the node takes jobs."""
        if not os.path.exists(self.conf) or any(self.pid(d) is None for d in DAEMONS):
            return False
        return self.node_state() in ("idle", "mixed", "allocated", "completing")

    def start(self, deadline: float = 60) -> None:
        """Bring the cluster up from a wiped directory; nothing to do if it is healthy already."""
        if self.healthy():
            return
        self.stop()
        for sub in ("state", "spool", "run", "log", "munge", "munge-key", "mail"):
            shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
            os.makedirs(os.path.join(self.path, sub))
        os.chmod(self.path, 0o755)
        os.chmod(os.path.join(self.path, "munge"), 0o755)  # munged refuses a socket directory without o+x
        os.chmod(os.path.join(self.path, "munge-key"), 0o700)
        self._write_config()
        d = self.path
        key = f"{d}/munge-key/munge.key"
        self.command("mungekey", "--create", f"--keyfile={key}")
        os.chmod(key, 0o600)
        self.command("munged", f"--key-file={key}", f"--socket={d}/munge/munge.socket",
                     f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
                     f"--seed-file={d}/munge-key/munged.seed")
        # The daemons daemonize and point their stdio at /dev/null: they hold no pipe of ours open.
        self.command("slurmctld")
        self.command("slurmd", "-N", "localhost")
        end = time.monotonic() + deadline
        while not self.healthy():
            if time.monotonic() > end:
                raise RuntimeError(f"the test Slurm did not come up within {deadline:.0f} s "
                                   f"(node state {self.node_state()!r}):\n{self._log_tails()}")
            time.sleep(0.2)

    def _write_config(self) -> None:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        with open(self.conf, "w") as f:
            f.write(CONFIG.format(d=self.path, memory=max(total_kb // 1024 - 1024, 512), held=HELD_PARTITION))
        mailprog = os.path.join(self.path, "mailprog")
        with open(mailprog, "w") as f:
            f.write(MAILPROG.format(python=sys.executable, log=self.mail_log))
        os.chmod(mailprog, 0o755)

    def _log_tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted(glob.glob(os.path.join(self.path, "log", "*.log"))):
            with open(log, errors="replace") as f:
                out.append(f"--- {log}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stop(self, grace: float = 10) -> None:
        """Cancel every job, then stop each daemon by its pid file: SIGTERM, SIGKILL after ``grace`` seconds."""
        if self.pid("slurmctld") is not None:
            jobs = self.command("squeue", "-h", "-o", "%i", timeout=15, check=False).stdout.split()
            if jobs:
                self.command("scancel", *jobs, timeout=15, check=False)
                end = time.monotonic() + 15  # running jobs get SIGTERM, then SIGKILL after KillWait=5
                while self.command("squeue", "-h", "-o", "%i", timeout=15, check=False).stdout.split():
                    if time.monotonic() > end:
                        break
                    time.sleep(0.2)
        for daemon in DAEMONS:
            pid = self.pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + grace  # slurmd ignores SIGTERM while it cannot reach the controller
            while alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
                while alive(pid):
                    time.sleep(0.05)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SlurmCluster, DEFAULT_DIR, missing))
