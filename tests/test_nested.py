"""Nested maps: tasks that map, submit and wait on the pool they run in (``mpimap.current_pool()``)."""

from pathlib import Path

import pytest

import mpimap
from conftest import job_env

TREE = '''
import os, sys, time
import mpimap
from jobfuncs import square

def tree(depth, width):
    """The number of leaves under a node of a tree ``depth`` levels deep, each level one nested map."""
    if depth == 0:
        return 1
    return sum(mpimap.current_pool().map(tree, [depth - 1] * width, [width] * width))

def outer_task(depth, width):
    """A top-level task: its pid (which rank ran it) and its subtree's leaves."""
    return os.getpid(), tree(depth, width)
'''


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("depth", [2, 3])
def test_recursion_with_every_worker_waiting_gives_the_serial_result(run_script, ranks, depth):
    """Four top-level tasks, two per worker (prefetch): every worker holds only waiting tasks at once, and still
    the inner maps run (on the waiting ranks themselves) and every result is right."""
    stdout = run_script(TREE + f'''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        out = list(pool.map(outer_task, [{depth}] * 4, [3] * 4, chunksize=1))
        workers = {{row["pid"] for row in pool.status()}}
        print("LEAVES", [n for _, n in out])
        print("OUTER RANKS", {{pid for pid, _ in out}} == workers, len(workers))
''', ranks=ranks, timeout=240)
    assert f"LEAVES {[3 ** depth] * 4}" in stdout
    assert f"OUTER RANKS True {ranks - 1}" in stdout  # top-level tasks ran, and waited, on every worker


def test_nested_maps_inside_an_mpi_program_with_pool_comm(run_script):
    stdout = run_script(TREE + '''
from mpi4py import MPI

with mpimap.Pool(MPI.COMM_WORLD) as pool:
    if pool is not None:
        print("LEAVES", list(pool.map(tree, [2, 3], [2, 2])))
''', ranks=2, plain=True)
    assert "LEAVES [4, 8]" in stdout


def test_submit_and_imap_unordered_on_the_current_pool(run_script):
    stdout = run_script(TREE + '''
def fan_out(n):
    pool = mpimap.current_pool()
    futures = [pool.submit(pow, 2, k) for k in range(n)]
    unordered = sorted(pool.imap_unordered(square, range(n)))
    indexed = sorted(pool.imap_unordered(square, range(n), indexed=True))
    return [f.result() for f in futures], unordered, indexed[-1], list(pool.map(square, []))

def patient(x):
    """A timeout on a nested future leaves the call running, as concurrent.futures does."""
    future = mpimap.current_pool().submit(slow_square, x)
    try:
        future.result(timeout=0.01)
    except TimeoutError:
        return "timeout", future.result(timeout=60), future.done()

def slow_square(x):
    time.sleep(0.5)
    return x * x

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        assert mpimap.current_pool() is pool  # on rank 0: the pool itself
        print("FAN", list(pool.map(fan_out, [4, 2])))
        print("PATIENT", list(pool.map(patient, [3])))
''', ranks=3)
    assert "FAN [([1, 2, 4, 8], [0, 1, 4, 9], (3, 9), []), ([1, 2], [0, 1], (1, 1), [])]" in stdout
    assert "PATIENT [('timeout', 9, True)]" in stdout


def test_an_inner_point_exception_reaches_the_outer_task_and_the_caller(run_script):
    stdout = run_script('''
import mpimap

def inner(x):
    if x == 3:
        raise ValueError(f"inner point {x} failed")
    return x

def outer(n):
    return sum(mpimap.current_pool().map(inner, range(n)))

def outer_catches(n):
    try:
        return sum(mpimap.current_pool().map(inner, range(n)))
    except ValueError as exc:
        return f"caught {type(exc).__name__}: {exc}"

def outer_submits(n):
    future = mpimap.current_pool().submit(inner, n)
    return repr(future.exception())

def outer_records(n):
    return sorted(map(str, mpimap.current_pool().imap_unordered(inner, range(n), on_error="record")))

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        print("CAUGHT", list(pool.map(outer_catches, [2, 5])))
        try:
            list(pool.map(outer, [5]))
        except ValueError as exc:
            print("RAISED", exc)
        print("SUBMIT", list(pool.map(outer_submits, [3, 1])))
        print("RECORD", list(pool.map(outer_records, [5])))
        print("AFTER", list(pool.map(outer, [3])))
''', ranks=3)
    assert "CAUGHT [1, 'caught ValueError: inner point 3 failed']" in stdout
    assert "RAISED inner point 3 failed" in stdout
    assert "SUBMIT [\"ValueError('inner point 3 failed')\", 'None']" in stdout
    assert "RECORD [['0', '1', '2', '4', 'inner point 3 failed']]" in stdout
    assert "AFTER [3]" in stdout


