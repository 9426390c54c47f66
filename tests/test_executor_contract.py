"""``Pool`` keeps the ``concurrent.futures.Executor`` contract, in one process and under real mpiexec.

The behaviours are those CPython's test_concurrent_futures and mpi4py's futures
tests check (the tests here are our own).  Each ``check_*`` function takes a
way to make a pool and asserts; pytest runs them in one process, and one
``mpiexec -n 3 python -m mpimap`` job per situation runs them all and prints
one line per check, which pytest then reads.
"""

import concurrent.futures as cf
import json
import os
import signal
import threading
import time
import weakref

import pytest

import jobfuncs
from conftest import freed
import mpimap

# -- functions the checks send to the workers (importable there as test_executor_contract) ------------------------


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def sleep_then(x, seconds=0.2):
    time.sleep(seconds)
    return x


def sleep_and_raise(seconds):
    time.sleep(seconds)
    raise ValueError("this is an exception")


def deep_raise(x):
    """Raises from a nested call, so the remote traceback has a frame to show."""
    def inner():
        raise KeyError(f"missing {x}")
    inner()


class Dummy:
    def __init__(self, x):
        self.x = x


def make_dummy(x):
    return Dummy(x)


def stop_on_rank_2(x):
    """Hang this rank for ever (as a dead node would) if it is rank 2."""
    if jobfuncs.rank() == "2":
        os.kill(os.getpid(), signal.SIGSTOP)
    return x


# -- the checks ------------------------------------------------------------------------------------------------------

def check_submit_result(new_pool):
    with new_pool() as pool:
        future = pool.submit(pow, 2, 8)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=60) == 256


def check_submit_keywords(new_pool):
    with new_pool() as pool:
        assert pool.submit(capture, 1, 2, a=3, fn=4).result(timeout=60) == ((1, 2), {"a": 3, "fn": 4})
        assert pool.submit(mul, y=5, x=3).result(timeout=60) == 15


def check_submit_exception_with_remote_traceback(new_pool):
    with new_pool() as pool:
        future = pool.submit(deep_raise, 3)
        exc = future.exception(timeout=60)
        assert isinstance(exc, KeyError) and "missing 3" in str(exc)
        assert "inner" in str(exc.__cause__)  # the worker's traceback, frame by frame
        with pytest.raises(KeyError):
            future.result()


def check_map_order_and_several_iterables(new_pool):
    with new_pool() as pool:
        assert list(pool.map(pow, range(10), [2] * 10)) == [x ** 2 for x in range(10)]
        assert list(pool.map(mul, range(5), range(100))) == [x * x for x in range(5)]  # shortest, as builtins.map
        assert list(pool.map(abs, (x for x in range(-3, 3)))) == [3, 2, 1, 0, 1, 2]  # any iterable


def check_map_empty(new_pool):
    with new_pool() as pool:
        assert list(pool.map(abs, [])) == []
        assert list(pool.map(mul, [], [])) == []


def check_map_chunksize(new_pool):
    with new_pool() as pool:
        for chunksize in (1, 2, 3, 40, 1000):
            assert list(pool.map(pow, range(40), [2] * 40, chunksize=chunksize)) == [x ** 2 for x in range(40)]
        for bad in (0, -1):
            with pytest.raises(ValueError):
                pool.map(abs, range(3), chunksize=bad)


def check_map_exception_at_its_point(new_pool):
    with new_pool() as pool:
        results = pool.map(divmod, [10, 10, 10], [5, 0, 2])
        assert next(results) == (2, 0)
        with pytest.raises(ZeroDivisionError):
            next(results)


def check_map_timeout(new_pool):
    with new_pool() as pool:
        results = []
        with pytest.raises(TimeoutError):
            for value in pool.map(sleep_then, [0, 1, 2, 3], [0, 0, 2.5, 2.5], timeout=1.5):
                results.append(value)
        assert results == [0, 1]


def check_map_closed_early_cancels_the_rest(new_pool):
    with new_pool() as pool:
        results = pool.map(sleep_then, range(50), [0.05] * 50)
        assert next(results) == 0
        results.close()
        assert list(pool.map(abs, [-1])) == [1]  # the pool is free for the next map


