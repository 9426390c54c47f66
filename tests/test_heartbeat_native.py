"""The native heartbeat (c_ext/heartbeat.c): a C call that holds the GIL no longer makes its rank lost; the thread
stops cleanly at the end of serving, and a forked child never has one."""

from __future__ import annotations

import re

import pytest

from conftest import job_env
from mpimap import native_models

needs_extension = pytest.mark.skipif(native_models.extension is None, reason="the C extension is not in use here")

# Rank 1 holds the GIL (ctypes.PyDLL) in its first point for 3x rank_timeout, while rank 2 has work for longer
# (else the map ends on rank 2's copies of rank 1's chunks before the master misses rank 1); a thread of the
# script watches pool.status() for how long rank 1's Python side is seen frozen.
GIL_SCRIPT = '''
import ctypes, os, threading, time
from mpi4py import MPI
import mpimap

RANK_TIMEOUT = 2.0
held = []

def square(x):
    if MPI.COMM_WORLD.Get_rank() == 1 and not held:
        held.append(x)
        ctypes.PyDLL(os.environ["NATIVE_MODEL"]).hold(ctypes.c_double(3 * RANK_TIMEOUT))
    time.sleep(0.05)
    return x * x

if __name__ == "__main__":
    with mpimap.Pool(rank_timeout=RANK_TIMEOUT) as pool:
        frozen, done = [0.0], threading.Event()

        def watch():
            while not done.wait(0.1):
                frozen[0] = max([frozen[0]] + [r["frozen"] for r in pool.status() if r["rank"] == 1])

        watcher = threading.Thread(target=watch)
        watcher.start()
        results = list(pool.map(square, range(160), chunksize=1, isolation="rank"))
        done.set()
        watcher.join()
        lost = [r["rank"] for r in pool.status() if r["lost"]]
        print("RESULT", results == [x * x for x in range(160)], lost, "frozen", round(frozen[0], 1), flush=True)
'''


@pytest.mark.parametrize("extension", [pytest.param(True, marks=needs_extension), False], ids=["native", "python"])
def test_a_c_call_holding_the_gil_makes_its_rank_lost_only_without_the_native_heartbeat(run_script, native_model,
                                                                                        extension):
    env = job_env(NATIVE_MODEL=native_model, MPIMAP_HEARTBEAT=0.3, **({} if extension else {"MPIMAP_NO_EXTENSION": 1}))
    proc = run_script(GIL_SCRIPT, ranks=3, env=env, check=False, full=True, timeout=120)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, proc.stdout + proc.stderr
    if extension:  # alive all along, seen frozen (alive but stuck) for about the 6 s of the hold, and said so
        words = line.split()
        assert words[:4] == ["RESULT", "True", "[]", "frozen"], line
        assert float(words[4]) > 2.0, line
        assert "rank 1 " in proc.stderr and "is alive but its Python side has not moved" in proc.stderr
        assert "declared lost" not in proc.stderr
        assert proc.returncode == 0, proc.stderr
    else:  # today's behaviour without the extension: the Python heartbeat thread starves, the rank is lost
        assert line.startswith("RESULT True [1]"), line
        assert "rank 1 " in proc.stderr and "declared lost" in proc.stderr
        assert proc.returncode == 4  # the run finished; the job ended with MPI_Abort because a rank was lost


@needs_extension
@pytest.mark.parametrize("isolation, in_point", [("rank", True), ("process", False), ("fresh", False)])
def test_the_native_heartbeat_runs_in_the_rank_never_in_its_child_and_stops_when_serving_ends(run_script, isolation,
                                                                                              in_point):
    out = run_script(f'''
from mpi4py import MPI
import mpimap
from mpimap import native_models

def beating(x):
    return native_models.extension.heartbeat_running()

comm = MPI.COMM_WORLD
with mpimap.Pool(comm, isolation={isolation!r}) as pool:
    if pool is not None:
        print("POINTS", sorted(set(pool.map(beating, range(20), chunksize=2))), flush=True)
# every rank is back: its heartbeat thread has stopped, MPI still works, and the job ends
running = native_models.extension.heartbeat_running()
print(f"RANK {{comm.Get_rank()}} beating {{running}} allreduce {{comm.allreduce(1)}}", flush=True)
''', ranks=3, plain=True, env=job_env(MPIMAP_HEARTBEAT=0.2), timeout=120)
    assert f"POINTS [{in_point}]" in out, out
    assert sorted(re.findall(r"RANK \d beating \w+ allreduce \d", out)) == [  # ranks' lines may interleave
        f"RANK {r} beating False allreduce 3" for r in range(3)], out


@needs_extension
def test_frozen_stops_growing_when_the_rank_is_stopped_and_ends_with_its_result(run_script, native_model):
    """Found by review: ``frozen`` grew while a SIGSTOPped rank sent nothing (the docs say it means "alive"), and a
    rank's last result left it standing in the job's final report.  Now it is as of the rank's latest heartbeat,
    and a result clears it."""
    out = run_script('''
import ctypes, os, signal, time
from mpi4py import MPI
import mpimap

def hold(seconds):
    if MPI.COMM_WORLD.Get_rank() == 1:
        ctypes.PyDLL(os.environ["NATIVE_MODEL"]).hold(ctypes.c_double(seconds))
    return seconds

def row(pool):
    return next(r for r in pool.status() if r["rank"] == 1)

if __name__ == "__main__":
    with mpimap.Pool(rank_timeout=60) as pool:
        future = pool.submit(hold, 8.0)
        while row(pool)["frozen"] < 1.5:
            time.sleep(0.1)
        os.kill(row(pool)["pid"], signal.SIGSTOP)
        time.sleep(1.0)
        before = row(pool)
        time.sleep(2.0)
        after = row(pool)
        os.kill(after["pid"], signal.SIGCONT)
        assert future.result() == 8.0
        print("FROZEN", before["frozen"], after["frozen"], "SILENT", before["last_heard"], after["last_heard"],
              "END", row(pool)["frozen"], flush=True)
''', ranks=2, env=job_env(NATIVE_MODEL=native_model, MPIMAP_HEARTBEAT=0.3), timeout=120)
    words = next(line for line in out.splitlines() if line.startswith("FROZEN")).split()
    before, after, silent_before, silent_after, end = (float(words[i]) for i in (1, 2, 4, 5, 7))
    assert abs(after - before) < 0.5 and silent_after - silent_before > 1.5, out  # stopped: silent, not frozen
    assert end == 0.0, out


@pytest.mark.parametrize("value", ["0", "-1", "nan", "abc"])
def test_a_bad_heartbeat_period_is_one_warning_and_the_default(run_script, value):
    """A period of 0 made the Python heartbeat thread flood the master (12 of 300 points in 39 s); "abc" killed the
    workers with a traceback.  Now one line, and the job runs at the default period."""
    import os

    proc = run_script('''
import mpimap

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        print("RESULT", sum(pool.map(abs, range(-300, 0), chunksize=1)), flush=True)
''', env=dict(os.environ, MPIMAP_HEARTBEAT=value), full=True, timeout=120)
    assert "RESULT 45150" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "MPIMAP_HEARTBEAT" in line]
    assert warnings == [f"mpimap: MPIMAP_HEARTBEAT={value!r} is not a positive number of seconds: using 1.0 s"]
    assert "Traceback" not in proc.stderr


def test_pool_refuses_a_heartbeat_that_is_not_a_positive_number():
    import mpimap

    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="heartbeat must be a positive number of seconds"):
            mpimap.Pool(heartbeat=bad)