MARKS = '''
import os, time
import mpimap

def mark(x):
    """A slow inner point that leaves a file behind: the test counts how many ran."""
    open(os.path.join("marks", f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "x").close()
    time.sleep(0.1)
    return x

def marks():
    return len(os.listdir("marks"))

def outer(k):
    return sum(mpimap.current_pool().map(mark, range(100 * k, 100 * k + 100)))

def abandon(k):
    pool = mpimap.current_pool()
    futures = [pool.submit(mark, 1000 + i) for i in range(30)]
    raise RuntimeError("the outer task gives up")
'''


def test_cancelling_an_outer_map_cancels_its_inner_maps(run_script):
    stdout = run_script(MARKS + '''
if __name__ == "__main__":
    from concurrent.futures import CancelledError
    from jobfuncs import square
    os.mkdir("marks")
    with mpimap.Pool() as pool:
        results = pool.map(outer, [1, 2], chunksize=1)
        deadline = time.monotonic() + 60
        while marks() < 4 and time.monotonic() < deadline:  # the inner maps run
            time.sleep(0.05)
        pool.cancel_all()
        try:
            list(results)
        except CancelledError:
            print("CANCELLED")
        time.sleep(2.0)  # a point running at the cancel finishes (0.1 s); nothing starts after it
        settled = marks()
        time.sleep(3.0)  # 200 inner points of 0.1 s on 2 ranks: had they gone on, 30 more would be done by now
        print("MARKS", settled, marks(), settled < 200)
        print("AFTER", list(pool.map(square, range(5))))
''', ranks=3, timeout=180)
    assert "CANCELLED" in stdout
    settled, later, fewer = stdout.split("MARKS ")[1].split()[:3]
    assert settled == later and fewer == "True"
    assert "AFTER [0, 1, 4, 9, 16]" in stdout


def test_an_outer_point_that_fails_cancels_the_inner_work_it_left_open(run_script):
    """The failed point's map stays open (another point sleeps): its task's chunk coming back is what cancels."""
    stdout = run_script(MARKS + '''
def abandon_or_sleep(k):
    if k == 0:
        abandon(k)
    time.sleep(5.0)  # 30 calls of 0.1 s on the other rank: 3 s, had they not been cancelled
    return "slept"

if __name__ == "__main__":
    os.mkdir("marks")
    with mpimap.Pool() as pool:
        out = list(pool.map(abandon_or_sleep, [0, 1], chunksize=1, on_error="record"))
        print("OUT", [str(x) for x in out])
        print("MARKS", marks())
''', ranks=3, timeout=120)
    assert "OUT ['the outer task gives up', 'slept']" in stdout
    assert int(stdout.split("MARKS ")[1].split()[0]) < 10


def test_a_pause_lets_the_waiting_tasks_finish_their_nested_maps_and_holds_top_level_work(run_script):
    """What the walltime guard relies on: after pause(), the points being evaluated finish (their nested maps
    still run) and drained() comes; a top-level map waits for the resume."""
    stdout = run_script(MARKS + '''
def top(x):
    open(os.path.join("marks", f"top-{x}"), "x").close()
    return x

if __name__ == "__main__":
    os.mkdir("marks")
    with mpimap.Pool() as pool:
        results = pool.map(outer, [1, 2], chunksize=1)
        deadline = time.monotonic() + 60
        while marks() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        pool.pause()
        later = pool.map(top, range(3))
        while not pool.drained() and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        drained = pool.drained()
        time.sleep(0.5)
        print("HELD", sum(name.startswith("top-") for name in os.listdir("marks")), flush=True)
        if not drained:
            pool.resume()  # to end the script
        print("DRAINED", drained, list(results) == [sum(range(100, 200)), sum(range(200, 300))])
        pool.resume()
        print("LATER", list(later))
''', ranks=3, timeout=240)
    assert "DRAINED True True" in stdout
    assert "HELD 0" in stdout
    assert "LATER [0, 1, 2]" in stdout