def check_cancel_a_queued_future(new_pool):
    with new_pool() as pool:
        blockers = [pool.submit(sleep_then, i, 0.5) for i in range(6)]  # every worker busy, more queued
        last = pool.submit(sleep_then, "last", 0.0)
        assert last.cancel()
        assert last.cancelled() and last.done()
        with pytest.raises(cf.CancelledError):
            last.result()
        assert [f.result(timeout=60) for f in blockers] == list(range(6))
        assert not blockers[0].cancel()  # a finished future cannot be cancelled


def check_wait_first_completed(new_pool):
    with new_pool() as pool:
        quick, slow = pool.submit(sleep_then, 1, 0.0), pool.submit(sleep_then, 2, 2.0)
        done, not_done = cf.wait([quick, slow], timeout=60, return_when=cf.FIRST_COMPLETED)
        assert done == {quick} and not_done == {slow}
        slow.result(timeout=60)


def check_wait_first_exception(new_pool):
    with new_pool() as pool:
        ok = pool.submit(sleep_then, 1, 0.0)
        bad = pool.submit(sleep_and_raise, 0.3)
        slow = pool.submit(sleep_then, 3, 2.0)
        done, not_done = cf.wait([ok, bad, slow], timeout=60, return_when=cf.FIRST_EXCEPTION)
        assert bad in done and slow in not_done
        # An already failed future makes FIRST_EXCEPTION return at once.
        done, _ = cf.wait([bad, slow], timeout=60, return_when=cf.FIRST_EXCEPTION)
        assert bad in done
        slow.result(timeout=60)


def check_wait_all_completed_and_timeout(new_pool):
    with new_pool() as pool:
        futures = [pool.submit(mul, i, i) for i in range(8)]
        done, not_done = cf.wait(futures, timeout=60, return_when=cf.ALL_COMPLETED)
        assert len(done) == 8 and not not_done
        slow = pool.submit(sleep_then, 0, 1.5)
        done, not_done = cf.wait([slow], timeout=0.2)
        assert not done and not_done == {slow}
        slow.result(timeout=60)


