"""Faults around rank 0's master: a bad map fails alone, the master keeps serving, shutdown never hangs."""

import concurrent.futures as cf
import gc
import os
import signal
import subprocess
import threading
import time
import uuid
import weakref

import numpy as np
import pytest

import mpimap
from conftest import freed, job_env, launch
from jobfuncs import exits_on_2, square
from mpimap.store import read_results


def raises_value_error(x):
    raise ValueError(f"bad {x}")


class Payload:
    """A result whose lifetime the tests watch with a weakref."""

    def __init__(self, x):
        self.x = x


def payload(x):
    return Payload(x)


def sleep_then(x, seconds=0.3):
    time.sleep(seconds)
    return x


def _returns_within(call, seconds=30.0):
    """Run ``call`` in a thread; True if it returned within ``seconds`` (a hang fails the test, not the run)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


# -- finding 10: a second attempt of a submitted future ----------------------------------------------------------

def test_submit_with_retries_gives_the_functions_exception_and_the_pool_serves_on():
    pool = mpimap.Pool(retries=1)
    with pytest.raises(ValueError, match="bad 1"):
        pool.submit(raises_value_error, 1).result(timeout=30)
    assert list(pool.map(square, range(3))) == [0, 1, 4]
    pool.shutdown()


def test_submit_that_crashes_is_quarantined_by_default_and_the_pool_serves_on():
    pool = mpimap.Pool(isolation="process")  # quarantine=2: a crashed point gets a second attempt
    with pytest.raises(mpimap.failures.PointCrashed):
        pool.submit(exits_on_2, 2).result(timeout=60)
    assert pool.submit(square, 5).result(timeout=30) == 25
    pool.shutdown()


# -- finding 9: bad per-map input raises in the caller, the master serves on -----------------------------------

@pytest.mark.parametrize("chunksize", [0, -1, 1.5, "2"])
def test_bad_chunksize_raises_in_the_caller_and_the_next_map_works(chunksize):
    with mpimap.Pool() as pool:
        with pytest.raises(ValueError, match="chunksize must be a positive integer"):
            pool.map(square, [1, 2], chunksize=chunksize)
        assert list(pool.map(square, [1, 2])) == [1, 4]


def test_bad_priority_raises_in_the_caller_and_the_next_map_works():
    with mpimap.Pool() as pool:
        with pytest.raises(TypeError, match="priority must be a number"):
            pool.map(square, [1, 2], priority="high")
        with pytest.raises(TypeError, match="priority must be a number"):
            pool.imap_unordered(square, [1], priority=None)
        assert list(pool.map(square, [1, 2], priority=5)) == [1, 4]


def test_unpicklable_argument_process_isolation_fails_that_map_only():
    with mpimap.Pool(isolation="process") as pool:
        with pytest.raises(TypeError, match="lock"):
            list(pool.map(square, [threading.Lock()], timeout=60))
        assert list(pool.map(square, [1, 2], timeout=60)) == [1, 4]


def test_without_cloudpickle_a_lambda_is_refused_in_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(mpimap.pool, "cloudpickle", None)
    with mpimap.Pool() as pool:
        with pytest.raises(TypeError, match=r"cannot send function .*<lambda> .*: define it at the top level .*"
                                            r"or install cloudpickle"):
            pool.map(lambda x: x, [1])


# -- finding 8: shutdown(wait=False) ---------------------------------------------------------------------------

def test_shutdown_without_wait_completes_running_and_queued_futures():
    pool = mpimap.Pool()
    futures = [pool.submit(sleep_then, i, 0.2) for i in range(4)]
    time.sleep(0.1)  # the first one is running
    pool.shutdown(wait=False)
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]  # queued ones are not cancelled
    with pytest.raises(RuntimeError):
        pool.submit(square, 1)


def test_futures_cancelled_at_shutdown_are_seen_done_by_wait_and_as_completed():
    pool = mpimap.Pool()
    futures = [pool.submit(sleep_then, i, 0.2) for i in range(6)]
    time.sleep(0.1)
    pool.shutdown(wait=False, cancel_futures=True)
    done, not_done = cf.wait(futures, timeout=30)
    assert not not_done
    assert futures[0].result() == 0  # it was running: it completes
    assert any(f.cancelled() for f in futures)
    assert len(list(cf.as_completed(futures, timeout=30))) == 6


# -- finding 16: refused submits, references -------------------------------------------------------------------

def test_shutdown_returns_after_a_submit_refused_by_a_dead_master():
    pool = mpimap.Pool()

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault in the master thread")

    pool._master.scheduler.assign = boom  # the only way to kill a master that has no known bug left
    pool._master._thread.join(30)
    with pytest.raises(RuntimeError, match="master has failed"):
        pool.submit(square, 2)
    assert _returns_within(pool.shutdown)


def test_map_iterator_does_not_keep_the_value_it_returned_alive():
    with mpimap.Pool() as pool:
        results = pool.map(payload, range(3))
        first = next(results)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None
        assert [p.x for p in results] == [1, 2]


def test_no_result_is_kept_alive_by_the_pool_after_a_submit():
    with mpimap.Pool() as pool:
        future = pool.submit(payload, 7)
        ref = weakref.ref(future.result(timeout=30))
        del future
        assert freed(ref)


# -- suspected: submit racing close ----------------------------------------------------------------------------

def test_a_submit_racing_a_shutdown_is_either_refused_or_completed():
    pool = mpimap.Pool()
    master = pool._master
    command = master._command
    inside = threading.Event()

    def slow_command(name, argument):  # widens the window between submit's check and its command
        if name == "add":
            inside.set()
            time.sleep(0.5)
        command(name, argument)

    master._command = slow_command
    futures = []
    submitter = threading.Thread(target=lambda: futures.append(pool.submit(square, 3)))
    submitter.start()
    assert inside.wait(30)
    pool.shutdown(wait=False)  # closes while the submit is in its window
    submitter.join(30)
    assert futures[0].result(timeout=30) == 9


# -- under real mpiexec ------------------------------------------------------------------------------------------

SCRIPT_FAULTS = '''
import threading, time, mpimap
from jobfuncs import square

def double(x):
    return 2 * x

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        try:
            list(pool.map(square, [1, threading.Lock(), 3]))
        except TypeError as exc:
            print("UNPICKLABLE", "lock" in str(exc), flush=True)
        print("NEXT", list(pool.map(square, range(4))), flush=True)
        try:
            pool.map(square, [1], chunksize=0)
        except ValueError:
            print("CHUNKSIZE refused", flush=True)
        f = pool.submit(square, 6)
    with mpimap.Pool() as later:  # a later pool of the same script: the shared master still serves
        print("LATER", f.result(), later.submit(double, 21).result(), flush=True)
        print("LAMBDA", list(later.map(lambda x: x + 100, range(3))), flush=True)
        print("GUARDED", list(later.map(double, range(3))), flush=True)
'''


def test_script_bad_maps_fail_alone_and_later_pools_work(run_script):
    out = run_script(SCRIPT_FAULTS, ranks=3, timeout=120)
    assert "UNPICKLABLE True" in out
    assert "NEXT [0, 1, 4, 9]" in out
    assert "CHUNKSIZE refused" in out
    assert "LATER 36 42" in out
    assert "LAMBDA [100, 101, 102]" in out  # by value with cloudpickle


def test_script_function_defined_under_the_main_guard_travels_by_value(run_script):
    out = run_script('''
import mpimap
if __name__ == "__main__":
    def offset(x):  # never defined on the workers, which import the script as __worker__
        return x + 0.5
    with mpimap.Pool() as pool:
        print("OUT", list(pool.map(offset, range(4))), flush=True)
''', ranks=2, timeout=120)
    assert "OUT [0.5, 1.5, 2.5, 3.5]" in out


def test_script_with_a_dead_master_thread_still_ends(run_script):
    proc = run_script('''
import mpimap
from jobfuncs import square
if __name__ == "__main__":
    pool = mpimap.Pool()
    def boom(*args, **kwargs):
        raise RuntimeError("injected fault in the master thread")
    pool._master.scheduler.assign = boom   # kill the shared master thread
    pool._master._thread.join()
    try:
        pool.submit(square, 1).result()
    except RuntimeError as exc:
        print("MASTER DIED", exc, flush=True)
''', ranks=3, timeout=60, full=True, check=False)
    assert "MASTER DIED the mpimap master has failed" in proc.stdout  # and the job ended: STOP reached the workers


def test_script_ending_without_shutdown_finishes_queued_work(run_script, tmp_path):
    log = tmp_path / "evaluated.txt"
    proc = run_script('''
import mpimap
from jobfuncs import record
if __name__ == "__main__":
    pool = mpimap.Pool()
    for i in range(8):
        pool.submit(record, (i, 0))
    print("SCRIPT ENDS", flush=True)
''', ranks=3, timeout=120, full=True, env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=0.2))
    assert proc.returncode == 0
    assert sorted(int(line) for line in log.read_text().split()) == list(range(8))


def test_shutdown_without_wait_under_mpiexec(run_script):
    out = run_script('''
import time, concurrent.futures as cf
from mpi4py import MPI
import mpimap

def sleep_then(x, seconds):
    time.sleep(seconds)
    return x

pool = mpimap.Pool(MPI.COMM_WORLD)
if pool.is_master:
    running = [pool.submit(sleep_then, i, 0.5) for i in range(2)]
    queued = [pool.submit(sleep_then, i, 0.5) for i in range(2, 6)]
    time.sleep(0.3)
    pool.shutdown(wait=False)
    print("RESULTS", [f.result(timeout=60) for f in running + queued], flush=True)
MPI.COMM_WORLD.Barrier()
print(f"BACK {MPI.COMM_WORLD.Get_rank()}", flush=True)  # one write: lines of ranks never interleave
''', ranks=3, plain=True, timeout=120)
    assert "RESULTS [0, 1, 2, 3, 4, 5]" in out
    assert all(f"BACK {r}" in out for r in range(3))


def test_pool_comm_shutdown_after_a_lost_rank_raises_naming_it(run_script):
    proc = run_script('''
import os, signal, time
from mpi4py import MPI
import mpimap
from jobfuncs import square

def stop_on_rank_2(x):
    if MPI.COMM_WORLD.Get_rank() == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    return square(x)

if __name__ == "__main__":
    pool = mpimap.Pool(MPI.COMM_WORLD, rank_timeout=2, heartbeat=0.3)
    if pool.is_master:
        print("MAP", list(pool.map(stop_on_rank_2, range(20), timeout=90)) == [x * x for x in range(20)], flush=True)
        while not any(row["lost"] for row in pool.status()):  # a straggler copy may have finished the map first
            time.sleep(0.1)
        try:
            pool.shutdown()
        except mpimap.pool.RanksLostError as exc:
            print("LOST", exc.ranks, "Abort" in str(exc), flush=True)
        MPI.COMM_WORLD.Abort(5)
''', ranks=3, plain=True, timeout=150, full=True, check=False,
                      )
    assert "MAP True" in proc.stdout
    assert "LOST [2] True" in proc.stdout


def test_last_live_rank_is_kept_and_the_map_fails_clearly_when_it_falls_silent(run_script):
    proc = run_script('''
import os, signal, mpimap
def stop(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGSTOP)   # the only worker hangs for good
    return x
if __name__ == "__main__":
    with mpimap.Pool(rank_timeout=2) as pool:
        try:
            list(pool.map(stop, range(6)))
        except RuntimeError as exc:
            print("FAILED", exc, flush=True)
        print("STATUS", [(row["rank"], row["lost"]) for row in pool.status()], flush=True)
''', ranks=2, timeout=120, full=True, check=False, env=job_env(MPIMAP_HEARTBEAT=0.3))
    assert "FAILED no worker rank is left: rank 1" in proc.stdout
    assert "STATUS [(1, False)]" in proc.stdout  # still in service: it may come back
    assert proc.returncode == 4  # it never did: the job ends with MPI_Abort, as with any lost rank


# -- finding 5: a suspended job or a stopped rank 0 is not the workers' silence ----------------------------------

def _job_pids(marker: str) -> dict:
    """Processes of one test job (found by a unique environment variable), as {pid: rank or None}."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"MPIMAP_TEST_JOB") == marker.encode():
            rank = env.get(b"PMI_RANK") or env.get(b"OMPI_COMM_WORLD_RANK")  # MPICH, Open MPI
            pids[int(entry)] = None if rank is None else int(rank)
    return pids