def test_a_lost_rank_waiting_on_inner_maps_has_its_outer_task_run_again_elsewhere(run_script):
    """Its outer chunk is requeued, and the inner map its task was waiting on is cancelled, not finished for nobody."""
    proc = run_script('''
import os, signal, time
import mpimap

def slow(parent, x):
    open(os.path.join("marks", f"{parent}-{x}"), "a").close()  # requeued from the lost rank: once more
    time.sleep(0.02)
    return x * x

def outer(k):
    with open(f"outer-{k}.pid", "w") as f:
        f.write(str(os.getpid()))
    n = 300  # 6 s of inner work: far longer than it takes to declare a rank lost
    return sum(mpimap.current_pool().map(slow, [os.getpid()] * n, range(n)))

if __name__ == "__main__":
    os.mkdir("marks")
    with mpimap.Pool(rank_timeout=2.0) as pool:
        results = pool.map(outer, [0, 1], chunksize=1)
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"outer-{k}.pid") for k in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the inner maps are under way
        victim = int(open("outer-0.pid").read())
        os.kill(victim, signal.SIGSTOP)
        out = list(results)
        lost = [r["pid"] for r in pool.status() if r["lost"]]
        orphan = sum(name.startswith(f"{victim}-") for name in os.listdir("marks"))
        print("RESULT", out == [sum(x * x for x in range(300))] * 2, lost == [victim], orphan < 300, flush=True)
''', ranks=3, env=job_env(MPIMAP_HEARTBEAT=0.3), check=False, full=True, timeout=180)
    assert "RESULT True True True" in proc.stdout, proc.stdout + proc.stderr
    assert "declared lost" in proc.stderr
    assert proc.returncode == 4  # the map finished; the job ended with MPI_Abort because a rank was lost


def test_process_isolation_refuses_nested_maps_with_one_clear_error_but_inner_maps_may_use_it(run_script):
    stdout = run_script('''
import os
import mpimap
from jobfuncs import square

def outer(n):
    return sum(mpimap.current_pool().map(square, range(n)))

def from_a_thread(n):
    import threading
    errors = []

    def ask():
        try:
            mpimap.current_pool()
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join()
    return errors

def outer_with_isolated_inner(n):
    values = mpimap.current_pool().map(square, range(n), isolation="process", point_timeout=30)
    return sum(values)

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        try:
            list(pool.map(outer, [3], isolation="process"))
        except RuntimeError as exc:
            print("ERROR", exc)
        print("INNER", list(pool.map(outer_with_isolated_inner, [3, 4])))
        print("THREAD", pool.map(from_a_thread, [1]).__next__())
''', ranks=3)
    assert "ERROR mpimap.current_pool(): nested maps need isolation='rank'" in stdout
    assert "INNER [5, 14]" in stdout
    assert "THREAD ['mpimap.current_pool(): no pool here: call it inside a function mapped by a Pool (in the " \
        "thread that evaluates the point)" in stdout


def count_leaves(depth):
    if depth == 0:
        return 1
    return sum(mpimap.current_pool().map(count_leaves, [depth - 1] * 3))


def test_in_a_pool_of_one_process_nested_calls_run_in_place():
    with mpimap.Pool() as pool:
        assert mpimap.current_pool() is pool
        assert list(pool.map(count_leaves, [1, 2, 3])) == [3, 9, 27]
        assert pool.submit(count_leaves, 2).result(timeout=60) == 9
    with pytest.raises(RuntimeError, match="no pool here"):
        mpimap.current_pool()


def docs_example() -> str:
    """The runnable example of docs/nested.rst (the literal block after "Save as ``tree.py``")."""
    text = (Path(__file__).parent.parent / "docs" / "nested.rst").read_text()
    block = text.split("Save as ``tree.py``", 1)[1].split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


@pytest.mark.parametrize("ranks, plain", [(1, True), (3, False)])
def test_the_example_of_the_docs_runs_as_it_says(run_script, ranks, plain):
    stdout = run_script(docs_example(), ranks=ranks, plain=plain)
    assert stdout.splitlines() == ["[27, 27, 27, 27]", "[(2, 3), (4, 9)]"]
