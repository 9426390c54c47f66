"""Chains of allocations on the local scheduler: real detached jobs, real mpiexec, real signals and kill -9.

A job submitted with ``--resubmit N`` (or ``--until-done``) queues its continuation as each allocation starts;
the continuation waits for the allocation's session to end, then resumes the same results file.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env
from mpimap.jobs.job import Job
from mpimap.jobs.local import _processes
from mpimap.store import read_results


@pytest.fixture
def where(tmp_path, monkeypatch):
    """A submit directory with its own mpimap home; kills whatever its jobs left running."""
    monkeypatch.setenv("MPIMAP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sessions = _processes()
    for batch in tmp_path.glob("**/batch.json"):
        for sub in json.loads(batch.read_text())["submissions"]:
            for pid in sessions.get(int(sub["batch_id"].rpartition(":")[2]), ()):
                os.kill(pid, signal.SIGKILL)


def mpimap(where, *args, timeout=120):
    env = job_env(MPIMAP_HOME=str(where / "home"))
    return subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=where, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds:.0f} s: {what}")
        time.sleep(0.2)
    return value


SLOWED = '''
import os, time
import jobfuncs

def record(row):
    """jobfuncs.record, but each point takes as many seconds as the file NAME.sleep says, once it exists."""
    path = os.environ["MPIMAP_TEST_LOG"].replace(".evaluated", ".sleep")
    if os.path.exists(path):
        time.sleep(float(open(path).read()))
    return jobfuncs.record(row)
'''


def chain_job(where, monkeypatch, name: str, n: int, sleep: float, *chain: str) -> Job:
    """Submit jobfuncs:record over n points (``sleep`` s each) on 3 ranks as a chain; wait until points are stored."""
    np.save(where / "rows.npy", np.column_stack([np.arange(n), np.ones(n)]).astype(float))
    (where / "slowed.py").write_text(SLOWED)
    monkeypatch.setenv("MPIMAP_TEST_SLEEP", str(sleep))
    monkeypatch.setenv("MPIMAP_TEST_LOG", str(where / f"{name}.evaluated"))
    proc = mpimap(where, "submit", "slowed:record", "--points", "rows.npy", "--name", name, "--ranks", "3", *chain)
    assert proc.returncode == 0, proc.stderr
    job = Job(where / "mpimap-jobs" / name)
    wait_for(lambda: (s := job.current_status()) is not None and s.done > 0, 120, f"{name} stores points")
    return job


def session_of(submission) -> list[int]:
    """The live processes of a local batch job (its session)."""
    return _processes().get(int(submission.batch_id.rpartition(":")[2]), [])


def allocation(job: Job, k: int):
    """The k-th submission of the job, once it exists."""
    return wait_for(lambda: len(job.submissions()) > k and job.submissions()[k], 60, f"submission {k} of {job}")


def running_master(job: Job, sub):
    """Wait until the master of batch job ``sub`` reports and has stored points; return its report."""
    return wait_for(lambda: (s := job.status()) is not None and s.batch_id == sub.batch_id and s.state == "running"
                    and s.done > 0 and s, 120, f"the master of {sub.batch_id} stores points")


def evaluated(where, name) -> list[int]:
    return [int(x) for x in (where / f"{name}.evaluated").read_text().split()]


def assert_complete(where, job: Job, n: int):
    """Done, the results of a serial run, every point stored once, none evaluated again beyond the in-flight ones."""
    assert job.wait(poll=0.5) == "done", open(job.dir.log).read()
    results = read_results(job.dir.results)
    assert list(results["status"]) == ["done"] * n
    np.testing.assert_array_equal(results["value"], np.arange(float(n)) * 2 + 1)  # jobfuncs.record, serially
    runs = evaluated(where, job.name)
    assert sorted(set(runs)) == list(range(n))
    return runs


def test_an_interrupted_allocation_is_continued_by_the_next_link_and_the_job_completes(where, monkeypatch):
    job = chain_job(where, monkeypatch, "link", 120, 0.1, "--resubmit", "3")
    first = allocation(job, 0)
    second = allocation(job, 1)  # queued at the first allocation's start, waiting for it
    assert second.after == first.batch_id and second.started is None
    assert job.batch_view().state == "running" and job.state() == "running"
    assert mpimap(where, "status", "link", "--json").returncode == 0
    view = json.loads(mpimap(where, "status", "link", "--json").stdout)
    assert [c["batch_id"] for c in view["chain"]] == [first.batch_id, second.batch_id]
    # The warning a batch system sends before the walltime, to the job's mpiexec (which passes it on).
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGUSR1)
    runs = assert_complete(where, job, 120)
    assert "SIGUSR1: warning before the walltime" in open(job.dir.log).read()
    subs = job.submissions()
    assert subs[0].state == "interrupted" and 0 < subs[0].points < 120
    assert subs[1].state == "done" and subs[0].points + subs[1].points == 120
    assert subs[2].after == subs[1].batch_id and subs[2].state == "skipped"  # the job was done: never ran
    assert len(subs) == 3 and not session_of(subs[2])
    assert len(runs) <= 120 + 2 * 2  # at most the points in flight when it was interrupted are evaluated again
    text = mpimap(where, "status", "link").stdout
    assert "chain      : 2 allocations of 3 batch jobs (resubmit 3)" in text, text
    assert f"{subs[0].batch_id}: interrupted, {subs[0].points} points" in text, text
    assert f"{subs[1].batch_id} after {subs[0].batch_id}: done, {subs[1].points} points" in text, text
    assert json.loads(mpimap(where, "ls", "--json").stdout)[0]["allocations"] == 2




def test_kill_9_of_the_whole_allocation_the_queued_continuation_resumes_and_completes(where, monkeypatch):
    job = chain_job(where, monkeypatch, "crash", 120, 0.1, "--resubmit", "2")
    first, second = allocation(job, 0), allocation(job, 1)
    for pid in session_of(first):  # a node lost: no process of the allocation says a word
        os.kill(pid, signal.SIGKILL)
    assert job.state() in ("queued", "running")  # not interrupted for good: the chain goes on
    runs = assert_complete(where, job, 120)
    subs = job.submissions()
    assert subs[0].state == "running" and subs[0].points is None  # it never recorded its end
    assert subs[1].batch_id == second.batch_id and subs[1].state == "done"
    # Redone: what was stored since the last flush (1 s: ~20 points at 2 workers x 10 points/s) and what was in flight.
    assert len(runs) <= 120 + 20 + 2 * 4
    assert f"    {subs[0].batch_id}: ended without a word" in mpimap(where, "status", "crash").stdout


def test_a_job_that_ends_done_removes_its_queued_continuation(where, monkeypatch):
    job = chain_job(where, monkeypatch, "quick", 30, 0.02, "--resubmit", "5")
    assert_complete(where, job, 30)
    subs = wait_for(lambda: len(job.submissions()) == 2 and job.submissions()[1].state and job.submissions(), 30,
                    "the continuation recorded as skipped")
    assert subs[0].state == "done" and subs[0].points == 30
    assert subs[1].after == subs[0].batch_id and subs[1].state == "skipped" and subs[1].started is None
    wait_for(lambda: not session_of(subs[1]), 30, "the continuation's session ends")
    assert job.state() == "done"


def test_a_continuation_that_starts_after_the_job_is_done_ends_at_once(where, monkeypatch):
    """The job's end could not remove it (here: a continuation submitted by hand after the job ended)."""
    job = chain_job(where, monkeypatch, "late", 30, 0.02, "--resubmit", "5")
    assert_complete(where, job, 30)
    before = len(evaluated(where, "late"))
    from mpimap.jobs.batch import scheduler

    with job.batch_lock():
        from mpimap.jobs.chain import _queue

        subs = job.submissions()
        _queue(job, job.spec(), subs, subs[0], after=subs[0].batch_id + "0")  # its predecessor: long gone
        job.write_submissions(subs)
    late = job.submissions()[-1]
    assert scheduler("local").views([late])  # it was started
    wait_for(lambda: job.submissions()[-1].state == "skipped", 60, "the late continuation ends at once")
    wait_for(lambda: not session_of(late), 30, "its session ends")
    assert len(evaluated(where, "late")) == before and job.state() == "done"
    assert "is done already" in open(job.dir.log).read()


