"""Multi-rank tasks (``ranks_per_task=k``, ``mpimap.task_comm()``) under real mpiexec."""

import json

import numpy as np
import pytest
from conftest import mpimap_cli

import mpimap

# Functions of the k-rank tasks, written into each test's script (the workers import it).
FUNCTIONS = '''
import json, sys, time
import mpimap
from mpi4py import MPI

def weighted_sum(x):
    """Each task rank contributes x * (its task rank + 1): the Allreduce gives x * k (k + 1) / 2."""
    comm = mpimap.task_comm()
    total = comm.allreduce(x * (comm.Get_rank() + 1), op=MPI.SUM)
    members = tuple(comm.allgather(MPI.COMM_WORLD.Get_rank()))
    return total, comm.Get_size(), members

def square(x):
    return x * x, mpimap.task_comm().Get_size()

def fails_on_task_rank_1(x):
    """Point 3 fails on task rank 1 only, after the collective (the others return normally)."""
    comm = mpimap.task_comm()
    total = comm.allreduce(x, op=MPI.SUM)
    if x == 3 and comm.Get_rank() == 1:
        raise ValueError(f"point {x} failed on task rank 1")
    return total

def hangs_on_point_1(x):
    """Point 1: task rank 1 is late by 6 s, and task rank 0 waits for it in the Allreduce."""
    comm = mpimap.task_comm()
    if x == 1 and comm.Get_rank() == 1:
        time.sleep(6)
    return comm.allreduce(x, op=MPI.SUM)

def report(**out):
    print("RESULT " + json.dumps(out))
'''


def result_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_two_rank_tasks_on_five_ranks_allreduce_equals_serial(run_script):
    out = result_of(run_script(FUNCTIONS + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        results = list(pool.map(weighted_sum, range(40), ranks_per_task=2))
        report(totals=[t for t, _, _ in results], sizes=sorted({s for _, s, _ in results}),
               groups=sorted({tuple(m) for _, _, m in results}), status=[r["stuck"] for r in pool.status()])
''', ranks=5, timeout=180))
    assert out["totals"] == [3 * x for x in range(40)]  # x * 1 + x * 2, as a serial loop computes it
    assert out["sizes"] == [2]
    for members in out["groups"]:  # two distinct worker ranks, task rank 0 the lowest
        assert len(set(members)) == 2 and 0 not in members and list(members) == sorted(members)
    assert len(out["groups"]) >= 2  # 4 workers: more than one group formed
    assert out["status"] == [False] * 4


def test_one_rank_and_two_rank_maps_interleaved_in_one_pool(run_script):
    out = result_of(run_script(FUNCTIONS + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        wide = pool.imap_unordered(weighted_sum, range(30), ranks_per_task=2, indexed=True)
        narrow = pool.imap_unordered(square, range(30), indexed=True)
        a, b = {}, {}
        for (i, value), (j, other) in zip(wide, narrow):  # read both, turn about
            a[i], b[j] = value[0], other
        a.update((i, value[0]) for i, value in wide)
        b.update(narrow)
        again = list(pool.map(weighted_sum, range(5), ranks_per_task=2))
        report(wide=[a[i] for i in range(30)], narrow=[b[i] for i in range(30)], again=[t for t, _, _ in again])
'''))
    assert out["wide"] == [3 * x for x in range(30)]
    assert out["narrow"] == [[x * x, 1] for x in range(30)]  # a one-rank point's task_comm() is COMM_SELF
    assert out["again"] == [3 * x for x in range(5)]


