"""Jobs under a real Grid Engine (a single-node cell on localhost, started by the ``sge`` fixture): real qsub, qstat, qdel.

The job manager is driven as a user drives it, through the ``mpimap`` commands; what Grid Engine
itself says (qstat, qacct, the mails its mailer recorded) is the reference they must agree with.
A Grid Engine job starts with a clean environment: what the test function needs goes in --env-setup.
"""

import time

import numpy as np
import pytest

from mpimap.jobs.records import Submission
from mpimap.jobs.sge import Sge
from test_jobs_slurm import POINTS, User as SlurmUser, points, reference, wait_for


class User(SlurmUser):
    """A user on the login node (see test_jobs_slurm.User) whose jobs go to Grid Engine.

    A Grid Engine job starts with a clean environment: what ``jobfuncs.record`` needs (its log, how long it
    sleeps: ``sleep`` seconds) goes in ``--env-setup``.
    """

    def __init__(self, sge, tmp_path):
        super().__init__(None, tmp_path)
        self.sge, self.sleep = sge, 0.0

    def submit(self, name: str, *options: str) -> str:
        """Submit ``jobfuncs:record`` over points.npy to Grid Engine on 2 ranks; return the batch id it printed."""
        setup = f"export MPIMAP_TEST_LOG={self.evaluations} MPIMAP_TEST_SLEEP={self.sleep} MPIMAP_HOME={self.home}"
        return super().submit(name, "--scheduler", "sge", "--env-setup", setup, *options)

    def qstat(self, batch_id: str) -> str:
        """Grid Engine's own state letters for the job (qw, hqw, r, s, ...), or "" once it left qstat."""
        for line in self.sge.command("qstat", "-u", "*", check=False).stdout.splitlines()[2:]:
            fields = line.split()
            if fields and fields[0] == batch_id:
                return fields[4]
        return ""

    def qacct(self, batch_id: str) -> dict:
        """The job's accounting record (written within a second or two of its end)."""
        proc = wait_for(lambda: (p := self.sge.command("qacct", "-j", batch_id, check=False)).returncode == 0 and p,
                        30, f"qacct knows job {batch_id}")
        return {key: value.strip() for key, value in (line.split(None, 1) for line in proc.stdout.splitlines()
                                                        if len(line.split(None, 1)) == 2)}


@pytest.fixture
def user(sge, tmp_path):
    """A User; every Grid Engine job still queued or running at the end of the test is deleted."""
    u = User(sge, tmp_path)
    yield u
    listed = [line.split()[0] for line in sge.command("qstat", "-u", "*", check=False).stdout.splitlines()[2:]]
    ours = [batch_id for batch_id in listed if _workdir(sge, batch_id).startswith(str(tmp_path))]
    if ours:
        sge.command("qdel", "-f", *ours, check=False)


def _workdir(sge, batch_id: str) -> str:
    for line in sge.command("qstat", "-j", batch_id, check=False).stdout.splitlines():
        if line.startswith("sge_o_workdir:"):
            return line.split(None, 1)[1]
    return ""


def test_starting_the_running_test_cell_again_changes_nothing(sge):
    daemons = {d: sge.pid(d) for d in ("sge_qmaster", "sge_execd")}
    assert None not in daemons.values() and sge.healthy()
    sge.start()
    assert {d: sge.pid(d) for d in daemons} == daemons


def test_submit_queued_running_done_and_the_results_equal_the_serial_ones(user, sge):
    """Queued while Grid Engine holds it back (disabled queue), then running, then done: results equal the serial
    ones, each point evaluated once, and the batch job leaves Grid Engine with the job's own exit status 0."""
    user.sleep = 0.3
    batch_id = user.submit("scan", "--partition", "held.q", "--walltime", "30:00")
    assert user.qstat(batch_id) == "qw"
    assert user.wait_state("scan", "queued")["batch_id"] == batch_id
    reason = user.json("status", "scan")["batch"]["reason"]
    assert "disabled" in reason, reason  # why Grid Engine holds it back, as its scheduler says

    sge.command("qalter", "-q", "all.q", batch_id)
    user.wait_state("scan", "running", timeout=60)
    # Grid Engine may still say "t" (transferring) while the job's script already runs: wait for its "r".
    wait_for(lambda: user.qstat(batch_id) == "r", 30, f"qstat shows job {batch_id} running")
    assert user.json("status", "scan")["batch"]["nodes"] == "localhost"

    row = user.wait_state("scan", "done")
    assert (row["done"], row["failed"], row["total"]) == (POINTS, 0, POINTS)
    r = user.results("scan")
    assert np.array_equal(r["value"], reference(points())) and set(r["status"]) == {"done"}
    assert sorted(user.evaluated()) == list(range(POINTS))
    wait_for(lambda: user.qstat(batch_id) == "", 30, f"Grid Engine job {batch_id} leaves qstat")
    account = user.qacct(batch_id)
    assert (account["failed"], account["exit_status"]) == ("0", "0")
    assert account["granted_pe"] == "mpi" and account["slots"] == "2"
    log = (user.job_dir("scan") / "job.log").read_text()
    assert f"{POINTS} of {POINTS}" in log


