"""A worker rank survives what the user's points do to it: hung points that log, unpicklable values and
arguments, background threads that log, deaths at awkward moments; and script-mode classes travel both ways."""

import json
import subprocess
import sys

import pytest

from conftest import job_env


def run_python(tmp_path, source: str, timeout: float = 120) -> str:
    """Run ``source`` as a script in one process (no mpiexec); return its stdout."""
    path = tmp_path / "single.py"
    path.write_text(source)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def result_of(stdout: str):
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


CHATTY = '''
import logging, time
def stuck(x):  # a hung point that keeps logging, e.g. a retry loop against a dead resource
    while True:
        logging.getLogger("model").warning("still waiting for %s", x)
        time.sleep(0.005)
'''


def test_a_hung_point_that_logs_is_still_timed_out(tmp_path):
    stdout = run_python(tmp_path, CHATTY + '''
import json, os, mpimap
if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=open(os.devnull, "w"))
    pool = mpimap.Pool(isolation="process", point_timeout=1.0, on_error="record", quarantine=1)
    t0 = time.monotonic()
    try:
        out = [type(v).__name__ for v in pool.map(stuck, [0], timeout=40)]
    except TimeoutError:
        out = "map timed out"
    print("RESULT " + json.dumps([out, time.monotonic() - t0]), flush=True)
    pool.shutdown()
''')
    out, seconds = result_of(stdout)
    assert out == ["PointTimeout"]
    assert seconds < 30


def test_cancelling_a_hung_point_that_logs_frees_its_rank(run_script):
    stdout = run_script(CHATTY + '''
import json, mpimap
from mpi4py import MPI
def square(x):
    return x * x
if __name__ == "__main__":
    with mpimap.Pool(MPI.COMM_WORLD, isolation="process") as pool:
        if pool is not None:
            try:
                list(pool.map(stuck, [0], timeout=2))
            except TimeoutError:
                pass  # leaving the iterator cancels the map: the rank must kill the hung point
            try:
                out = list(pool.map(square, range(4), timeout=40))
            except TimeoutError:
                out = "the rank never came back"
            print("RESULT " + json.dumps(out), flush=True)
''', ranks=2, plain=True, timeout=150)
    assert result_of(stdout) == [0, 1, 4, 9]


UNPICKLABLE = '''
import json, threading, mpimap
class ExitOnPickle:
    def __reduce__(self):
        raise SystemExit("no pickling me")
def f(x):  # e.g. a value holding a lock or an open file
    return threading.Lock() if x == 1 else ExitOnPickle() if x == 2 else x * 10
def describe(values):
    return [type(v).__name__ if isinstance(v, BaseException) else v for v in values]
'''


def test_an_unpicklable_value_fails_its_point_only_in_the_rank(run_script):
    stdout = run_script(UNPICKLABLE + '''
from mpi4py import MPI
if __name__ == "__main__":
    with mpimap.Pool(MPI.COMM_WORLD, on_error="record", rank_timeout=20) as pool:
        if pool is not None:
            values = list(pool.map(f, range(5), chunksize=5, timeout=60))
            again = list(pool.map(f, [0, 3], timeout=60))
            print("RESULT " + json.dumps([describe(values), "pickle" in str(values[1]), again,
                                          [row["lost"] for row in pool.status()]]), flush=True)
''', ranks=2, plain=True, timeout=150)
    values, says_pickle, again, lost = result_of(stdout)
    assert values == [0, "TypeError", "SystemExit", 30, 40]
    assert says_pickle and again == [0, 30] and lost == [False]


def test_an_unpicklable_value_fails_its_point_only_in_the_evaluation_process(tmp_path):
    stdout = run_python(tmp_path, UNPICKLABLE + '''
if __name__ == "__main__":
    pool = mpimap.Pool(isolation="process", on_error="record", quarantine=1)
    values = list(pool.map(f, range(5), chunksize=5, timeout=60))
    print("RESULT " + json.dumps([describe(values), "pickle" in str(values[1])]), flush=True)
    pool.shutdown()
''')
    values, says_pickle = result_of(stdout)
    assert values == [0, "TypeError", "SystemExit", 30, 40]
    assert says_pickle