def test_cancel_stops_the_chain(where, monkeypatch):
    job = chain_job(where, monkeypatch, "stop", 200, 0.1, "--resubmit", "5")
    first, second = allocation(job, 0), allocation(job, 1)
    proc = mpimap(where, "cancel", "stop", "--grace", "60", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert job.state() == "cancelled"
    subs = job.submissions()
    assert [s.batch_id for s in subs] == [first.batch_id, second.batch_id]
    assert subs[1].state == "skipped" and subs[0].state == "cancelled"
    wait_for(lambda: not session_of(subs[1]) and not session_of(subs[0]), 30, "no process of the job is left")
    time.sleep(2)
    assert len(job.submissions()) == 2 and job.state() == "cancelled"
    assert (read_results(job.dir.results)["status"] == "pending").any()


def test_cancel_between_two_allocations_removes_the_queued_continuation(where, monkeypatch):
    job = chain_job(where, monkeypatch, "between", 200, 0.2, "--resubmit", "5", "--template", str(_slow_start(where)))
    first, second = allocation(job, 0), allocation(job, 1)
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGTERM)
    wait_for(lambda: job.submissions()[0].state == "interrupted", 60, "the first allocation ends")
    assert job.state() == "queued"  # the continuation waits (here: its slow start) to go on
    proc = mpimap(where, "cancel", "between")
    assert proc.returncode == 0, proc.stderr
    assert "continuation" in proc.stdout and job.state() == "cancelled"
    wait_for(lambda: not session_of(second), 30, "the continuation's session ends")
    assert job.submissions()[1].state == "skipped" and job.submissions()[1].started is None


