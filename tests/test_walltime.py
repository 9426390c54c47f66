"""Walltime: a run stops handing out points that would not finish before its deadline, and stops cleanly on the
warning signal (SIGUSR1) a batch system sends before it; nothing computed is lost and the same command resumes.

The decision is plain Python (``mpimap.walltime``, property-tested); the rest runs under a real ``mpiexec``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import job_env, kill_job, launch, mpimap_cli, without_launcher_report
from mpimap.errors import MpimapError
from mpimap.jobs.job import Job
from mpimap.runner import RunOptions
from mpimap.store import read_results
from mpimap.walltime import AHEAD, MARGIN, MIN_RESERVE, Budget, Deadline, deadline, fits, reserve
from test_jobs_runner import evaluations, make_job, record_points, start, wait_status

# -- the decision, without MPI ------------------------------------------------------------------------------------
times = st.floats(min_value=0, max_value=1e7, allow_nan=False)
costs = st.none() | st.floats(min_value=0, max_value=1e4, allow_nan=False)
chunks = st.integers(min_value=1, max_value=10_000)
spares = st.floats(min_value=0, max_value=1e3, allow_nan=False)


@given(end=times, now=times, cost=costs, points=chunks, spare=spares)
def test_a_chunk_handed_out_is_expected_back_before_the_deadline_with_time_to_shut_down(end, now, cost, points, spare):
    if fits(end, now, cost, points, spare):
        assert now + spare < end  # never when only the time to shut down is left
        if cost is not None:  # the chunk may wait behind one on its rank, and is given MARGIN times its cost
            assert now + MARGIN * AHEAD * points * cost + spare <= end * (1 + 1e-12)


@given(end=times, now=times, cost=st.floats(min_value=0, max_value=1e4, allow_nan=False), points=chunks, spare=spares)
def test_a_chunk_is_held_back_only_when_it_would_not_fit(end, now, cost, points, spare):
    if not fits(end, now, cost, points, spare):
        assert now + MARGIN * AHEAD * points * cost + spare >= end * (1 - 1e-12)


@given(end=times, now=times, points=chunks, spare=spares)
def test_before_anything_is_measured_points_go_out_until_only_the_time_to_shut_down_is_left(end, now, points, spare):
    assert fits(end, now, None, points, spare) == (end - now - spare > 0)


@given(end=times, now=times, earlier=times, cost=costs, cheaper=st.floats(0, 1, allow_nan=False), points=chunks,
       fewer=chunks, spare=spares)
def test_what_fits_still_fits_earlier_with_cheaper_points_or_smaller_chunks(end, now, earlier, cost, cheaper, points,
                                                                           fewer, spare):
    if fits(end, now, cost, points, spare):
        assert fits(end, min(now, earlier), None if cost is None else cost * cheaper, min(points, fewer), spare)


@given(durations=st.lists(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=20), max_size=20))
def test_a_budget_measures_the_mean_cost_of_a_point_and_the_largest_chunk(durations):
    budget = Budget(Deadline(1e9, "test"), spare=10.0)
    for chunk in durations:
        budget.measured(np.array(chunk), len(chunk))
    flat = [d for chunk in durations for d in chunk]
    assert budget.point_seconds == (pytest.approx(sum(flat) / len(flat)) if flat else None)
    assert budget.largest == max([1] + [len(chunk) for chunk in durations])


def test_the_time_kept_to_shut_down():
    assert reserve(1.0) == MIN_RESERVE == 10.0
    assert reserve(30.0) == 60.0  # two flush intervals
    assert reserve(math.inf) == MIN_RESERVE  # flushed only at the end


def test_the_earlier_of_the_environment_and_the_walltime_option_is_the_deadline():
    assert deadline(None, None, started=1000.0) is None
    assert deadline("", None, started=1000.0) is None  # empty: unknown
    assert deadline("0", None, started=1000.0) is None  # what some batch systems say for "no limit"
    assert deadline(None, "1:00", started=1000.0).at == 1060.0  # MM:SS from the run's start
    assert deadline(None, 30, started=1000.0).at == 1030.0  # a number is seconds
    assert deadline("1500", "10", started=1000.0).at == 1500.0  # 10 minutes would end later
    assert deadline("5000", "0:30", started=1000.0).at == 1030.0
    for bad in ("soon", "-5", "nan", "1e20"):
        with pytest.raises(MpimapError, match=rf"MPIMAP_DEADLINE='{bad}' is not a time in unix seconds"):
            deadline(bad, None, started=1000.0)


def test_walltimes_out_of_range_or_with_60_minutes_or_seconds_are_refused():
    from mpimap.walltime import parse_walltime

    for bad in ("99999999999999999999", "1:99", "00:60", "1:60:00", "2-03:60", "366-00", 1e12, 365 * 86400 + 1):
        with pytest.raises(MpimapError, match="at most 365 days, minutes and seconds below 60"):
            parse_walltime(bad)
    assert [parse_walltime(t) for t in ("100:59", "1:59:59", "1-23:59:59", "365-00", "90")] == \
        [6059.0, 7199.0, 172799.0, 365 * 86400.0, 5400.0]


def test_a_huge_walltime_is_one_line_at_submit_and_creates_nothing(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(3.0))
    env = job_env(MPIMAP_HOME=str(tmp_path / "home"))
    for bad in ("99999999999999999999", "1:99"):
        proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "p.npy",
                               "--name", "huge", "-n", "2", "--walltime", bad], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "at most 365 days" in proc.stderr
        assert not (tmp_path / "mpimap-jobs" / "huge").exists()


def test_a_huge_deadline_in_the_environment_is_one_line(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(3.0))
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", cwd=tmp_path, timeout=60,
                      check=False, env=job_env(MPIMAP_DEADLINE="1e20"))
    assert proc.returncode == 2, proc.stderr
    assert "MPIMAP_DEADLINE='1e20' is not a time in unix seconds" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_walltime_option_is_one_line(tmp_path):
    assert "run option walltime 'soon'" in RunOptions(walltime="soon").problem()
    np.save(tmp_path / "p.npy", np.arange(3.0))
    proc = mpimap_cli(1, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", "--walltime", "1:xx",
                      cwd=tmp_path, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["mpimap: error: run option walltime '1:xx': use MINUTES, HH:MM:SS "
                                                "or D-HH:MM:SS (or seconds as a number), more than zero, at most "
                                                "365 days, minutes and seconds below 60"]
    assert not (tmp_path / "r.h5").exists()


# -- under mpiexec ---------------------------------------------------------------------------------------------
N = 200          # points of SLEEP seconds: ~50 s of work for 2 workers, far more than the 25 s deadlines here
SLEEP = 0.5


def check_interrupted_then_resume(tmp_path, out: str, log, stderr: str, why: str, lost_in_flight: int = 0):
    """The results file says interrupted, every stored point equals the serial reference, every evaluation is
    stored (but for up to ``lost_in_flight`` abandoned in flight); a second run without a deadline completes the
    rest without evaluating any stored point again."""
    reference = np.arange(N) * 2.0
    assert why in stderr and "run the same command to resume" in stderr, stderr
    assert "Traceback" not in stderr and "lost" not in stderr, stderr
    r = read_results(out)
    assert r["attrs"]["state"] == "interrupted"
    done = np.flatnonzero(r["status"] == "done")
    assert 0 < len(done) < N and set(r["status"]) == {"done", "pending"}
    assert np.array_equal(r["value"][done], reference[done])
    first = evaluations(log)
    assert len(first) == len(set(first))  # nothing was evaluated twice
    assert set(done) <= set(first) and len(first) - len(done) <= lost_in_flight
    os.remove(log)
    proc = mpimap_cli(3, "run", "jobfuncs:record", "--points", "p.npy", "--out", out, cwd=tmp_path, timeout=300,
                      env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=0.01))
    assert proc.returncode == 0
    r = read_results(out)
    assert r["attrs"]["state"] == "complete" and set(r["status"]) == {"done"}
    assert np.array_equal(r["value"], reference)
    assert not set(evaluations(log)) & set(done)  # what was stored is not evaluated again


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_run_stops_before_its_deadline_and_the_same_command_resumes(tmp_path, how):
    np.save(tmp_path / "p.npy", record_points(N))
    log = tmp_path / "evaluated.txt"
    started = time.time()
    # --walltime 0:25 is 25 seconds; in the environment, the earlier deadline wins over a walltime of an hour.
    walltime, env = ("0:25", {}) if how == "option" else ("1:00:00", {"MPIMAP_DEADLINE": int(started) + 25})
    proc = mpimap_cli(3, "run", "jobfuncs:record", "--points", "p.npy", "--out", "r.h5", "--walltime", walltime,
                      cwd=tmp_path, timeout=120, check=False,
                      env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=SLEEP, **env))
    took = time.time() - started
    assert proc.returncode == 3, proc.stderr
    assert took < 25, f"ended {took:.1f} s after start"
    check_interrupted_then_resume(tmp_path, str(tmp_path / "r.h5"), log, without_launcher_report(proc.stderr),
                                  "mpimap: walltime: ")


def test_a_deadline_already_past_ends_the_run_at_once(tmp_path):
    np.save(tmp_path / "p.npy", record_points(N))
    log = tmp_path / "evaluated.txt"
    proc = mpimap_cli(3, "run", "jobfuncs:record", "--points", "p.npy", "--out", "r.h5", cwd=tmp_path, timeout=120,
                      check=False, env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_DEADLINE=int(time.time()) - 60))
    assert proc.returncode == 3, proc.stderr
    assert "mpimap: walltime: the deadline (MPIMAP_DEADLINE " in proc.stderr and " passed " in proc.stderr
    assert not log.exists()  # nothing was handed out
    r = read_results(str(tmp_path / "r.h5"))
    assert r["attrs"]["state"] == "interrupted" and set(r["status"]) == {"pending"}


def test_a_job_out_of_time_reports_interrupted_with_the_reason(tmp_path, jobs):
    job = make_job(tmp_path, "jobfuncs:record", record_points(N))
    log = tmp_path / "evaluated.txt"
    proc = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=SLEEP, MPIMAP_DEADLINE=int(time.time()) + 25)
    jobs.append(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    status = Job(job.path).status()
    assert status.state == "interrupted" and status.message.startswith("walltime: "), status.message
    r = read_results(job.results)
    assert r["attrs"]["state"] == "interrupted" and status.done == (r["status"] == "done").sum() > 0
    assert sorted(np.flatnonzero(r["status"] == "done")) == evaluations(log)  # every point evaluated is stored


def test_points_that_never_come_back_are_abandoned_near_the_deadline_and_the_job_ends_interrupted(tmp_path, jobs):
    """No batch system may end the run (local, or PBS that warns nobody): the guard stops it at its deadline."""
    job = make_job(tmp_path, "jobfuncs:record", record_points(N))
    log = tmp_path / "evaluated.txt"
    started = time.time()
    proc = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=1000, MPIMAP_DEADLINE=int(started) + 20)
    jobs.append(proc)
    paused = wait_status(job, lambda s: s.state != "running", timeout=60, proc=proc)
    assert paused.state == "paused" and paused.message.startswith("walltime: "), paused
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert time.time() - started < 60
    status = Job(job.path).status()
    assert status.state == "interrupted" and status.message.startswith("walltime: "), status.message
    assert "abandoned" in status.message
    r = read_results(job.results)
    assert r["attrs"]["state"] == "interrupted" and set(r["status"]) == {"pending"}


def running(proc, log, points: int = 10, timeout: float = 60.0) -> None:
    """Wait until the job has evaluated ``points`` points."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).read().split()) >= points:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not get going: {proc.poll()}")