def test_a_background_thread_that_logs_does_not_corrupt_the_pipe(tmp_path):
    stdout = run_python(tmp_path, '''
import json, logging, os, threading, time
import numpy as np, mpimap
_started = []
def _chatter():  # a library's background thread that logs
    while True:
        logging.getLogger("lib.monitor").warning("heartbeat from a library thread " + "x" * 200)
        time.sleep(0.0002)
def f(x):
    if not _started:
        _started.append(threading.Thread(target=_chatter, daemon=True))
        _started[0].start()
    time.sleep(0.001)
    return np.full(4000, float(x))  # 32 kB per value: every batch is written in more than one piece
if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=open(os.devnull, "w"))
    pool = mpimap.Pool(isolation="process", on_error="record")
    try:
        out = [float(v[0]) if isinstance(v, np.ndarray) else repr(v) for v in pool.map(f, range(400), timeout=100)]
    except BaseException as exc:
        out = repr(exc)
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # the chatter thread is a daemon of the evaluation process; this process may leave at once
''', timeout=150)
    assert result_of(stdout) == [float(x) for x in range(400)]


def test_a_death_right_after_the_last_report_blames_no_point(tmp_path):
    stdout = run_python(tmp_path, '''
import json, os, time
import multiprocessing.connection as connection
import mpimap
def f(x):
    if x == 2:  # the evaluation process dies (think OOM killer) just after it has sent its results
        send = connection.Connection.send
        def send_then_die(self, obj):
            send(self, obj)
            os._exit(9)
        connection.Connection.send = send_then_die
    return x * 10
if __name__ == "__main__":
    pool = mpimap.Pool(isolation="process", on_error="record", quarantine=1)
    first = [v if isinstance(v, int) else repr(v) for v in pool.map(f, range(3), chunksize=3, timeout=60)]
    time.sleep(0.5)  # the dead process is noticed before the next chunk, which a new one evaluates
    second = list(pool.map(f, [4, 5], chunksize=2, timeout=60))
    print("RESULT " + json.dumps([first, second]), flush=True)
    pool.shutdown()
''')
    assert result_of(stdout) == [[0, 10, 20], [40, 50]]


def test_the_slot_read_never_pairs_a_position_with_another_points_start(tmp_path):
    stdout = run_python(tmp_path, '''
import json, os, time
from mpimap import isolation
slot = isolation.ChildProcess().slot
pid = os.fork()
if pid == 0:  # a writer as fast as the child's hot loop
    end = time.monotonic() + 1.5
    i = 0
    while time.monotonic() < end:
        i += 1
        isolation._write_slot(slot, i, float(i))
    os._exit(0)
reads = torn = 0
end = time.monotonic() + 1.0
while time.monotonic() < end:
    got = isolation._read_slot(slot)
    if got is not None:
        reads += 1
        torn += got[0] != got[1]
os.waitpid(pid, 0)
print("RESULT " + json.dumps([reads, torn]), flush=True)
''')
    reads, torn = result_of(stdout)
    assert reads > 1000 and torn == 0


SCRIPT_CLASSES = '''
import json, mpimap
from dataclasses import dataclass

@dataclass
class Point:  # defined in the script: __main__.Point on rank 0, __worker__.Point on the workers
    x: int

def wrap(x):
    return Point(x * 10)

def unwrap(p):
    return p.x + 1

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        back = list(pool.map(wrap, range(4), timeout=60))
        there = list(pool.map(unwrap, [Point(5), Point(6)], timeout=60))
    print("RESULT " + json.dumps([all(type(p) is Point for p in back), [p.x for p in back], there]), flush=True)
'''


def test_instances_of_a_script_class_travel_both_ways_in_script_mode(run_script):
    assert result_of(run_script(SCRIPT_CLASSES, ranks=2, timeout=150)) == [True, [0, 10, 20, 30], [6, 7]]


def _refuse_to_load():
    raise ValueError("cannot be loaded here")


class _Unloadable(int):
    """An int subclass (not a built-in scalar) that pickles but fails to unpickle."""

    def __reduce__(self):
        return _refuse_to_load, ()


@pytest.mark.parametrize("size", [1, 8, 9])
def test_short_chunks_of_plain_values_travel_whole_and_one_unloadable_point_still_fails_only_its_chunk(size):
    """Short lists of built-in scalars skip the pickle of their own; anything else in them still travels apart."""
    import numpy as np
    from mpimap.protocol import Result, Task, UnloadableArgs, decode, encode

    plain = [1, 2.5, "s", None, True, b"x", 3j, 10 ** 40, -0.0][:size] + [7] * max(0, size - 9)
    task = decode(*encode(Task(1, 2, None, plain)))
    assert task.args == plain and [type(a) for a in task.args] == [type(a) for a in plain]
    durations = np.arange(size, dtype=float) / 7
    result = decode(*encode(Result(1, plain, {}, durations, 0.5, {})))
    assert result.values == plain and result.durations.dtype == np.float64 and (result.durations == durations).all()

    mixed = plain[:-1] + [_Unloadable(3)]
    task = decode(*encode(Task(1, 2, None, mixed)))
    assert isinstance(task.args, UnloadableArgs) and len(task.args) == size
    result = decode(*encode(Result(1, mixed, {}, durations, 0.5, {})))
    assert result.values == [None] * size and set(result.failures) == set(range(size))