def _slow_start(where):
    """The local template with a pause before the chain step: a continuation stays between two allocations."""
    from conftest import TESTS

    text = open(os.path.join(os.path.dirname(TESTS), "jobscripts", "local.sh")).read()
    text = text.replace("{{python}} -m mpimap.jobs.chain", "[ -z \"$MPIMAP_SLOW\" ] || sleep 20\n"
                        "export MPIMAP_SLOW=1\n{{python}} -m mpimap.jobs.chain", 1)
    path = where / "slow.sh"
    path.write_text(text)
    return path


def test_the_budget_of_continuations_is_respected(where, monkeypatch):
    job = chain_job(where, monkeypatch, "budget", 400, 0.1, "--resubmit", "1")
    first = allocation(job, 0)
    running_master(job, first)
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGTERM)
    second = allocation(job, 1)
    running_master(job, second)
    time.sleep(1)
    assert len(job.submissions()) == 2  # its budget is used: the second allocation queued nothing
    os.kill(int(second.batch_id.rpartition(":")[2]), signal.SIGTERM)
    assert job.wait(poll=0.5) == "interrupted"
    subs = job.submissions()
    assert [s.state for s in subs] == ["interrupted", "interrupted"]
    assert "the chain ends here" in job.status().message
    assert 0 < job.status().done < 400


def test_until_done_stops_after_two_allocations_in_a_row_without_progress(where, monkeypatch):
    job = chain_job(where, monkeypatch, "stuck", 200, 0.1, "--until-done")
    first = allocation(job, 0)
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGTERM)
    stored = wait_for(lambda: job.submissions()[0].points, 60, "the first allocation records its points")
    # Its continuations find points that take far longer than they are given: they store nothing.
    (where / "stuck.sleep").write_text("600")
    for k in (1, 2):
        sub = allocation(job, k)
        wait_for(lambda: (s := job.status()) is not None and s.batch_id == sub.batch_id and s.state == "running"
                 and len(s.ranks) == 2 and all(r.state == "busy" for r in s.ranks), 120, f"allocation {k} evaluates")
        os.kill(int(sub.batch_id.rpartition(":")[2]), signal.SIGTERM)
        wait_for(lambda: job.submissions()[k].state == "interrupted", 60, f"allocation {k} ends")
    assert job.wait(poll=0.5) == "interrupted"
    subs = job.submissions()
    assert [s.points for s in subs[:3]] == [stored, 0, 0]
    assert len(subs) == 4 and subs[3].state == "skipped"  # the fourth was queued, and removed
    assert "two allocations in a row stored no new point" in job.status().message
    assert "two allocations in a row stored no new point" in mpimap(where, "status", "stuck").stdout


def test_a_continuation_that_finds_the_results_file_in_use_ends_and_the_chain_goes_on(where, monkeypatch):
    """Two runs never share the results file: a link that starts while another run holds it runs nothing."""
    job = chain_job(where, monkeypatch, "busy", 150, 0.1, "--resubmit", "3")
    first, second = allocation(job, 0), allocation(job, 1)
    from mpimap.jobs.chain import _queue

    with job.batch_lock():  # a link whose predecessor is long gone: it starts while the first allocation runs
        subs = job.submissions()
        _queue(job, job.spec(), subs, subs[0], after=f"{first.batch_id}0")
        job.write_submissions(subs)
    rogue = job.submissions()[2]
    wait_for(lambda: job.submissions()[2].state == "skipped", 60, "the link finds the results file in use and ends")
    assert job.current_status().batch_id == first.batch_id and job.state() == "running"
    assert f"the results file is in use by batch job {first.batch_id}" in open(job.dir.log).read()
    wait_for(lambda: not session_of(rogue), 30, "its session ends")
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGTERM)
    runs = assert_complete(where, job, 150)
    subs = job.submissions()
    assert subs[1].batch_id == second.batch_id and subs[1].state == "done"
    assert len(runs) <= 150 + 2 * 4


