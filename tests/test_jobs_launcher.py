"""A job's processes end with it, under MPICH's and Open MPI's launchers: no rank outlives its launcher or a cancel.

MPICH's ``mpiexec`` puts each rank in a session of its own, Open MPI's in a
process group of its own, so the tests find a job's processes by what they run
(the job's path in their command line) and by the PIDs its status file names.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env, kill_job, launch, launcher_env
from mpimap.jobs.job import Job


def processes() -> dict[int, dict]:
    """Every live (not zombie) process on this machine: pid -> its parent, session and command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(entry)] = {"ppid": int(fields[1]), "sid": int(fields[3]), "argv": argv}
    return found


def running(text: str) -> set[int]:
    """PIDs of the processes whose command line mentions ``text``."""
    return {pid for pid, p in processes().items() if any(text in arg for arg in p["argv"])}


def alive_after(pids, seconds: float = 30.0) -> set[int]:
    """Which of ``pids`` are still alive (and not zombies) after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := set(pids) & set(processes())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_lines(path, n: int, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(open(path).read().split()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never had {n} lines")


def test_ranks_die_when_their_launcher_is_killed(tmp_path):
    """kill -9 of the process that started the ranks (Open MPI's prterun, MPICH's hydra_pmi_proxy) while every
    worker evaluates a long point in the rank: no rank of the job may run on, orphaned."""
    np.save(tmp_path / "p.npy", np.column_stack([np.arange(4.0), np.zeros(4)]))
    out = str(tmp_path / "r.h5")
    job = launch(3, "-m", "mpimap", "run", "jobfuncs:record", "--points", "p.npy", "--out", out, "--isolation", "rank",
                 "--chunksize", "1", "--no-progress", cwd=tmp_path,
                 env=job_env(MPIMAP_TEST_LOG=tmp_path / "log", MPIMAP_TEST_SLEEP=300),
                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = set()
    try:
        wait_lines(tmp_path / "log", 2)  # both workers are in their 300 s evaluations, not in MPI
        table = processes()
        ranks = {pid for pid in running(out) if table[pid]["argv"][0] == sys.executable}
        assert len(ranks) == 3, ranks
        [launcher] = {table[pid]["ppid"] for pid in ranks}
        os.kill(launcher, signal.SIGKILL)
        assert alive_after(ranks) == set()
    finally:
        kill_job(job)
        kill(ranks)  # MPICH's ranks are not in the job's session
        job.wait(timeout=60)


def test_cancel_of_a_running_local_job_leaves_no_process(tmp_path, monkeypatch):
    """`mpimap cancel` of a job whose workers are stuck in long evaluations (the master cannot stop them, so the
    cancel ends the batch job after its grace): afterwards no process of the job is alive."""
    monkeypatch.setenv("MPIMAP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "p.npy", np.column_stack([np.arange(6.0), np.zeros(6)]))
    env = job_env(MPIMAP_HOME=tmp_path / "home", MPIMAP_TEST_LOG=tmp_path / "log", MPIMAP_TEST_SLEEP=300)
    submit = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:record", "--points", "p.npy",
                             "--name", "stuck", "--ranks", "3", "--isolation", "rank", "--chunksize", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job = Job(str(tmp_path / "mpimap-jobs" / "stuck"))
    session = int(job.batch_id().rpartition(":")[2])
    pids = set()
    try:
        wait_lines(tmp_path / "log", 2)
        deadline = time.monotonic() + 60
        while len({r.pid for r in job.status().ranks if r.pid}) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the master reports its workers' PIDs
        status = job.status()
        pids = {status.pid, *(r.pid for r in status.ranks)} | running(job.dir.path) | {
            pid for pid, p in processes().items() if p["sid"] == session}
        assert len(pids) >= 4, pids  # launcher, master, two workers
        cancel = subprocess.run([sys.executable, "-m", "mpimap", "cancel", "stuck", "--grace", "5"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 0, cancel.stderr
        assert job.state() == "cancelled"
        assert alive_after(pids, 15) == set()
        assert running(job.dir.path) == set()
    finally:
        kill(pids | running(job.dir.path))


def test_a_local_job_runs_more_ranks_than_cores_without_launcher_settings(tmp_path):
    """A user who never heard of Open MPI's settings (running as root, more ranks than cores) submits a local job:
    it runs to done, as it does with MPICH."""
    np.save(tmp_path / "p.npy", np.arange(10.0))
    env = job_env(MPIMAP_HOME=tmp_path / "home")
    for name in launcher_env():
        del env[name]
    ranks = str((os.cpu_count() or 1) + 1)
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "p.npy",
                           "--name", "plain", "--ranks", ranks, "--wait"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    job = Job(str(tmp_path / "mpimap-jobs" / "plain"))
    assert proc.returncode == 0, open(job.dir.log).read()
    assert job.state() == "done" and job.status().done == 10


@pytest.mark.parametrize("where", ["PRTE_MCA_prte_tmpdir_base", "TMP"])
def test_a_local_job_starts_where_killed_open_mpi_jobs_left_their_session_directories(tmp_path, where):
    """Open MPI's mpiexec names its session directory after its pid and leaves it behind when killed; a later
    mpiexec that gets the same pid ended at once (exit 213, "The PMIx server's listener thread failed to start").
    With such directories left for every pid the job can get, a local job still runs to done: its script removes
    this user's directories whose mpiexec is gone, and keeps the one of a live process; where Open MPI puts them
    (``where``: the MCA setting, or TMP when TMPDIR is not set)."""
    np.save(tmp_path / "p.npy", np.arange(10.0))
    base = tmp_path / "mpi-tmp"
    base.mkdir()
    host = socket.gethostname().split(".")[0]

    def leave(pid):  # what a killed mpiexec leaves; the tool file is what stops a later one with its pid
        (base / f"ompi.{pid}").mkdir()
        (base / f"ompi.{pid}" / f"pmix.{host}.tool.{pid}").touch()

    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    live = set(processes())
    left = [pid for pid in ((last + i) % pid_max for i in range(1, 3000)) if pid > 300 and pid not in live]
    for pid in left:
        leave(pid)
    leave(os.getpid())  # alive: not the job's to remove
    env = job_env(MPIMAP_HOME=tmp_path / "home")
    for name in ("PRTE_MCA_prte_tmpdir_base", "TMPDIR", "TMP", "TEMP"):
        env.pop(name, None)
    env[where] = str(base)
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "p.npy",
                           "--name", "after-kills", "--ranks", "2", "--scheduler", "local", "--wait"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    job = Job(str(tmp_path / "mpimap-jobs" / "after-kills"))
    assert proc.returncode == 0, open(job.dir.log).read()
    assert job.state() == "done" and job.status().done == 10
    started = int(job.batch_id().rsplit(":", 1)[1])
    assert started in left  # the job's mpiexec did get a pid with a directory left behind
    kept = {int(p.name[5:]) for p in base.glob("ompi.*") if p.name[5:].isdigit()}  # not ompi.HOST.UID of a rank
    assert os.getpid() in kept  # (the job's own may be there again: its mpiexec made a new one)
    # Pids taken while the script ran (the submitting process's threads, say) keep theirs; pids far ahead were free.
    assert not kept & set(left[-1000:])