def background(tmp_path, log, *args, isolation="process"):
    """``mpiexec -n 3 python -m mpimap run jobfuncs:record ...`` in a session of its own."""
    return launch(3, "-m", "mpimap", "run", "jobfuncs:record", "--points", "p.npy", "--out", "r.h5",
                  "--isolation", isolation, *args, cwd=tmp_path, env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=SLEEP),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def job_tree(proc) -> dict[int, str]:
    """Every process of a job started in a session of its own, by pid: its name.  The session (as Grid Engine's
    process group), and everything mpiexec started (MPICH's ranks run in sessions of their own)."""
    children, names = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    name, rest = f.read().rsplit(")", 1)
                names[int(entry)] = name.split("(", 1)[1]
                children.setdefault(int(rest.split()[1]), []).append(int(entry))
            except (OSError, IndexError):
                pass
    found, todo = {}, [proc.pid] + [pid for pid in names if _session(pid) == proc.pid]
    while todo:
        pid = todo.pop()
        if pid in names and pid not in found:
            found[pid] = names[pid]
            todo += children.get(pid, [])
    return found


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def evaluation_children(proc) -> list[int]:
    """The evaluation processes of the job's worker ranks: python processes whose parent is a python process."""
    tree = job_tree(proc)
    parents = {}
    for pid in tree:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    return [pid for pid, name in tree.items() if name.startswith("python") and tree.get(parents.get(pid), "")
            .startswith("python")]