def test_a_waiting_continuation_is_pending_for_dependency():
    from mpimap.jobs.batch import BatchView
    from mpimap.jobs.local import Local
    from mpimap.jobs.records import Submission

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        local = Local()
        after = f"{os.uname().nodename}:{sleeper.pid}"
        batch_id = local.submit("/bin/true", "/", os.devnull, after=after)
        waiting = Submission(batch_id=batch_id, scheduler="local", submitted=0.0, leader=local.leader(batch_id))
        wait_for(lambda: local.views([waiting])[batch_id] == BatchView("pending", reason="Dependency"), 30,
                 "the continuation waits")
        time.sleep(1)
        assert local.views([waiting])[batch_id].state == "pending"
        sleeper.kill()
        sleeper.wait(timeout=30)
        wait_for(lambda: local.views([waiting])[batch_id].state == "gone", 30, "it runs its script (true) and ends")
    finally:
        sleeper.kill()


@pytest.mark.parametrize("walltime, signal_line", [("1", "#SBATCH --signal=B:USR1@20"),
                                                   ("4:00:00", "#SBATCH --signal=B:USR1@120"), (None, None)])
def test_slurm_scripts_are_requeueable_and_ask_for_a_warning_before_the_walltime(where, walltime, signal_line):
    np.save(where / "points.npy", np.arange(4.0))
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "slurm",
                  "--dry-run", "--resubmit", "2", *(["--walltime", walltime] if walltime else []))
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --requeue" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("#SBATCH --signal")] == ([signal_line] if signal_line else [])
    step = "-m mpimap.jobs.chain "
    lines = proc.stdout.splitlines()
    [chain] = [i for i, line in enumerate(lines) if step in line]
    assert lines[chain].endswith("|| [ $? -ne 10 ] || exit 0")
    assert lines[-1].startswith("exec ") and chain < len(lines) - 1


def test_resubmit_and_until_done_together_are_one_line_and_create_nothing(where):
    np.save(where / "points.npy", np.arange(4.0))
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--resubmit", "2", "--until-done")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--until-done" in proc.stderr and not (where / "mpimap-jobs").exists()


def test_job_and_batch_files_of_version_1_without_chain_fields_still_read():
    from conftest import TESTS

    job = Job(os.path.join(TESTS, "fixtures", "jobs-v1", "job"))
    assert (job.spec().resubmit, job.spec().until_done) == (0, False)
    [sub] = job.submissions()
    assert (sub.after, sub.started, sub.points, sub.state, sub.restarts) == ("", None, None, "", 0)


CRASH = '''
import os, signal
if os.environ.get("PMI_RANK") == "0" or os.environ.get("OMPI_COMM_WORLD_RANK") == "0":
    os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies without a word: no allocation records its end

def f(x):
    return float(x[0])
'''


def test_until_done_stops_after_two_allocations_that_died_without_a_word(where):
    np.save(where / "p.npy", np.arange(40.0).reshape(-1, 1))
    (where / "crashing.py").write_text(CRASH)
    proc = mpimap(where, "submit", "crashing:f", "--points", "p.npy", "--name", "silent", "-n", "2", "--until-done")
    assert proc.returncode == 0, proc.stderr
    job = Job(where / "mpimap-jobs" / "silent")
    wait_for(lambda: any(s.state == "skipped" for s in job.submissions()), 120, "the chain stops")
    subs = job.submissions()
    assert [s.state for s in subs] == ["running", "running", "skipped"]  # two died silently; the third ran nothing
    assert "two allocations in a row stored no new point" in open(job.dir.log).read()
    time.sleep(3)
    assert len(job.submissions()) == 3 and not any(session_of(s) for s in subs)


