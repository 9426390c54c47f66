"""Jobs under a real Slurm (a single-node cluster on localhost, started by the ``slurm`` fixture): real sbatch, squeue, scancel.

The job manager is driven as a user drives it, through the ``mpimap`` commands; what Slurm itself
says (squeue, scontrol, the mails its MailProg recorded) is the reference they must agree with.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env
from mpimap.launch import find_mpiexec
from mpimap.store import read_results

POINTS = 24


def points(n: int = POINTS) -> np.ndarray:
    return np.column_stack([np.arange(float(n)), np.linspace(-1, 1, n)])


def reference(pts: np.ndarray) -> np.ndarray:
    """What ``jobfuncs.record`` gives, evaluated here, serially."""
    from jobfuncs import record

    os.environ.setdefault("MPIMAP_TEST_LOG", os.devnull)
    return np.array([record(p) for p in pts])


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll ``predicate`` until it returns something true; return that, or fail naming ``what``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll)


def wait_stable(read, quiet: float, timeout: float, what: str):
    """Poll ``read`` until its value has not changed for ``quiet`` seconds; return that value."""
    end = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


class User:
    """A user on the login node: runs ``mpimap`` commands from one directory, with their own ``$MPIMAP_HOME``.

    The jobs' points are ``jobfuncs.record`` calls: each appends its point's number to ``evaluations.log``
    (to count evaluations) and sleeps ``sleep`` seconds.
    """

    def __init__(self, slurm, tmp_path, sleep: float = 0.0):
        self.slurm, self.cwd = slurm, tmp_path
        self.home = tmp_path / "mpimap-home"
        self.evaluations = tmp_path / "evaluations.log"
        self.env = job_env(MPIMAP_HOME=self.home, MPIMAP_TEST_LOG=self.evaluations, MPIMAP_TEST_SLEEP=sleep)
        np.save(tmp_path / "points.npy", points())

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"mpimap {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)

    def submit(self, name: str, *options: str) -> str:
        """Submit ``jobfuncs:record`` over points.npy to Slurm on 2 ranks; return the batch id it printed."""
        proc = self("submit", "jobfuncs:record", "--points", "points.npy", "--name", name, "--scheduler", "slurm",
                    "--ranks", "2", "--chunksize", "1", *options)  # a later --scheduler wins (test_jobs_sge)
        batch_id = self.ls(name)["batch_id"]
        assert name in proc.stdout and batch_id in proc.stdout, proc.stdout
        return batch_id

    def ls(self, name: str) -> dict:
        """The row ``mpimap ls --json`` shows for the job."""
        rows = [row for row in self.json("ls") if row["name"] == name]
        assert len(rows) == 1, rows
        return rows[0]

    def state(self, name: str) -> str:
        return self.ls(name)["state"]

    def wait_state(self, name: str, state: str, timeout: float = 120) -> dict:
        return wait_for(lambda: (row := self.ls(name))["state"] == state and row, timeout,
                        f"job {name} {state} (ls: {self.ls(name)})")

    def job_dir(self, name: str):
        return self.cwd / "mpimap-jobs" / name

    def results(self, name: str) -> dict:
        return read_results(str(self.job_dir(name) / "results.h5"))

    def evaluated(self) -> list[int]:
        """The point numbers evaluated so far, one entry per evaluation."""
        return [int(line) for line in self.evaluations.read_text().split()] if self.evaluations.exists() else []

    def squeue(self, batch_id: str) -> tuple[str, str]:
        """Slurm's own view of the job: (state, node list), or ("", "") once it left the queue."""
        out = self.slurm.command("squeue", "-h", "-j", batch_id, "-o", "%T %N", check=False).stdout.split()
        return (out[0], out[1] if len(out) > 1 else "") if out else ("", "")

    def slurm_state(self, batch_id: str) -> str:
        """The job's state in ``scontrol show job`` (kept MinJobAge=600 s after it ended)."""
        out = self.slurm.command("scontrol", "show", "job", batch_id).stdout
        return out.split("JobState=", 1)[1].split()[0]


@pytest.fixture
def user(slurm, tmp_path):
    """A User; every Slurm job that runs in their directory is cancelled at the end of the test."""
    u = User(slurm, tmp_path)
    yield u
    for line in slurm.command("squeue", "-h", "-o", "%i %Z", check=False).stdout.splitlines():
        batch_id, workdir = line.split(maxsplit=1)
        if workdir.startswith(str(tmp_path)):
            slurm.command("scancel", batch_id, check=False)


def test_starting_the_running_test_cluster_again_changes_nothing(slurm):
    daemons = {d: slurm.pid(d) for d in ("munged", "slurmctld", "slurmd")}
    assert None not in daemons.values() and slurm.healthy()
    slurm.start()
    assert {d: slurm.pid(d) for d in daemons} == daemons