def test_a_held_job_shows_queued_with_its_reason_and_cancel_removes_it(user, sge):
    batch_id = user.submit("waiting", "--partition", "held.q")
    sge.command("qhold", batch_id)
    wait_for(lambda: user.qstat(batch_id) == "hqw", 20, "Grid Engine shows the job held")
    assert user.state("waiting") == "queued"
    status = user.json("status", "waiting")
    assert status["batch"]["reason"] == f"held (qrls {batch_id} releases it)"
    assert f"qrls {batch_id}" in user("status", "waiting").stdout

    assert "removed from the queue" in user("cancel", "waiting").stdout
    wait_for(lambda: user.qstat(batch_id) == "", 30, f"Grid Engine job {batch_id} leaves qstat")
    assert user.wait_state("waiting", "cancelled", timeout=20)["batch_id"] == batch_id
    assert user.evaluated() == []


def test_cancel_while_running_keeps_the_results_and_ends_the_batch_job(user, sge):
    user.sleep = 2  # cancelled below: slow points leave time on a loaded machine
    batch_id = user.submit("doomed")
    wait_for(lambda: user.ls("doomed")["done"] >= 3, 90, "3 points done")
    user("cancel", "doomed")
    row = user.wait_state("doomed", "cancelled", timeout=30)
    wait_for(lambda: user.qstat(batch_id) == "", 30, f"Grid Engine job {batch_id} leaves qstat")
    r = user.results("doomed")
    done = r["status"] == "done"
    assert 3 <= done.sum() < POINTS and done.sum() == row["done"]
    assert set(r["status"][~done]) == {"pending"}
    assert np.array_equal(r["value"][done], reference(points())[done])


def test_suspend_and_unsuspend_of_a_running_job_lose_and_repeat_nothing(user, sge):
    """``qmod -sj`` sends SIGSTOP to the job's process group, ``qmod -usj`` SIGCONT: the job is shown suspended
    meanwhile, and finishes afterwards with every point stored once.  (Only mpiexec is in that process group:
    MPICH's ranks run in sessions of their own, so they go on until they need mpiexec, at their end.)"""
    user.sleep = 0.5
    batch_id = user.submit("napping")
    wait_for(lambda: user.ls("napping")["done"] >= 2, 90, "2 points done")
    sge.command("qmod", "-sj", batch_id)
    wait_for(lambda: user.qstat(batch_id) == "s", 20, "Grid Engine shows the job suspended")
    assert user.json("status", "napping")["batch"]["reason"] == "suspended"
    assert user.state("napping") in ("running", "done")
    time.sleep(POINTS * user.sleep)  # long enough for the ranks to have ended, had they not needed mpiexec
    assert user.qstat(batch_id) == "s"

    sge.command("qmod", "-usj", batch_id)
    row = user.wait_state("napping", "done")
    assert row["done"] == POINTS
    assert sorted(user.evaluated()) == list(range(POINTS))  # each point evaluated once
    assert np.array_equal(user.results("napping")["value"], reference(points()))


def test_a_dependent_batch_job_starts_only_after_the_first_has_ended(user, sge, tmp_path):
    """The class's dependency arguments (``-hold_jid ID``, "after any end"): while the first job runs, the second
    is queued with the reason "Dependency", and it starts after the first ended, even though the first was cancelled."""
    user.sleep = 1
    first = user.submit("first")
    user.wait_state("first", "running", timeout=60)
    second_script = tmp_path / "second.sh"
    second_script.write_text("#!/bin/bash\ndate +%s.%N > started\n")
    batch = Sge()
    command = [*batch.submit_command, *(arg.format(first) for arg in batch.dependency_args), "-wd", str(tmp_path),
               "-o", "/dev/null", "-j", "y", str(second_script)]
    second = sge.command(*command, check=True).stdout.strip()
    view = batch.views([Submission(batch_id=second, scheduler="sge", submitted=time.time())])[second]
    assert (view.state, view.reason) == ("pending", f"Dependency (after job {first})")
    time.sleep(3)
    assert not (tmp_path / "started").exists()

    cancelled = time.time()  # the first job cannot end before this: it runs until cancelled
    user("cancel", "first")
    user.wait_state("first", "cancelled", timeout=30)
    wait_for(lambda: user.qstat(first) == "", 30, f"Grid Engine job {first} leaves qstat")
    wait_for(lambda: (tmp_path / "started").exists() and (tmp_path / "started").read_text().strip(), 60,
             "the dependent job runs")
    assert float((tmp_path / "started").read_text()) > cancelled
    assert batch.views([Submission(batch_id=second, scheduler="sge", submitted=0)])[second].state in ("gone", "running")