def test_a_failing_k_rank_point_fails_alone_with_its_exception(run_script):
    out = result_of(run_script(FUNCTIONS + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        recorded = list(pool.map(fails_on_task_rank_1, range(6), ranks_per_task=2, on_error="record"))
        try:
            list(pool.map(fails_on_task_rank_1, range(6), ranks_per_task=2))
            raised = None
        except ValueError as exc:
            raised = str(exc)
        after = list(pool.map(weighted_sum, range(4), ranks_per_task=2))
        report(recorded=[repr(v) if isinstance(v, Exception) else v for v in recorded], raised=raised,
               after=[t for t, _, _ in after])
'''))
    assert out["recorded"] == [0, 2, 4, "ValueError('point 3 failed on task rank 1')", 8, 10]
    assert out["raised"] == "point 3 failed on task rank 1"
    assert out["after"] == [0, 3, 6, 9]  # the pool serves on, both ranks free


def test_a_hung_k_rank_point_times_out_and_its_ranks_come_back(run_script):
    proc = run_script(FUNCTIONS + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        t0 = time.monotonic()
        out = list(pool.map(hangs_on_point_1, range(4), ranks_per_task=2, point_timeout=1.5, quarantine=1,
                            on_error="record"))
        report(values=[type(v).__name__ if isinstance(v, Exception) else v for v in out],
               seconds=time.monotonic() - t0, status=[r["stuck"] for r in pool.status()])
''', full=True, timeout=180)
    out = result_of(proc.stdout)
    assert out["values"] == [0, "PointTimeout", 4, 6]
    assert out["seconds"] >= 5  # points 2 and 3 waited for the hung ranks: they were not given other work
    assert out["status"] == [False, False]
    assert "timed out after 1.5 s: ranks [1, 2] get no work until they return" in proc.stderr


def test_too_many_ranks_per_task_fails_the_map_with_one_clear_error(run_script):
    out = result_of(run_script(FUNCTIONS + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        try:
            list(pool.map(weighted_sum, range(3), ranks_per_task=3))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        try:
            pool.map(weighted_sum, range(3), ranks_per_task=2, isolation="process")
        except ValueError as exc:
            isolation = str(exc)
        child = pool.map(square, [1], isolation="process", on_error="record")  # not an MPI process: no task_comm
        report(error=error, isolation=isolation, after=[t for t, _, _ in pool.map(weighted_sum, [5], ranks_per_task=2)],
               child=repr(next(child)))
'''))
    assert out["error"].startswith("ValueError: ranks_per_task=3 asks for more worker ranks than the pool has (2 live)")
    assert "needs isolation='rank'" in out["isolation"]
    assert out["after"] == [15]
    assert out["child"].startswith("RuntimeError(\"mpimap.task_comm() is only available inside a point's function")


def test_task_comm_in_a_single_process_pool_and_outside_a_task():
    with pytest.raises(RuntimeError, match="only available inside a point's function"):
        mpimap.task_comm()
    with mpimap.Pool() as pool:
        assert list(pool.map(_comm_size, range(3))) == [1, 1, 1]  # one rank: COMM_SELF
        with pytest.raises(ValueError, match="more worker ranks than the pool has"):
            list(pool.map(_comm_size, range(3), ranks_per_task=2))
        with pytest.raises(ValueError, match="ranks_per_task must be a positive integer"):
            pool.map(_comm_size, range(3), ranks_per_task=0)
        with pytest.raises(ValueError, match="chunksize=4 cannot be used with ranks_per_task=2"):
            pool.map(_comm_size, range(3), ranks_per_task=2, chunksize=4)


def _comm_size(x):
    return mpimap.task_comm().Get_size()


SOLVER = '''
from mpi4py import MPI
import mpimap

def solve(x):
    """x summed over the task's ranks, each adding its task rank: k x + k (k - 1) / 2."""
    comm = mpimap.task_comm()
    return float(comm.allreduce(float(x) + comm.Get_rank(), op=MPI.SUM))
'''


def test_cli_run_with_ranks_per_task_stores_what_a_serial_loop_computes(tmp_path):
    (tmp_path / "solver.py").write_text(SOLVER)
    np.save(tmp_path / "p.npy", np.arange(12.0))
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(3, "run", "solver.py:solve", "--points", "p.npy", "--out", out, "--ranks-per-task", "2",
                      "--isolation", "rank", cwd=tmp_path, timeout=180)
    assert "12 of 12" in proc.stdout
    results = mpimap.load(out, as_frame=False)
    assert np.array_equal(results["values"], 2 * np.arange(12.0) + 1)  # k x + 1 for k = 2
    assert set(results["status"]) == {"done"}


def test_cli_ranks_per_task_without_rank_isolation_is_one_line(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(3.0))
    proc = mpimap_cli(2, "run", "solver.py:solve", "--points", "p.npy", "--out", "r.h5", "--ranks-per-task", "2",
                      cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mpimap: error: run option ranks_per_task=2 needs isolation rank (--isolation rank): a point's ranks share "
        "an MPI communicator, and evaluation processes are not MPI processes"]
    assert not (tmp_path / "r.h5").exists()


def test_cli_ranks_per_task_wider_than_the_pool_is_one_line(tmp_path):
    (tmp_path / "solver.py").write_text(SOLVER)
    np.save(tmp_path / "p.npy", np.arange(3.0))
    proc = mpimap_cli(3, "run", "solver.py:solve", "--points", "p.npy", "--out", "r.h5", "--ranks-per-task", "3",
                      "--isolation", "rank", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mpimap: error: run option ranks_per_task=3 asks for more worker ranks than the pool has (2 live): use "
        "ranks_per_task <= 2, or start more ranks (mpiexec -n 4 or more)"]
    assert not (tmp_path / "r.h5").exists()


def test_a_member_that_raises_before_a_collective_leaves_its_partner_stuck_and_out_of_work(run_script):
    """The documented limit: MPI cannot interrupt the partner's Allreduce.  The point fails at once with the
    exception, the partner is shown as stuck and gets no work (one-rank points go to the other rank); at the
    end it counts as lost: the job ends with exit status 4 instead of waiting for it for ever."""
    proc = run_script(FUNCTIONS + '''
def raises_before_the_collective(x):
    comm = mpimap.task_comm()
    if x == 1 and comm.Get_rank() == 1:
        raise ValueError("task rank 1 gave up")
    return comm.allreduce(x, op=MPI.SUM)

def where(x):
    return MPI.COMM_WORLD.Get_rank()

if __name__ == "__main__":
    pool = mpimap.Pool()
    out = list(pool.map(raises_before_the_collective, range(2), ranks_per_task=2, on_error="record"))
    stuck = [r["rank"] for r in pool.status() if r["stuck"]]
    ranks = sorted(set(pool.map(where, range(20))))
    print("RESULT " + json.dumps(dict(out=[repr(v) for v in out], stuck=stuck, ranks=ranks)), flush=True)
''', full=True, check=False, timeout=120)
    out = result_of(proc.stdout)
    assert out == {"out": ["0", "ValueError('task rank 1 gave up')"], "stuck": [1], "ranks": [2]}
    assert "point 1 failed on rank 2 of its 2-rank task; ranks [1] are still inside it" in proc.stderr
    assert "ranks [1] are still inside k-rank tasks that ended without them" in proc.stderr
    assert proc.returncode == 4  # MPI_Abort (its line may be cut off by the launcher ending the job)


NESTING = '''
def square_plain(x):
    return x * x

def nests(n):
    return sum(mpimap.current_pool().map(square_plain, range(n)))

def outer_waits(n):
    time.sleep(1)  # the urgent 2-rank map arrives meanwhile and reserves this busy rank
    return sum(mpimap.current_pool().map(square_plain, range(n)))
'''


def test_a_k_rank_task_opening_a_nested_map_fails_with_one_clear_error_instead_of_hanging(run_script):
    out = result_of(run_script(FUNCTIONS + NESTING + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        try:
            list(pool.map(nests, [10], ranks_per_task=2, timeout=60))
            raised = None
        except Exception as exc:
            raised = f"{type(exc).__name__}: {exc}"
        after = list(pool.map(nests, [10, 4], timeout=60))  # one-rank tasks still nest
        report(raised=raised, after=after)
''', timeout=180))
    assert out["raised"].startswith("RuntimeError: mpimap.current_pool(): a task of a map with ranks_per_task=2 "
                                    "cannot open nested maps")
    assert out["after"] == [285, 14]


def test_an_urgent_k_rank_map_reserving_ranks_whose_tasks_wait_for_nested_maps_does_not_deadlock(run_script):
    out = result_of(run_script(FUNCTIONS + NESTING + '''
if __name__ == "__main__":
    with mpimap.Pool() as pool:
        outer = pool.imap_unordered(outer_waits, [3, 4], timeout=90)
        time.sleep(0.3)
        wide = pool.imap_unordered(weighted_sum, [1, 2], ranks_per_task=2, priority=10, timeout=90)
        try:
            report(outer=sorted(outer), wide=sorted(t for t, _, _ in wide))
        except Exception as exc:
            report(error=repr(exc))
''', timeout=180))
    assert out == {"outer": [5, 14], "wide": [3, 6]}


def test_a_member_polling_while_its_peer_creates_the_task_communicator_leaves_the_peers_messages_alone(run_script):
    """The bug this guards against: Open MPI's ``MPI_Comm_create_group`` sends point-to-point messages with its tag
    on the parent communicator.  A worker that polled from any source took its peer's message and both hung in the
    call for ever (1 run in 5 of a 2-rank map under Open MPI).  Here rank 2 enters the call at once and rank 1 polls
    for a while first, as a worker does that has not yet received its task (Open MPI's first message of the call goes
    from the second member to the first)."""
    out = result_of(run_script('''
import json, time
from mpi4py import MPI
from mpimap.transport import Transport

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
if rank == 0:
    comm.Barrier()
else:
    transport = Transport(comm, source=0)
    if rank == 1:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert transport.poll() is None  # nothing comes from the master: a peer's message must not either
    task = transport.group_comm((1, 2))
    total, size = task.allreduce(rank, op=MPI.SUM), task.Get_size()
    transport.free_groups()
    comm.Barrier()
    if rank == 1:
        print("RESULT " + json.dumps(dict(total=total, size=size)), flush=True)
''', plain=True, timeout=60))
    assert out == {"total": 3, "size": 2}
