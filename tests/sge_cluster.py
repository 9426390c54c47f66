"""A real single-node Grid Engine on localhost for the tests: sge_qmaster and sge_execd of one private cell.

The cell lives in one directory (``$MPIMAP_TEST_SGE_DIR``, default /tmp/mpimap-test-sge): its SGE_ROOT
(links to Debian's binaries), the cell's common files, the classic (flat-file) spools, the queue's tmpdir,
and the mails Grid Engine sent (a recorder, not a mailer).  Nothing is read from or written to
/var/lib/gridengine or /var/spool/gridengine.  Needs root and Debian's ``gridengine-master gridengine-exec
gridengine-client`` packages, installed with ``shared/gridengineconfig=false`` (``.ci/run`` does).

The cell: host aliases ``localhost <hostname>`` (the qmaster names a client by the reverse lookup of
127.0.0.1), root jobs allowed (``min_uid``/``min_gid`` 0), a scheduler pass every second, the parallel
environment ``mpi`` and the queue ``all.q`` with 4 slots (and ``held.q``, disabled: a job sent there
stays queued), ``/bin/bash`` in ``unix_behavior`` (the
``#!`` line is honoured).  Not Grid Engine's default ports, so that a Grid Engine the machine runs itself
is left alone: every client needs :meth:`SgeCluster.env` (``SGE_ROOT``, ``SGE_CELL`` and the ports).

Several pytest sessions may use the cell at once: each holds a shared lock on ``users`` while it does,
and only the last one to leave stops the cell.  From a shell::

    python tests/sge_cluster.py start      # prints the export line for SGE_ROOT, SGE_CELL, ports
    python tests/sge_cluster.py stop
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from clusters import LocalCluster, alive, main

DEFAULT_DIR = os.environ.get("MPIMAP_TEST_SGE_DIR", "/tmp/mpimap-test-sge")
PACKAGES = "gridengine-master gridengine-exec gridengine-client"
LIB = "/usr/lib/gridengine"
SHARE = "/usr/share/gridengine"
PROGRAMS = ("/usr/sbin/sge_qmaster", "/usr/sbin/sge_execd", "/usr/bin/qsub", "/usr/bin/qstat", "/usr/bin/qconf",
            f"{LIB}/spoolinit", f"{LIB}/spooldefaults")
QMASTER_PORT, EXECD_PORT = 16444, 16445  # not 6444/6445: only one cell per port pair can run
SLOTS = 4
HOST = "localhost"
HELD_QUEUE = "held.q"  # disabled: a job submitted to it stays queued until moved to all.q (qalter -q all.q ID)

GLOBAL_CONFIG = {
    "mailer": "{d}/mailer",
    "min_uid": "0",
    "min_gid": "0",
    "load_report_time": "00:00:05",
    "execd_params": "ENABLE_ADDGRP_KILL=TRUE",
    "reporting_params": "accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00",
    "execd_spool_dir": "{d}/spool/execd",
}

SCHEDULER = {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"}

PE = """\
pe_name            mpi
slots              9999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $fill_up
control_slaves     TRUE
job_is_first_task  FALSE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
"""

QUEUE = """\
qname                 {name}
hostlist              {host}
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               mpi
rerun                 FALSE
slots                 {slots}
tmpdir                {d}/tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      unix_behavior
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:10
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         {initial}
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
"""

# Grid Engine calls the mailer as `mailer -s SUBJECT ADDRESS` with the body on stdin: keep one JSON line per mail.
MAILER = """\
#!{python}
import json, sys
record = {{"args": sys.argv[1:], "stdin": sys.stdin.read() if not sys.stdin.isatty() else ""}}
with open({log!r}, "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def missing() -> str:
    """Why a cell cannot start here ("" if it can): the packages, or root."""
    absent = [p for p in PROGRAMS if not os.path.exists(p)]
    if absent:
        return f"Grid Engine is not installed (no {', '.join(absent)}): apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the test Grid Engine runs its daemons as root"
    return ""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class SgeCluster(LocalCluster):
    """The Grid Engine cell whose files are all under ``path``."""

    path: str = DEFAULT_DIR

    @property
    def root(self) -> str:
        return os.path.join(self.path, "root")

    @property
    def common(self) -> str:
        return os.path.join(self.root, "default", "common")

    @property
    def mail_log(self) -> str:
        """One JSON line per mail Grid Engine sent: ``{"args": ["-s", SUBJECT, ADDRESS], "stdin": BODY}``."""
        return os.path.join(self.path, "mail.jsonl")

    def variables(self) -> dict:
        """What every Grid Engine client needs to find this cell (jobs get it from execd)."""
        return {"SGE_ROOT": self.root, "SGE_CELL": "default", "SGE_QMASTER_PORT": str(QMASTER_PORT),
                "SGE_EXECD_PORT": str(EXECD_PORT)}

    def env(self) -> dict:
        """The environment for Grid Engine commands: this one plus :meth:`variables`."""
        return {**os.environ, **self.variables()}

    def exports(self) -> str:
        return "export " + " ".join(f"{k}={v}" for k, v in self.variables().items())

    # -- the daemons --------------------------------------------------------------------------------

    def _pidfile(self, daemon: str) -> str:
        if daemon == "sge_qmaster":
            return os.path.join(self.path, "spool", "qmaster", "qmaster.pid")
        return os.path.join(self.path, "spool", "execd", HOST, "execd.pid")

    def queue_states(self) -> str | None:
        """The state letters of ``all.q@localhost`` ("" = usable), or None if the qmaster does not answer."""
        proc = self.command("qstat", "-f", "-q", f"all.q@{HOST}", timeout=15, check=False)
        if proc.returncode != 0:
            return None
        for line in proc.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == f"all.q@{HOST}":
                return "".join(fields[5:])
        return None

    def healthy(self) -> bool:
        """Both daemons run (a dead execd goes unnoticed by the qmaster for minutes), and the queue takes jobs."""
        if any(self.pid(d) is None for d in ("sge_qmaster", "sge_execd")):
            return False
        return self.queue_states() == ""

    def start(self, deadline: float = 60) -> None:
        """Bring the cell up from a wiped directory; nothing to do if it is healthy already."""
        if self.healthy():
            return
        self.stop()
        for sub in ("root", "spool", "tmp"):
            shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.mail_log)
        self._write_cell()
        end = time.monotonic() + deadline
        while not (_port_free(QMASTER_PORT) and _port_free(EXECD_PORT)):  # a qmaster that just stopped holds it
            if time.monotonic() > end:
                raise RuntimeError(f"ports {QMASTER_PORT}/{EXECD_PORT} stay busy: another Grid Engine runs on them")
            time.sleep(0.2)
        self._daemon("sge_qmaster")
        while self.command("qconf", "-sh", timeout=15, check=False).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError(f"the test sge_qmaster did not answer within {deadline:.0f} s:\n{self._log_tails()}")
            time.sleep(0.2)
        self._configure()
        self._daemon("sge_execd")
        while not self.healthy():
            if time.monotonic() > end:
                raise RuntimeError(f"the test Grid Engine did not come up within {deadline:.0f} s "
                                   f"(queue states {self.queue_states()!r}):\n{self._log_tails()}")
            time.sleep(0.2)

    def _write_cell(self) -> None:
        """SGE_ROOT with links to the binaries, the cell's common files, and the spool initialised offline."""
        d = self.path
        for sub in ("bin", "utilbin", "lib"):
            os.makedirs(os.path.join(self.root, sub))
            os.symlink(LIB, os.path.join(self.root, sub, "lx-amd64"))
        os.symlink(f"{SHARE}/util", os.path.join(self.root, "util"))
        os.makedirs(self.common)
        for sub in ("spool/qmaster", "spool/execd", "tmp"):
            os.makedirs(os.path.join(d, sub))
        qspool = f"{d}/spool/qmaster"
        files = {
            "host_aliases": f"{HOST} {socket.gethostname()}\n",
            "act_qmaster": f"{HOST}\n",
            "bootstrap": (f"admin_user root\ndefault_domain none\nignore_fqdn true\nspooling_method classic\n"
                          f"spooling_lib libspoolc\nspooling_params {self.common};{qspool}\nbinary_path /usr/sbin\n"
                          f"qmaster_spool_dir {qspool}\nsecurity_mode none\nlistener_threads 2\n"
                          f"worker_threads 2\nscheduler_threads 1\n"),
        }
        for name, text in files.items():
            with open(os.path.join(self.common, name), "w") as f:
                f.write(text)
        with open(os.path.join(d, "mailer"), "w") as f:
            f.write(MAILER.format(python=sys.executable, log=self.mail_log))
        os.chmod(os.path.join(d, "mailer"), 0o755)
        config = os.path.join(d, "global")
        with open(f"{SHARE}/default-configuration") as f, open(config, "w") as out:
            for line in f:
                key = line.split()[0] if line.strip() and not line.startswith("#") else ""
                if key in GLOBAL_CONFIG:
                    line = f"{key:<22} {GLOBAL_CONFIG[key].format(d=d)}\n"
                out.write(line)
        spool = (f"{LIB}/spooldefaults",)
        self.command(f"{LIB}/spoolinit", "classic", "libspoolc", f"{self.common};{qspool}", "init")
        self.command(*spool, "configuration", config)
        self.command(*spool, "complexes", f"{SHARE}/util/resources/centry")
        self.command(*spool, "usersets", f"{SHARE}/util/resources/usersets")
        self.command(*spool, "managers", "root")

    def _daemon(self, program: str) -> None:
        """Start a daemon with a clean environment: its jobs inherit the execd's (INHERIT_ENV)."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", **self.variables()}
        subprocess.run([f"/usr/sbin/{program}"], env=env, check=True, timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _configure(self) -> None:
        """Admin and submit host, a scheduler pass every second, the PE ``mpi`` and the queue ``all.q``."""
        self.command("qconf", "-ah", HOST, check=False)  # "already exists" on a restart over the same spool
        self.command("qconf", "-as", HOST, check=False)
        sconf = self.command("qconf", "-ssconf").stdout.splitlines()
        lines = [f"{line.split()[0]} {SCHEDULER[line.split()[0]]}" if line.split() and line.split()[0] in SCHEDULER
                 else line for line in sconf]
        self._apply("-Msconf", "sconf", "\n".join(lines) + "\n")
        self._apply("-Ap", "mpi", PE)
        self._apply("-Aq", "all.q", QUEUE.format(name="all.q", host=HOST, slots=SLOTS, d=self.path, initial="default"))
        self._apply("-Aq", HELD_QUEUE, QUEUE.format(name=HELD_QUEUE, host=HOST, slots=SLOTS, d=self.path,
                                                    initial="disabled"))

    def _apply(self, option: str, name: str, text: str) -> None:
        """``qconf OPTION FILE`` with the object's text (qconf's -a/-m options open an editor)."""
        path = os.path.join(self.path, "spool", name)
        with open(path, "w") as f:
            f.write(text)
        self.command("qconf", option, path)

    def _log_tails(self, lines: int = 15) -> str:
        out = []
        for log in (f"{self.path}/spool/qmaster/messages", f"{self.path}/spool/execd/{HOST}/messages"):
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    out.append(f"--- {log}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def _job_processes(self) -> list[int]:
        """Every process below the execd (shepherds and jobs), to be sure none outlives the cell."""
        execd = self.pid("sge_execd")
        if execd is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [execd]
        while todo:
            for child in children.get(todo.pop(), ()):
                found.append(child)
                todo.append(child)
        return found

    def stop(self, grace: float = 20) -> None:
        """Delete every job, shut execd and qmaster down with qconf, then make sure by pid that nothing is left."""
        leftovers = self._job_processes()
        if self.pid("sge_qmaster") is not None:
            self.command("qdel", "-f", "-u", "*", timeout=15, check=False)
            end = time.monotonic() + 15
            while self.command("qstat", "-u", "*", timeout=15, check=False).stdout.strip():
                if time.monotonic() > end:
                    break
                time.sleep(0.3)
            self.command("qconf", "-kej", HOST, timeout=15, check=False)
            self.command("qconf", "-km", timeout=15, check=False)
        pids = [p for p in (self.pid("sge_execd"), self.pid("sge_qmaster")) if p is not None]
        end = time.monotonic() + grace  # the qmaster's controlled shutdown takes 5-10 s
        for pid in pids + leftovers:
            while alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    limit = time.monotonic() + 5
                    while alive(pid) and time.monotonic() < limit:
                        time.sleep(0.05)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SgeCluster, DEFAULT_DIR, missing))