@pytest.mark.parametrize("stopped", ["whole_job", "rank_0"])
def test_suspension_longer_than_rank_timeout_loses_no_rank(tmp_path, stopped):
    n = 150
    np.save(tmp_path / "p.npy", np.stack([np.arange(float(n)), np.zeros(n)], axis=1))
    log = tmp_path / "evaluated.txt"
    marker = uuid.uuid4().hex
    env = job_env(MPIMAP_TEST_JOB=marker, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=0.05, MPIMAP_HEARTBEAT=0.3)
    proc = launch(3, "-m", "mpimap", "run", "jobfuncs:record", "--points", "p.npy", "--out", "r.h5",
                  "--isolation", "rank", "--rank-timeout", "2", "--no-progress", cwd=tmp_path, env=env,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and len(log.read_text().split()) >= 10):  # the job is under way
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.1)
        pids = _job_pids(marker)
        targets = [p for p, rank in pids.items() if stopped == "whole_job" or rank == 0]
        assert targets
        for pid in targets:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(4)  # twice --rank-timeout
        for pid in targets:
            os.kill(pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            for pid in _job_pids(marker):
                os.kill(pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "declared lost" not in stderr
    r = read_results(str(tmp_path / "r.h5"))
    assert set(r["status"]) == {"done"}
    assert np.array_equal(r["value"], np.arange(float(n)) * 2)


def test_verification_of_submitted_calls_evaluates_them_again(run_script):
    out = run_script('''
import mpimap
from jobfuncs import square
if __name__ == "__main__":
    pool = mpimap.Pool(verify=1.0)
    assert [pool.submit(square, i).result(timeout=60) for i in range(4)] == [0, 1, 4, 9]
    pool.shutdown()
    checks = pool.verification()
    print("VERIFIED", len(checks), all(c["same"] for c in checks), flush=True)
''', ranks=3, timeout=120, env=job_env(MPIMAP_HOST="node{rank}"))
    assert "VERIFIED 4 True" in out


def test_future_result_timeout_is_the_time_given(run_script):
    out = run_script('''
import concurrent.futures as cf, time
import mpimap
from jobfuncs import square
def nap(x):
    time.sleep(x)
    return x
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        future = pool.submit(nap, 20)
        for method in (future.result, future.exception):
            t0 = time.monotonic()
            try:
                method(timeout=3)
            except cf.TimeoutError:
                print("WAITED", method.__name__, round(time.monotonic() - t0), flush=True)
        future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        import os; os._exit(0)
''', ranks=2, timeout=120, full=True, check=False).stdout  # Open MPI calls an exit without MPI_Finalize a failure
    waited = [int(line.split()[2]) for line in out.splitlines() if line.startswith("WAITED")]
    assert len(waited) == 2 and all(3 <= w < 5 for w in waited), out



def test_an_interrupt_while_a_caller_drives_the_loop_leaves_the_pool_serving(run_script):
    """Ctrl-C (here interrupt_main, which runs the SIGINT handler) while result() or a map's iterator drives the loop."""
    proc = run_script('''
import _thread, random, threading, time
import mpimap
from jobfuncs import square
if __name__ == "__main__":
    random.seed(5)
    with mpimap.Pool() as pool:
        interrupted = 0
        for trial in range(30):
            futures = [pool.submit(square, i) for i in range(300)]
            timer = threading.Timer(random.uniform(0, 0.02), _thread.interrupt_main)
            try:
                timer.start()
                if trial % 2:
                    [f.result(timeout=60) for f in futures]
                else:
                    list(pool.map(square, range(3000), chunksize=1, timeout=60))
                timer.join()  # the interrupt lands here if the results came first
                time.sleep(0.01)
            except KeyboardInterrupt:
                interrupted += 1
                timer.join()
            assert list(pool.map(square, range(3), timeout=30)) == [0, 1, 4], trial
        print("SERVING", interrupted > 0, flush=True)
''', ranks=2, timeout=240, full=True)
    assert "SERVING True" in proc.stdout
    assert "master failed" not in proc.stderr


def test_signal_handlers_between_the_points_of_a_map_are_the_users_own(run_script):
    """Signals are held only inside the loop's turns: Ctrl-C in the caller's code between two points of a map is
    raised there at once, a handler the caller sets mid-iteration is kept, one it saves and puts back works, and
    the old ones are back at the end."""
    proc = run_script('''
import os, signal, time
import mpimap
from jobfuncs import square
if __name__ == "__main__":
    original = signal.getsignal(signal.SIGINT)
    seen = []
    def mine(signum, frame):
        seen.append(signum)
    with mpimap.Pool() as pool:
        values = pool.map(square, range(2000), chunksize=1)
        first = [next(values) for _ in range(10)]
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(20)
            print("NOT RAISED", flush=True)
        except KeyboardInterrupt:
            print("RAISED AT ONCE", flush=True)
        signal.signal(signal.SIGUSR1, mine)
        rest = []
        for value in values:
            if len(rest) == 100:  # the caller's own code sets a handler, saving the one it replaces
                saved = signal.signal(signal.SIGINT, mine)
            rest.append(value)
        signal.signal(signal.SIGINT, saved)  # and puts that back once the map is done
        print("RESULTS", first + rest == [square(i) for i in range(2000)], flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        print("RESTORED", signal.getsignal(signal.SIGINT) is original, signal.getsignal(signal.SIGUSR1) is mine,
              seen == [signal.SIGUSR1], flush=True)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(20)
        except KeyboardInterrupt:
            print("CTRL-C AFTER", flush=True)
''', ranks=2, timeout=120, full=True)
    assert "RAISED AT ONCE" in proc.stdout, proc.stdout + proc.stderr
    assert "RESULTS True" in proc.stdout, proc.stdout + proc.stderr
    assert "RESTORED True True True" in proc.stdout, proc.stdout + proc.stderr
    assert "CTRL-C AFTER" in proc.stdout, proc.stdout + proc.stderr
