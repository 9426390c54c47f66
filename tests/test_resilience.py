"""Bad points, bad workers, bad nodes: real mpiexec jobs that must finish and lose nothing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import job_env, launch, mpimap_cli
from mpimap.store import read_results


@pytest.fixture(scope="module")
def cspin(tmp_path_factory):
    """A tiny C library whose spin() never returns (compiled with gcc, which every test machine has)."""
    d = tmp_path_factory.mktemp("cspin")
    (d / "spin.c").write_text("void spin(void) { volatile unsigned long i = 0; for (;;) i++; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(d / "libspin.so"), str(d / "spin.c")], check=True)
    return str(d / "libspin.so")


def test_one_job_survives_every_kind_of_misbehaviour(tmp_path, cspin):
    n = 40
    np.save(tmp_path / "p.npy", np.arange(float(n)))
    out = str(tmp_path / "r.h5")
    # The C loop holds the GIL for 2 s, longer than --rank-timeout: its rank must still not look dead.
    proc = mpimap_cli(3, "run", "jobfuncs:misbehave", "--points", "p.npy", "--out", out, "--point-timeout", "2",
                      "--retries", "1", "--quarantine", "2", "--max-memory-mb", "250", "--rank-timeout", "1.5",
                      cwd=tmp_path, timeout=240, env=job_env(MPIMAP_TEST_CSPIN=cspin, MPIMAP_HEARTBEAT=0.3))
    assert "job complete" in proc.stdout and "declared lost" not in proc.stderr
    r = read_results(out)
    status = {i: r["status"][i] for i in range(n)}
    for i in range(n):
        if i % 10 == 1:
            assert status[i] == "failed" and r["error"][i].startswith(f"ValueError: point {i} is bad")
            assert r["attempts"][i] == 2  # retried once, as asked
        elif i in (3, 5):
            assert status[i] == "timeout" and r["error"][i].startswith("Timeout: evaluation killed after")
            assert r["attempts"][i] == 2  # quarantined after two timeouts
        elif i == 7:
            assert status[i] == "crashed" and "SIGSEGV" in r["error"][i]
            assert r["attempts"][i] == 2
        else:  # good points, including the leaking ones and those that fail only on the bad rank
            assert status[i] == "done", (i, r["error"][i])
            assert r["value"][i] == i * i
    bad_node_points = [i for i in range(n) if i % 10 == 9]
    assert all(r["rank"][i] == 1 for i in bad_node_points)  # retried elsewhere, stored from the good rank
    # nothing stored twice: one row per point, and each row written by exactly one run
    assert len(r["status"]) == n and set(r["run"]) == {0}
    shown = subprocess.run([sys.executable, "-m", "mpimap", "show", out], capture_output=True, text=True,
                           env=job_env())
    assert "done 33, failed 4, pending 0, timeout 2, crashed 1" in shown.stdout


def test_leaking_function_is_recycled_and_does_not_grow(tmp_path):
    np.save(tmp_path / "p.npy", np.full(12, 8.0))  # point value 8: leaks 50 MB per call
    out = str(tmp_path / "r.h5")
    mpimap_cli(2, "run", "jobfuncs:misbehave", "--points", "p.npy", "--out", out, "--max-memory-mb", "180",
               cwd=tmp_path, timeout=120)
    r = read_results(out)
    assert set(r["status"]) == {"done"}  # 600 MB leaked in all, never more than the limit at once


def test_max_points_recycles_and_fresh_isolates(run_script):
    # process isolation runs points in a child (not the rank); fresh gives each point its own process
    script = '''
import os, mpimap
from jobfuncs import square
def pid(_):
    return os.getpid()
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        rank_pids = set(pool.map(pid, range(6)))
        recycled = set(pool.map(pid, range(6), isolation="process", max_points=2, chunksize=6))
        child = set(pool.map(pid, range(6), isolation="process"))  # a new child: the last one was due
        fresh = set(pool.map(pid, range(6), isolation="fresh", chunksize=6))
        print("PIDS", len(rank_pids), len(child), len(recycled), len(fresh), bool(rank_pids & child))
'''
    stdout = run_script(script, ranks=2)
    line = next(x for x in stdout.splitlines() if x.startswith("PIDS"))
    assert line.split()[1:] == ["1", "1", "3", "6", "False"]  # rank, child, recycled every 2, fresh


def test_scratch_directories_are_private_and_removed(tmp_path, run_script):
    stdout = run_script('''
import os, mpimap
from jobfuncs import scratch_user
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        for iso in ("rank", "process"):
            dirs = list(pool.map(scratch_user, range(5), isolation=iso, scratch=True))
            print("SCRATCH", iso, len(set(dirs)), any(os.path.exists(d) for d in dirs))
''', ranks=2)
    assert "SCRATCH rank 5 False" in stdout and "SCRATCH process 5 False" in stdout


def test_python_api_policies(run_script):
    stdout = run_script('''
import mpimap
from mpimap.failures import PointTimeout, PointCrashed
from jobfuncs import misbehave
if __name__ == "__main__":
    with mpimap.Pool(isolation="process", point_timeout=1) as pool:
        got = list(pool.map(misbehave, [0, 1, 3, 7], on_error="record", quarantine=1))
        print("RECORD", got[0], type(got[1]).__name__, type(got[2]).__name__, type(got[3]).__name__)
        try:
            list(pool.map(misbehave, [0, 7], quarantine=1))
        except PointCrashed as exc:
            print("RAISED", "SIGSEGV" in str(exc))
        print("AFTER", list(pool.map(misbehave, [2, 4])))
''', ranks=2, env=job_env(MPIMAP_TEST_CSPIN="unused"))
    assert "RECORD 0.0 ValueError PointTimeout PointCrashed" in stdout
    assert "RAISED True" in stdout and "AFTER [4.0, 16.0]" in stdout


def test_bad_isolation_options_are_refused(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(3.0))
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", "--isolation", "rank",
                      "--point-timeout", "1", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mpimap: error: point_timeout, max_points and max_memory_mb need isolation='process' or 'fresh': "
        "code running in the rank itself cannot be stopped or recycled"]


def test_sigstopped_rank_is_declared_lost_and_its_work_finishes_elsewhere(run_script):
    proc_out = run_script('''
import os, signal, time, mpimap
from jobfuncs import square
def slow_square(x):
    time.sleep(0.05)
    return x * x
if __name__ == "__main__":
    with mpimap.Pool(rank_timeout=2.0) as pool:
        results = pool.map(slow_square, range(200), chunksize=5)
        first = [next(results) for _ in range(10)]
        victim = next(r for r in pool.status() if r["rank"] == 2)  # its pid is known once it has answered
        os.kill(victim["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        rest = list(results)
        lost = [r["rank"] for r in pool.status() if r["lost"]]
        print("RESULT", first + rest == [x * x for x in range(200)], lost, round(time.monotonic() - t0, 1),
              flush=True)
''', ranks=3, env=job_env(MPIMAP_HEARTBEAT=0.3), check=False, full=True)
    line = next(x for x in proc_out.stdout.splitlines() if x.startswith("RESULT"))
    assert line.startswith("RESULT True [2]")  # every result right, rank 2 declared lost
    assert "rank 2 " in proc_out.stderr and "declared lost" in proc_out.stderr
    assert proc_out.returncode == 4  # the run finished; the job ended with MPI_Abort because a rank was lost


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_point_logs_kept_on_condition_and_debug_rerun_of_failures(tmp_path, isolation):
    np.save(tmp_path / "p.npy", np.arange(1.0, 11.0))
    out = str(tmp_path / "r.h5")
    mpimap_cli(2, "run", "jobfuncs:chatty", "--points", "p.npy", "--out", out, "--isolation", isolation,
               "--keep-logs", "slow", "--slow-seconds", "0.2", "--debug-rerun", cwd=tmp_path, timeout=120)
    r = read_results(out)
    for i, x in enumerate(range(1, 11)):
        log = r["log"][i]
        if x % 3 == 0:  # slow: its own log is kept (at INFO)
            assert f"INFO jobfuncs.chatty: evaluating {x}.0" in log.split("--- debug re-run ---")[0]
        if x % 5 == 0:  # failed: re-run with DEBUG captured, stored with the failure
            assert r["status"][i] == "failed" and "--- debug re-run ---" in log
            assert f"DEBUG jobfuncs.chatty: debug detail for {x}.0" in log
        if x % 3 and x % 5:
            assert log == ""  # neither slow nor failed: nothing kept


def test_logs_predicate_from_the_python_api(run_script):
    stdout = run_script('''
import mpimap
from jobfuncs import chatty
def big(point, value, seconds):
    return point > 7
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        chunks = list(pool.imap_chunks(chatty, [1.0, 2.0, 8.0, 11.0], keep_logs=big))
        logs = {c.start + k: t for c in chunks for k, t in c.logs.items()}
        print("LOGS", sorted(logs), all("evaluating" in t for t in logs.values()))
''', ranks=2)
    assert "LOGS [2, 3] True" in stdout


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_worker_logs_reach_the_job_log_and_levels_change_at_run_time(run_script, isolation):
    proc = run_script(f'''
import logging, mpimap
from jobfuncs import warns
if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    with mpimap.Pool(isolation="{isolation}") as pool:
        list(pool.map(warns, [1], chunksize=1))
        pool.set_log_level("INFO", ranks=2)
        list(pool.map(warns, [2, 3, 4, 5], chunksize=1))
        pool.set_log_level("ERROR", ranks="workers")
        list(pool.map(warns, [6, 7], chunksize=1))
        print("DONE", flush=True)
''', ranks=3, full=True)
    err = proc.stderr
    assert "[rank 1 " in err or "[rank 2 " in err
    assert "jobfuncs.warns: warning from point 1" in err  # WARNING passes the default level
    assert "info from point 1" not in err
    infos = [line for line in err.splitlines() if "info from point" in line]
    assert infos and all("[rank 2 " in line for line in infos)  # only rank 2 was turned up to INFO
    assert "from point 6" not in err and "from point 7" not in err  # ERROR on every worker


def test_cli_changes_the_log_level_of_a_running_job(tmp_path):
    import time

    np.save(tmp_path / "p.npy", np.arange(200.0))
    out = str(tmp_path / "r.h5")
    job = launch(3, "-m", "mpimap", "run", "jobfuncs:slow_chatty", "--points", "p.npy", "--out", out, "--chunksize", "1",
                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(out + ".lock") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    sent = subprocess.run([sys.executable, "-m", "mpimap", "loglevel", out, "info", "--ranks", "workers"],
                          capture_output=True, text=True, env=job_env())
    assert sent.returncode == 0, sent.stderr
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert "log level of workers set to INFO" in err
    working = [line for line in err.splitlines() if "jobfuncs.slow_chatty: working on" in line]
    assert 0 < len(working) < 200  # records appear once the level changed, not before
    assert all("[rank 1 " in line or "[rank 2 " in line for line in working)
    refused = subprocess.run([sys.executable, "-m", "mpimap", "loglevel", out, "info"], capture_output=True,
                             text=True, env=job_env())
    assert refused.returncode == 2 and "no running job is writing" in refused.stderr


def test_a_host_whose_points_keep_failing_is_retired(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(60.0))
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(4, "run", "jobfuncs:fails_on_node2", "--points", "p.npy", "--out", out, "--retries", "2",
                      "--host-failures", "3", "--chunksize", "1", cwd=tmp_path, timeout=120,
                      env=job_env(MPIMAP_HOST="node{rank}"))
    r = read_results(out)
    assert set(r["status"]) == {"done"} and np.array_equal(r["value"], np.arange(60.0) * 10)
    assert "node2" not in set(r["host"])  # nothing stored from the bad node
    assert "host node2: 3 points failed there and succeeded elsewhere" in proc.stderr
    retried = r["attempts"] > 1
    assert 3 <= retried.sum() <= 15  # a few points paid for finding out, then node2 got no more work


def test_stalled_rank_is_reported_while_its_heartbeats_continue(run_script):
    proc = run_script('''
import time, mpimap
if __name__ == "__main__":
    with mpimap.Pool(stall_timeout=0.5, rank_timeout=5) as pool:
        list(pool.map(time.sleep, [2.0]))
        print("DONE", [r["lost"] for r in pool.status()], flush=True)
''', ranks=2, env=job_env(MPIMAP_HEARTBEAT=0.2), full=True)
    assert "DONE [False]" in proc.stdout  # heartbeats kept it alive: not lost
    assert "rank 1 (" in proc.stderr and "has returned nothing for 0.5 s" in proc.stderr
    assert "is alive but has returned nothing" in proc.stderr


def test_verification_on_another_host_reports_mismatches(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(40.0))
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(3, "run", "jobfuncs:host_dependent", "--points", "p.npy", "--out", out, "--verify", "0.5",
                      cwd=tmp_path, timeout=120, env=job_env(MPIMAP_HOST="node{rank}"))
    r = read_results(out)
    checked = r["verified"] > 0
    assert 10 <= checked.sum() <= 30  # about half the points
    expected_bad = np.arange(40) % 4 == 0  # host_dependent differs between nodes on these points only
    assert ((r["verified"] == 2) == (checked & expected_bad)).all()
    assert f"{(checked & expected_bad).sum()} mismatches" in proc.stderr
    assert set(r["status"]) == {"done"}


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_cancelling_one_map_keeps_the_pool_serving(run_script, isolation):
    stdout = run_script(f'''
import time, mpimap
def nap(x):
    time.sleep(0.3)
    return x
if __name__ == "__main__":
    with mpimap.Pool(isolation="{isolation}") as pool:
        results = pool.map(nap, range(100), chunksize=1)
        first = [next(results), next(results)]
        t0 = time.monotonic()
        results.close()  # cancel the rest of this map
        future = pool.submit(nap, 7)
        future.cancel()  # a queued future can be cancelled too
        after = list(pool.map(abs, [-1, -2, -3]))
        print("CANCEL", first, after, round(time.monotonic() - t0, 2), flush=True)
''', ranks=3)
    line = next(x for x in stdout.splitlines() if x.startswith("CANCEL"))
    _, rest = line.split(" ", 1)
    assert rest.startswith("[0, 1] [1, 2, 3]")
    # the queued points were dropped: the next map did not wait for 98 naps of 0.3 s
    assert float(rest.rsplit(" ", 1)[1]) < 2.0


def test_on_error_stop_and_exit_crashes(tmp_path):
    np.save(tmp_path / "p.npy", np.array([0.0, 2.0, 11.0, 4.0]))
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(2, "run", "jobfuncs:misbehave", "--points", "p.npy", "--out", out, "--on-error", "stop",
                      "--chunksize", "1", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mpimap: error: point 2 failed (ValueError: point 11")
    r = read_results(out)
    assert r["attrs"]["state"] == "failed" and r["status"][2] == "failed" and r["status"][0] == "done"
    np.save(tmp_path / "q.npy", np.array([1.0, 2.0, 3.0]))
    proc = mpimap_cli(2, "run", "jobfuncs:exits_on_2", "--points", "q.npy", "--out", "q.h5", "--quarantine", "1",
                      cwd=tmp_path)
    r = read_results(str(tmp_path / "q.h5"))
    assert list(r["status"]) == ["done", "crashed", "done"]
    assert r["error"][1] == "Crash: the evaluation process exited with status 3"