def test_a_job_whose_name_starts_with_a_digit_is_submitted(user, sge):
    """Grid Engine refuses such a name for ``-N`` ("cannot start with a digit"): the batch job is called j7up."""
    batch_id = user.submit("7up")
    assert "#$ -N j7up" in (user.job_dir("7up") / "job.sh").read_text().splitlines()
    user.wait_state("7up", "done")
    assert user.qacct(batch_id)["jobname"] == "j7up"


def test_grid_engines_qsub_is_not_taken_for_pbs(user, sge):
    """Both call their submit command qsub: with Grid Engine's on PATH, ``--scheduler pbs`` submits nothing."""
    proc = user("submit", "jobfuncs:record", "--points", "points.npy", "--scheduler", "pbs", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "qsub is SGE 8.1.9, not pbs: use --scheduler sge" in lines[0]
    assert not (user.cwd / "mpimap-jobs").exists()
    assert not [line for line in sge.command("qstat", "-u", "*").stdout.splitlines()[2:]
                if _workdir(sge, line.split()[0]).startswith(str(user.cwd))]  # nothing of this test was submitted


def test_mail_goes_through_grid_engines_mailer(user, sge):
    batch_id = user.submit("mailed", "--mail", "someone@example.org")
    user.wait_state("mailed", "done")
    mails = wait_for(lambda: len(m := [m for m in sge.mails() if f"Job {batch_id} " in m["args"][1]]) >= 2 and m,
                     30, "Grid Engine mails the job's start and end")
    assert {m["args"][-1] for m in mails} == {"someone@example.org"}
    subjects = " ".join(m["args"][1] for m in mails)
    assert "Started" in subjects and "Complete" in subjects


def test_a_chain_survives_suspension_and_the_s_rt_warning_and_finishes_the_job(user, sge):
    """The Grid Engine campaign: ``--walltime 1:30 --resubmit 2`` asks for ``h_rt=00:01:30,s_rt=00:01:00`` and
    queues its continuation (``-hold_jid``) as the first allocation starts.  That allocation is suspended and
    resumed (``qmod -sj``/``-usj``); at s_rt Grid Engine sends SIGUSR1 to the job's process group, mpiexec passes
    it to the ranks, and the master stores what it has and ends ``interrupted`` with its own status 3 (Grid Engine
    did not kill it), before its own deadline (about 75 s) would have stopped it.  The continuation then finishes
    the job: results equal the serial ones, no point lost, the chain shown by ``status``."""
    user.sleep = 4  # 24 points of 4 s on one worker: far more than the 60 s before the warning
    first = user.submit("warned", "--walltime", "1:30", "--resubmit", "2")
    script = (user.job_dir("warned") / "job.sh").read_text()
    assert "#$ -l h_rt=00:01:30,s_rt=00:01:00" in script.splitlines()
    wait_for(lambda: user.ls("warned")["done"] >= 1, 90, "a point done")
    chain = user.json("status", "warned")["chain"]
    assert [link["batch_id"] for link in chain][0] == first and len(chain) == 2  # the continuation is queued
    second = chain[1]["batch_id"]
    assert chain[1]["after"] == first and user.qstat(second) == "hqw"
    sge.command("qmod", "-sj", first)
    wait_for(lambda: user.qstat(first) == "s", 20, "Grid Engine shows the job suspended")
    time.sleep(3)
    sge.command("qmod", "-usj", first)

    row = user.wait_state("warned", "done", timeout=240)
    assert row["done"] == POINTS
    account = user.qacct(first)
    assert (account["failed"], account["exit_status"]) == ("0", "3")  # the job's own status, not a kill
    links = user.json("status", "warned")["chain"]
    assert links[0]["state"] == "interrupted" and 0 < links[0]["points"] < POINTS
    assert links[1]["batch_id"] == second and links[1]["state"] == "done"
    assert links[0]["points"] + links[1]["points"] == POINTS
    assert "SIGUSR1" in (user.job_dir("warned") / "job.log").read_text()
    assert np.array_equal(user.results("warned")["value"], reference(points()))
    evaluated = user.evaluated()
    # None lost; only the points the worker held when the signal came (2 chunks of 1 at most) are evaluated again.
    assert set(evaluated) == set(range(POINTS)) and len(evaluated) - POINTS <= 2
    text = user("status", "warned").stdout
    assert first in text and second in text


def test_the_queued_reason_is_what_the_scheduler_says_in_all_its_lines_bounded(user, sge):
    batch_id = user.submit("toobig", "--ranks", "200")  # the cell has 4 slots: never runs
    reason = wait_for(lambda: (r := user.json("status", "toobig")["batch"].get("reason", "")) not in ("", "Priority")
                      and r, 60, "Grid Engine's scheduler says why the job waits")
    info = sge.command("qstat", "-j", batch_id).stdout
    assert "All queues dropped" in info or "only offers" in info, info
    # Not only the first line (about another queue, disabled): what keeps this job waiting is in the lines after.
    assert "dropped because it is disabled" not in reason.split(";")[0], reason
    assert ("All queues dropped" in reason or "only offers" in reason) and len(reason) <= 300, reason