def test_arguments_that_fail_to_unpickle_on_the_worker_fail_their_points_only(run_script):
    stdout = run_script('''
import json, mpimap
from mpi4py import MPI
def explode(why):
    if MPI.COMM_WORLD.Get_rank() > 0:  # only the worker fails to load it
        raise SystemExit(why) if why == "exit" else ValueError(why)
    return why
class Bad:
    def __init__(self, why):
        self.why = why
    def __reduce__(self):
        return explode, (self.why,)
def f(x):
    return x if isinstance(x, int) else "loaded"
if __name__ == "__main__":
    with mpimap.Pool(MPI.COMM_WORLD, on_error="record", rank_timeout=20) as pool:
        if pool is not None:
            values = list(pool.map(f, [1, Bad("exit"), 3, Bad("value"), 5], chunksize=1, timeout=60))
            again = list(pool.map(f, [7, 8], timeout=60))
            print("RESULT " + json.dumps([[v if isinstance(v, int) else type(v).__name__ for v in values], again,
                                          [row["lost"] for row in pool.status()]]), flush=True)
''', ranks=2, plain=True, timeout=150)
    assert result_of(stdout) == [[1, "SystemExit", 3, "ValueError", 5], [7, 8], [False]]


@pytest.mark.parametrize("explicit", [False, True])
def test_mpimap_heartbeat_sets_the_period_of_pool_comm_workers(run_script, explicit):
    """MPIMAP_HEARTBEAT=30: 4 s into a 5 s point its rank has not been heard from for > 3 s, unless heartbeat= says 0.5."""
    heartbeat = ", heartbeat=0.5" if explicit else ""
    proc = run_script(f'''
import json, time, mpimap
from mpi4py import MPI
def slow(x):
    time.sleep(5)
    return x
if __name__ == "__main__":
    pool = mpimap.Pool(MPI.COMM_WORLD, rank_timeout=None{heartbeat})
    if pool.is_master:
        handle = pool.map(slow, [1], timeout=60)
        time.sleep(4)
        print("RESULT " + json.dumps([row["last_heard"] > 3 for row in pool.status()]), flush=True)
        list(handle)
        pool.shutdown()
''', ranks=2, plain=True, full=True, check=False, timeout=150, env=job_env(MPIMAP_HEARTBEAT=30))
    assert result_of(proc.stdout) == [not explicit]


def test_a_value_that_logs_while_it_is_pickled_does_not_block_the_evaluation_process(tmp_path):
    stdout = run_python(tmp_path, '''
import json, logging, os
import mpimap
class Chatty:
    def __init__(self, x):
        self.x = x
    def __reduce__(self):  # logs while its batch is pickled, under the pipe's lock
        logging.getLogger("model").warning("pickling %s", self.x)
        return Chatty, (self.x,)
def f(x):
    return Chatty(x)
if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=open(os.devnull, "w"))
    pool = mpimap.Pool(isolation="process", point_timeout=10, on_error="record", quarantine=1)
    print("RESULT " + json.dumps([v.x if isinstance(v, Chatty) else repr(v) for v in pool.map(f, range(3), timeout=60)]))
    pool.shutdown()
''')
    assert result_of(stdout) == [0, 1, 2]


def test_a_value_that_fails_to_unpickle_on_the_master_fails_its_chunk_not_the_master(run_script):
    stdout = run_script('''
import json, mpimap
from mpi4py import MPI
def explode():
    if MPI.COMM_WORLD.Get_rank() == 0:  # e.g. a class from a module only the workers can import
        raise ModuleNotFoundError("No module named 'only_on_workers'")
    return 1
class Odd:
    def __reduce__(self):
        return explode, ()
def f(x):
    return Odd() if x == 1 else x
if __name__ == "__main__":
    with mpimap.Pool(MPI.COMM_WORLD, on_error="record") as pool:
        if pool is not None:
            values = list(pool.map(f, range(3), chunksize=1, timeout=60))
            again = list(pool.map(f, [5, 6], timeout=60))
            print("RESULT " + json.dumps([[v if isinstance(v, int) else type(v).__name__ for v in values], again]),
                  flush=True)
''', ranks=2, plain=True, timeout=150)
    assert result_of(stdout) == [[0, "ModuleNotFoundError", 2], [5, 6]]
