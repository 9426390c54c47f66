"""Pool in a single process (no mpiexec): the concurrent.futures contract, evaluated in-process."""

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

import mpimap
from jobfuncs import fail_on_multiples_of_7, square
from mpimap.failures import PointCrashed


def slow_identity(x):
    time.sleep(0.05)
    return x


def test_map_in_order_equals_serial():
    with mpimap.Pool() as pool:
        assert list(pool.map(square, range(5000))) == [square(x) for x in range(5000)]
        assert list(pool.map(pow, [2, 3], [5, 2])) == [32, 9]  # several iterables, like builtins.map
        arr = np.arange(12.0).reshape(6, 2)
        assert [r.tolist() for r in pool.map(np.flip, arr)] == [np.flip(r).tolist() for r in arr]
        assert list(pool.map(square, [])) == []


def test_submit_and_futures_work_with_wait_and_as_completed():
    with mpimap.Pool() as pool:
        futures = [pool.submit(pow, 2, k) for k in range(10)]
        done, not_done = cf.wait(futures, timeout=30)
        assert not not_done
        assert sorted(f.result() for f in cf.as_completed(futures)) == [2 ** k for k in range(10)]
        assert pool.submit(int, "ff", base=16).result() == 255


def test_exception_reaches_caller_with_remote_traceback():
    with mpimap.Pool() as pool:
        with pytest.raises(ValueError, match="bad point 7") as info:
            list(pool.map(fail_on_multiples_of_7, range(1, 20)))
        assert isinstance(info.value.__cause__, mpimap.failures.RemoteTraceback)
        assert "fail_on_multiples_of_7" in str(info.value.__cause__)
        future = pool.submit(fail_on_multiples_of_7, 14)
        assert isinstance(future.exception(timeout=30), ValueError)
        # the pool stays usable after a failure
        assert list(pool.map(square, range(3))) == [0, 1, 4]


def test_map_timeout_is_a_deadline_for_the_whole_iteration():
    with mpimap.Pool() as pool:
        results = pool.map(slow_identity, range(100), timeout=0.3)
        with pytest.raises(TimeoutError):
            list(results)
        assert list(pool.map(square, range(4))) == [0, 1, 4, 9]


def test_unordered_iterator_gives_every_result_once():
    with mpimap.Pool() as pool:
        pairs = list(pool.imap_unordered(square, range(1000), indexed=True))
        assert sorted(pairs) == [(i, i * i) for i in range(1000)]


def test_lambdas_and_closures_travel_by_value_and_the_rest_is_refused_in_one_line():
    k = 3
    with mpimap.Pool() as pool:
        assert list(pool.map(lambda x: x * k, range(4))) == [0, 3, 6, 9]  # cloudpickle (the test extra)
        lock = threading.Lock()
        with pytest.raises(TypeError, match=r"cannot send function .*<lambda> to the workers \(.*lock.*\): define"):
            pool.map(lambda x: lock, range(3))


def test_shutdown_cancel_futures_and_closed_pool():
    pool = mpimap.Pool()
    futures = [pool.submit(slow_identity, i) for i in range(40)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        pool.submit(square, 2)


def test_emcee_and_scipy_take_the_pool_unchanged():
    emcee = pytest.importorskip("emcee")
    from scipy.optimize import differential_evolution, rosen

    from test_pool_mpi import run_fitting_libraries

    with mpimap.Pool() as pool:
        assert run_fitting_libraries(pool, emcee, differential_evolution, rosen)


_EVALUATED = []


def counted_slow(x):
    _EVALUATED.append(x)
    time.sleep(0.02)
    return x


@pytest.mark.parametrize("how", ["map", "imap_unordered", "imap_chunks"])
@pytest.mark.parametrize("drop", ["close", "del"])
def test_a_map_iterator_closed_or_dropped_before_its_first_item_cancels_the_map(how, drop):
    with mpimap.Pool() as pool:
        _EVALUATED.clear()
        it = getattr(pool, how)(counted_slow, list(range(200)))
        if drop == "close":
            it.close()
        else:
            del it
        time.sleep(0.5)
        assert list(pool.map(square, [3], timeout=30)) == [9]  # the pool serves on at once
        time.sleep(0.5)
        assert len(_EVALUATED) < 100  # 200 points of 20 ms: only what was in flight ran


def killed_by_a_real_time_signal(x):
    import os
    import signal

    if x == 1:
        os.kill(os.getpid(), signal.SIGRTMIN + 2)
    return x


def test_a_point_killed_by_a_signal_without_a_name_is_recorded_as_crashed():
    """Found reading the change: naming the signal raised ValueError for a real-time one, and the pool died."""
    with mpimap.Pool(isolation="process") as pool:
        values = list(pool.map(killed_by_a_real_time_signal, range(3), on_error="record"))
    number = __import__("signal").SIGRTMIN + 2
    assert values[0] == 0 and values[2] == 2
    assert isinstance(values[1], PointCrashed)
    assert f"killed by signal {number} ({number})" in str(values[1])