def test_a_hand_written_batch_script_runs_mpimap_under_slurm(slurm, tmp_path):
    """The plain way, before the job manager: sbatch a script that runs ``mpiexec -n 2 python -m mpimap run``."""
    pts = points(60)
    np.save(tmp_path / "points.npy", pts)
    out = tmp_path / "results.h5"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --output={tmp_path}/job.log
exec {find_mpiexec()} -n 2 {sys.executable} -m mpimap run jobfuncs:record --points {tmp_path}/points.npy --out {out}
""")
    # sbatch hands the job this environment (SLURM_CONF, PYTHONPATH for jobfuncs); --wait returns its exit code.
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=job_env(MPIMAP_TEST_LOG=tmp_path / "evaluations.log"))
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\njob.log:\n{log}"
    batch_id = proc.stdout.strip().split(";")[0]
    assert "60 of 60" in log

    r = read_results(str(out))
    assert np.array_equal(r["value"], reference(pts))
    assert set(r["status"]) == {"done"}
    assert set(r["rank"]) == {1}
    job = slurm.command("scontrol", "show", "job", batch_id).stdout
    assert "JobState=COMPLETED" in job and "NodeList=localhost" in job
    assert slurm.command("squeue", "-h", "-j", batch_id, check=False).stdout.strip() == ""


def test_submit_queued_running_done_and_the_allocation_ends_with_the_points(user, slurm):
    """Queued while Slurm holds it back, then running, then done: results equal the serial ones, and the
    allocation ends as soon as the points are done, whatever walltime the job asked for."""
    user.env["MPIMAP_TEST_SLEEP"] = "0.2"
    # The test cluster's partition "held" is down: Slurm queues the job there until it is moved.
    batch_id = user.submit("scan", "--partition", "held", "--walltime", "30:00")
    assert user.squeue(batch_id) == ("PENDING", "")
    assert user.wait_state("scan", "queued")["batch_id"] == batch_id
    assert user.json("status", "scan")["batch"]["reason"] == "PartitionDown"  # why Slurm holds it back

    slurm.command("scontrol", "update", f"JobId={batch_id}", "Partition=debug")
    user.wait_state("scan", "running", timeout=60)
    assert user.squeue(batch_id) == ("RUNNING", "localhost")

    row = user.wait_state("scan", "done")
    assert (row["done"], row["failed"], row["total"]) == (POINTS, 0, POINTS)
    r = user.results("scan")
    assert np.array_equal(r["value"], reference(points())) and set(r["status"]) == {"done"}
    assert sorted(user.evaluated()) == list(range(POINTS))
    # Done means the batch job ended and gave its node back, not that it sits out its 30 minutes.
    wait_for(lambda: user.squeue(batch_id) == ("", ""), 30, f"Slurm job {batch_id} leaves the queue")
    assert user.slurm_state(batch_id) == "COMPLETED"


def test_pause_then_resume_loses_and_repeats_nothing(user, slurm):
    user.env["MPIMAP_TEST_SLEEP"] = "1"  # ~24 s of work: time to act on a loaded machine
    batch_id = user.submit("steady")
    wait_for(lambda: user.ls("steady")["done"] >= 3, 90, "3 points done")

    user("pause", "steady")
    paused = user.wait_state("steady", "paused", timeout=20)
    # In-flight points finish and are stored; then nothing new starts, while the allocation is kept.
    settled = wait_stable(lambda: len(user.evaluated()), 3, 30, "the paused job's in-flight points finish")
    assert settled < POINTS, "the job finished before it could be paused: make its points slower"
    wait_for(lambda: user.ls("steady")["done"] == settled, 20, f"ls shows the {settled} points done")
    assert user.state("steady") == "paused" and paused["batch_id"] == batch_id
    assert user.squeue(batch_id) == ("RUNNING", "localhost")  # the allocation is kept while paused
    assert len(user.evaluated()) == settled

    user("resume", "steady")
    user.wait_state("steady", "done")
    assert sorted(user.evaluated()) == list(range(POINTS))  # each point evaluated once
    assert np.array_equal(user.results("steady")["value"], reference(points()))
    wait_for(lambda: user.squeue(batch_id) == ("", ""), 30, f"Slurm job {batch_id} leaves the queue")


def test_cancel_while_queued_removes_it_from_the_queue(user, slurm):
    batch_id = user.submit("waiting", "--partition", "held")
    user.wait_state("waiting", "queued")
    user("cancel", "waiting")
    wait_for(lambda: user.squeue(batch_id) == ("", ""), 30, f"Slurm job {batch_id} leaves the queue")
    assert user.slurm_state(batch_id) == "CANCELLED"
    assert user.wait_state("waiting", "cancelled", timeout=20)["batch_id"] == batch_id
    assert user.evaluated() == []


def test_cancel_while_running_keeps_the_results_and_releases_the_allocation(user, slurm, tmp_path):
    user.env["MPIMAP_TEST_SLEEP"] = "2"  # cancelled below: slow points leave time on a loaded machine
    batch_id = user.submit("doomed")
    wait_for(lambda: user.ls("doomed")["done"] >= 3, 90, "3 points done")
    user("cancel", "doomed")
    row = user.wait_state("doomed", "cancelled", timeout=30)
    wait_for(lambda: user.squeue(batch_id) == ("", ""), 30, f"Slurm job {batch_id} leaves the queue")
    assert user.slurm_state(batch_id) not in ("RUNNING", "COMPLETING", "PENDING")

    # What was done before the cancel is stored, readable, and right; the rest is left pending.
    user("results", "doomed", "-o", str(tmp_path / "doomed.csv"))
    r = user.results("doomed")
    done = r["status"] == "done"
    assert 3 <= done.sum() < POINTS and done.sum() == row["done"]
    assert set(r["status"][~done]) == {"pending"}
    assert np.array_equal(r["value"][done], reference(points())[done])
    assert r["attrs"]["state"] == "cancelled"
    rows = (tmp_path / "doomed.csv").read_text().splitlines()
    assert rows[0].startswith("index,status") and len(rows) == POINTS + 1
    assert sum(",done," in line for line in rows[1:]) == done.sum()


def test_attach_and_results_while_running(user, slurm, tmp_path):
    user.env["MPIMAP_TEST_SLEEP"] = "1"  # ~24 s of work: time to act on a loaded machine
    user.submit("watched")
    user.wait_state("watched", "running", timeout=60)
    attach = subprocess.Popen([sys.executable, "-m", "mpimap", "attach", "watched"], cwd=user.cwd, env=user.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: user.ls("watched")["done"] >= 3, 90, "3 points done")
        user("results", "watched", "-o", str(tmp_path / "partial.csv"))
        assert attach.poll() is None, "attach ended while the job runs"
        partial = [line.split(",") for line in (tmp_path / "partial.csv").read_text().splitlines()[1:]]
        assert [int(row[0]) for row in partial] == list(range(POINTS))  # point order, every point
        done = [row for row in partial if row[1] == "done"]
        assert 3 <= len(done) < POINTS
        expected = reference(points())
        assert all(float(row[4]) == expected[int(row[0])] for row in done)
        out, err = attach.communicate(timeout=120)  # attach ends when the job ends
    finally:
        attach.kill()
    assert attach.returncode == 0, err
    assert user.state("watched") == "done"
    assert str(POINTS) in out


def test_ls_status_and_ps_agree_with_squeue(user, slurm):
    user.env["MPIMAP_TEST_SLEEP"] = "2"  # cancelled below: slow points leave time on a loaded machine
    batch_id = user.submit("seen")
    wait_for(lambda: user.ls("seen")["done"] >= 2, 90, "2 points done")
    assert user.squeue(batch_id) == ("RUNNING", "localhost")

    row = user.ls("seen")
    assert (row["state"], row["batch_id"], row["total"]) == ("running", batch_id, POINTS)
    status = user.json("status", "seen")
    assert status["state"] == "running" and status["status"]["batch_id"] == batch_id
    assert status["batch"]["nodes"] == "localhost"  # the batch system's view: squeue's node list
    assert "localhost" in user("status", "seen").stdout

    # ps lists the master and the worker, and each is a process of this Slurm job: its environment says so.
    # (Slurm calls the node "localhost"; the processes see the machine's own host name.)
    processes = [p for p in user.json("ps")["processes"] if p["job"] == "seen"]
    assert sorted(p["rank"] for p in processes) == [0, 1], processes
    assert {p["host"] for p in processes} == {os.uname().nodename}
    for p in processes:
        with open(f"/proc/{p['pid']}/environ", "rb") as f:
            assert f"SLURM_JOB_ID={batch_id}".encode() in f.read().split(b"\0"), p

    user("cancel", "seen")
    wait_for(lambda: user.squeue(batch_id) == ("", ""), 30, f"Slurm job {batch_id} leaves the queue")


def test_the_registry_is_rebuilt_when_deleted(user, slurm):
    batch_id = user.submit("kept")
    user.wait_state("kept", "done")
    (user.home / "registry.json").unlink()
    row = user.ls("kept")
    assert (row["state"], row["batch_id"], row["done"]) == ("done", batch_id, POINTS)


def test_mail_goes_through_the_batch_systems_mailprog(user, slurm):
    batch_id = user.submit("mailed", "--mail", "someone@example.org")
    user.wait_state("mailed", "done")
    mails = wait_for(lambda: len(m := [m for m in slurm.mails() if m["env"].get("SLURM_JOB_ID") == batch_id]) >= 2
                     and m, 30, "Slurm mails the job's begin and end")
    assert {m["args"][-1] for m in mails} == {"someone@example.org"}
    assert {"Began", "Ended"} <= {m["env"]["SLURM_JOB_MAIL_TYPE"] for m in mails}