def check_as_completed(new_pool):
    with new_pool() as pool:
        futures = [pool.submit(sleep_then, i, 0.1 * (3 - i)) for i in range(3)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == [0, 1, 2]
        duplicated = futures + futures  # each future is yielded once
        assert len(list(cf.as_completed(duplicated, timeout=60))) == 3


def check_as_completed_timeout(new_pool):
    with new_pool() as pool:
        done = pool.submit(mul, 2, 3)
        done.result(timeout=60)
        slow = pool.submit(sleep_then, 0, 1.5)
        seen = []
        with pytest.raises(TimeoutError, match=r"1 \(of 2\) futures unfinished"):
            for future in cf.as_completed([done, slow], timeout=0.2):
                seen.append(future)
        assert seen == [done]
        slow.result(timeout=60)


def check_done_callbacks(new_pool):
    with new_pool() as pool:
        called = threading.Event()
        seen = []

        def callback(future):
            seen.append(future.result())
            called.set()

        future = pool.submit(mul, 6, 7)
        future.add_done_callback(callback)
        assert called.wait(60) and seen == [42]
        future.add_done_callback(lambda f: seen.append("late"))  # on a done future: called at once
        assert seen == [42, "late"]


def check_context_manager_waits(new_pool):
    with new_pool() as pool:
        futures = [pool.submit(sleep_then, i, 0.2) for i in range(4)]
    assert all(f.done() and not f.cancelled() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2, 3]


def check_submit_after_shutdown_raises(new_pool):
    pool = new_pool()
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(abs, 1)
    with pytest.raises(RuntimeError):
        pool.map(abs, [1])
    pool.shutdown()  # a second shutdown is harmless


def check_shutdown_cancel_futures(new_pool):
    pool = new_pool()
    futures = [pool.submit(sleep_then, i, 0.3) for i in range(20)]
    time.sleep(0.1)
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    assert all(f.result() == i for i, f in enumerate(futures) if not f.cancelled())


def check_shutdown_no_wait_runs_everything(new_pool):
    pool = new_pool()
    futures = [pool.submit(sleep_then, i, 0.2) for i in range(8)]
    time.sleep(0.1)
    pool.shutdown(wait=False)
    assert [f.result(timeout=60) for f in futures] == list(range(8))  # running and queued alike


def check_shutdown_no_wait_cancel_futures(new_pool):
    pool = new_pool()
    futures = [pool.submit(sleep_then, i, 0.3) for i in range(20)]
    time.sleep(0.1)
    pool.shutdown(wait=False, cancel_futures=True)
    done, not_done = cf.wait(futures, timeout=60)  # cancelled ones are seen done by wait()
    assert not not_done
    assert any(f.cancelled() for f in futures)
    assert len(list(cf.as_completed(futures, timeout=60))) == 20


def check_no_result_kept_alive(new_pool):
    with new_pool() as pool:
        future = pool.submit(make_dummy, 1)
        ref = weakref.ref(future.result(timeout=60))
        del future
        assert freed(ref)
        for obj in pool.map(make_dummy, range(5)):
            ref = weakref.ref(obj)
            del obj
            assert freed(ref)


def check_many_submits_then_shutdown(new_pool):
    pool = new_pool()
    futures = [pool.submit(mul, i, 2) for i in range(300)]
    pool.shutdown(wait=True)
    assert [f.result() for f in futures] == [2 * i for i in range(300)]


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


# -- in one process ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHECKS)
def test_in_one_process(name):
    CHECKS[name](mpimap.Pool)


# -- under mpiexec ---------------------------------------------------------------------------------------------------

def run_checks(situation: str) -> None:
    """Rank 0 of ``python -m mpimap``: run every check, one ``CHECK`` line each."""
    if situation == "lost rank":
        with mpimap.Pool(rank_timeout=2) as pool:
            assert list(pool.map(stop_on_rank_2, range(20))) == list(range(20))
            while not any(row["lost"] for row in pool.status()):
                time.sleep(0.1)
    for name, check in CHECKS.items():
        try:
            check(mpimap.Pool)
            print("CHECK", json.dumps([name, "ok"]), flush=True)
        except BaseException as exc:  # noqa: B902 - every failure becomes a line for pytest to read
            print("CHECK", json.dumps([name, f"{type(exc).__name__}: {exc}"]), flush=True)


SITUATIONS = {"healthy": 0, "lost rank": 4}  # the job's exit status: 4 once a rank was lost


@pytest.fixture(scope="module")
def mpiexec_checks(tmp_path_factory):
    from conftest import job_env, mpiexec

    out = {}
    for situation, status in SITUATIONS.items():
        path = tmp_path_factory.mktemp("contract") / "contract.py"
        path.write_text("import sys\nfrom test_executor_contract import run_checks\n"
                        f"if __name__ == '__main__':\n    run_checks({situation!r})\n")
        proc = mpiexec(3, "-m", "mpimap", str(path), cwd=path.parent, timeout=600, check=False,
                       env=job_env(MPIMAP_HEARTBEAT=0.3))
        lines = dict(json.loads(line[len("CHECK "):]) for line in proc.stdout.splitlines()
                     if line.startswith("CHECK "))
        out[situation] = (proc, lines, status)
    return out


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("name", CHECKS)
def test_under_mpiexec(mpiexec_checks, situation, name):
    proc, lines, status = mpiexec_checks[situation]
    assert lines.get(name) == "ok", f"{lines.get(name)}\n{proc.stderr[-3000:]}"
    assert proc.returncode == status, proc.stderr[-3000:]


SCRIPT_CLASS = '''
import mpimap

class Point:  # defined in the script: the workers know it as a class of the script too
    def __init__(self, x):
        self.x = x

def make_point(x):
    return Point(x)

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        points = list(pool.map(make_point, range(4), timeout=60))
        print("POINTS", [type(p).__name__ for p in points], [p.x for p in points], flush=True)
'''


def test_instances_of_a_class_defined_in_the_script_come_back(run_script):
    out = run_script(SCRIPT_CLASS, ranks=2, timeout=120, check=False, full=True)
    assert "POINTS ['Point', 'Point', 'Point', 'Point'] [0, 1, 2, 3]" in out.stdout, out.stderr[-2000:]