@pytest.fixture
def jobs():
    """Background jobs a test started; whatever is left of them is killed at the end."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_job(proc)
            for pid in job_tree(proc):
                os.kill(pid, signal.SIGKILL)
            proc.communicate(timeout=30)


def test_sigusr1_to_mpiexec_stops_the_run_and_the_same_command_resumes(tmp_path, jobs):
    np.save(tmp_path / "p.npy", record_points(N))
    log = tmp_path / "evaluated.txt"
    proc = background(tmp_path, log)
    jobs.append(proc)
    running(proc, log)
    os.kill(proc.pid, signal.SIGUSR1)  # as Slurm's --signal=B:USR1@120 does to the batch shell (exec mpiexec)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    # Points in flight are abandoned, as on SIGTERM: at most two per worker rank.
    check_interrupted_then_resume(tmp_path, str(tmp_path / "r.h5"), log, without_launcher_report(err),
                                  "mpimap: SIGUSR1: warning before the walltime: stopping", lost_in_flight=4)


def test_sigusr1_to_every_process_of_a_job_stops_it_and_no_rank_dies_of_it(tmp_path, jobs):
    job = make_job(tmp_path, "jobfuncs:record", record_points(N))
    log = tmp_path / "evaluated.txt"
    proc = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=SLEEP)
    jobs.append(proc)
    running(proc, log)
    tree = job_tree(proc)
    assert len(evaluation_children(proc)) == 2, tree  # the test reaches the evaluation processes too
    for pid in tree:  # as Grid Engine's s_rt does to the job's process group; the master hears it twice
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "lost" not in err and "killed by signal" not in err, err
    status = Job(job.path).status()
    assert status.state == "interrupted" and status.message.startswith("SIGUSR1: warning before the walltime")
    r = read_results(job.results)
    assert r["attrs"]["state"] == "interrupted"
    done = np.flatnonzero(r["status"] == "done")
    assert set(r["status"]) == {"done", "pending"} and np.array_equal(r["value"][done], done * 2.0)
    assert status.done == len(done) and set(done) <= set(evaluations(log))


@pytest.mark.parametrize("isolation", ["process", "fresh"])
def test_evaluation_processes_ignore_sigusr1(tmp_path, jobs, isolation):
    np.save(tmp_path / "p.npy", record_points(40))
    log = tmp_path / "evaluated.txt"
    proc = background(tmp_path, log, "--chunksize", "1", "--quarantine", "1", isolation=isolation)
    jobs.append(proc)
    running(proc, log, points=4)
    targets = evaluation_children(proc)
    assert targets, job_tree(proc)
    for pid in targets:
        os.kill(pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    r = read_results(str(tmp_path / "r.h5"))
    # An evaluation that died of it would be recorded as crashed, "killed by signal 10 (SIGUSR1)" (--quarantine 1:
    # no second attempt).  Open MPI with isolation="fresh" sometimes records a crash of its own ("exited with
    # status 0"), not this test's concern.
    assert not [e for e in r["error"] if "SIGUSR1" in e], r["error"]
    done = r["status"] == "done"
    assert done.any() and np.array_equal(r["value"][done], np.flatnonzero(done) * 2.0)