def test_a_requeued_allocation_keeps_the_points_of_its_earlier_run(tmp_path, monkeypatch):
    """A Slurm requeue runs the chain step again in the same batch job: its record adds up both runs."""
    from mpimap.jobs import chain
    from mpimap.jobs.records import Submission
    from test_jobs_runner import make_job

    path = make_job(tmp_path, "jobfuncs:square", np.arange(100.0)).path
    job = Job(path)
    job.write_submissions([Submission(batch_id="42", scheduler="slurm", submitted=time.time())])
    monkeypatch.setenv("MPIMAP_BATCH_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert chain.start(path) == 0
    chain.end(path, "interrupted", 53)  # the requeue's SIGTERM
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert chain.start(path) == 0
    assert job.submissions()[0].state == "running"
    chain.end(path, "done", 45)
    [sub] = job.submissions()
    assert (sub.state, sub.points, sub.restarts) == ("done", 98, 1)


def test_cancel_between_two_allocations_that_never_reported_says_cancelled(where):
    np.save(where / "p.npy", np.arange(40.0).reshape(-1, 1))
    (where / "crashing.py").write_text(CRASH)
    proc = mpimap(where, "submit", "crashing:f", "--points", "p.npy", "--name", "mute", "-n", "2", "--resubmit", "3",
                  "--template", str(_slow_start(where)))
    assert proc.returncode == 0, proc.stderr
    job = Job(where / "mpimap-jobs" / "mute")
    first, _ = allocation(job, 0), allocation(job, 1)
    wait_for(lambda: not session_of(first), 60, "the first allocation dies without a word")
    assert job.status() is None and job.state() == "queued"  # its continuation waits (its slow start) to go on
    proc = mpimap(where, "cancel", "mute")
    assert proc.returncode == 0 and "continuation" in proc.stdout, proc.stderr
    assert job.state() == "cancelled"
    assert mpimap(where, "status", "mute").stdout.startswith("job mute: cancelled")


def test_a_run_by_hand_that_holds_the_results_file_speaks_for_the_job_while_the_chain_waits_behind_it(
        where, monkeypatch):
    job = chain_job(where, monkeypatch, "hand", 400, 0.5, "--resubmit", "2", "--template", str(_slow_start(where)))
    first, second = allocation(job, 0), allocation(job, 1)
    for pid in session_of(second):  # the continuation waits for as long as the test needs
        os.kill(pid, signal.SIGSTOP)
    running_master(job, first)
    for pid in session_of(first):
        os.kill(pid, signal.SIGKILL)
    # The job script run again by hand (a session of its own), while the continuation waits in its slow start.
    hand = subprocess.Popen(["bash", job.dir.script], cwd=where, env={**os.environ, "MPIMAP_SLOW": "1"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        mine = f"{socket.gethostname()}:{hand.pid}"
        wait_for(lambda: (s := job.status()) is not None and s.batch_id == mine and s.state == "running", 120,
                 "the run by hand reports")
        for pid in session_of(second):
            os.kill(pid, signal.SIGCONT)
        third = allocation(job, 2)  # the continuation found the results file in use: queued after the hand run
        assert third.after == mine and job.submissions()[1].state == "skipped"
        assert job.state() == "running"
        assert mpimap(where, "status", "hand").stdout.startswith("job hand: running")
    finally:
        for pid in _processes().get(hand.pid, ()):
            os.kill(pid, signal.SIGKILL)
        hand.wait(timeout=60)


@pytest.mark.parametrize("when", ["before the allocation ends", "after it ended"])
def test_a_continuation_removed_outside_mpimap_leaves_the_job_interrupted_and_resubmit_goes_on(where, monkeypatch,
                                                                                              when):
    slow = ("--template", str(_slow_start(where))) if when == "after it ended" else ()
    job = chain_job(where, monkeypatch, "removed", 120, 0.1, "--resubmit", "2", *slow)
    first, second = allocation(job, 0), allocation(job, 1)

    def remove_continuation():  # an admin cleans the queue (qdel, scancel): the waiting continuation is gone
        for pid in session_of(second):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not session_of(second), 30, "the continuation's session ends")

    if not slow:
        remove_continuation()
    os.kill(int(first.batch_id.rpartition(":")[2]), signal.SIGUSR1)  # the walltime warning: the allocation ends
    wait_for(lambda: job.submissions()[0].state == "interrupted", 60, "the first allocation ends")
    if slow:
        assert job.state() == "queued"  # the continuation waits (its slow start) to go on
        remove_continuation()
    wait_for(lambda: not session_of(first), 30, "the first allocation's session ends")
    assert job.state() == "interrupted" and job.submissions()[1].started is None
    text = mpimap(where, "status", "removed").stdout
    assert text.splitlines()[0] == "job removed: interrupted", text
    log = open(job.dir.log).read()  # what resumes a job run: not the command the user never typed
    assert "run the same command" not in log and "mpimap resubmit removed" in log, log
    if not slow:
        assert f"{second.batch_id} is queued" not in text, text
    proc = mpimap(where, "resubmit", "removed")
    assert proc.returncode == 0, proc.stderr
    assert_complete(where, job, 120)
