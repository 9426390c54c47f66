"""Shared state benchmark: ``pool.share`` of a large array to 2 workers against a raw ``comm.Bcast`` of its bytes.

Driver (what to run):   python benchmarks/bench_share.py [--mb 500] [--rounds 3]
It launches every configuration at ``-n 3`` (2 workers), round-robin over rounds, and prints medians:
the time until every worker has read every page of the state, the ratio to ``Bcast``, and the memory
the processes of the job added for the state on their node (the growth of the sum of their
proportional set sizes, PSS: a shared page counts once in the sum), in units of the state's size.
The figures in docs/performance.rst come from it.

One configuration (what the driver launches):
    mpiexec -n 3 python bench_share.py --system bcast --mb 500
    mpiexec -n 3 python -m mpimap bench_share.py --system share --mb 500
    MPIMAP_HOST='node{rank}' mpiexec -n 3 python -m mpimap bench_share.py --system share --mb 500
        (every rank looks like a host of its own: the bytes travel to each rank; on one machine the master's
        file is already there, so no rank writes another)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
PAGE = 4096


def pss_mb() -> float:
    """This process's proportional set size: shared pages count for a fraction, per process mapping them."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def touch(array) -> float:
    """Read every page of the array (what a model does with its data), return a checksum."""
    flat = array.reshape(-1).view(np.uint8)
    return float(flat[PAGE - 1::PAGE].sum())


def on_worker(args):
    handle, meeting = args
    before = pss_mb()
    checksum = touch(handle.value)
    after = pss_mb() - before
    done = time.time()
    # Wait for the other worker to have read it too (so neither point is copied to the other rank as a straggler).
    open(os.path.join(meeting, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(meeting)) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    return os.getpid(), checksum, after, done


def state(mb: int) -> np.ndarray:
    return np.ones(mb * 2 ** 20 // 8)


def run_share(mb: int) -> dict:
    import mpimap

    with mpimap.Pool() as pool:
        before = pss_mb()
        array = state(mb)
        list(pool.map(abs, range(4)))  # the workers are up and have said hello
        with tempfile.TemporaryDirectory() as meeting:
            t0 = time.time()
            handle = pool.share(array)
            shared = time.time() - t0
            rows = list(pool.map(on_worker, [(handle, meeting)] * 2, chunksize=1))
        total = max(done for _, _, _, done in rows) - t0
        assert len({pid for pid, _, _, _ in rows}) == 2, f"both points ran on one worker: {rows}"
        assert all(checksum == touch(array) for _, checksum, _, _ in rows)
        node = pss_mb() - before + sum(p for _, _, p, _ in rows)
    return dict(seconds=total, share_call=shared, node_mb=node)


def run_bcast(mb: int) -> dict:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    before = pss_mb()
    array = state(mb) if rank == 0 else np.empty(mb * 2 ** 20 // 8)
    comm.Barrier()
    t0 = time.perf_counter()
    comm.Bcast([array, MPI.BYTE], root=0)
    touch(array)
    comm.Barrier()
    seconds = time.perf_counter() - t0
    node = comm.reduce(pss_mb() - before, root=0)
    t0 = time.perf_counter()  # again, into pages already there: the transfer alone
    comm.Bcast([array, MPI.BYTE], root=0)
    touch(array)
    comm.Barrier()
    again = time.perf_counter() - t0
    return dict(seconds=seconds, again=again, node_mb=node) if rank == 0 else {}


CONFIGS = {
    "bcast": ([], {}),
    "share, one host": (["-m", "mpimap"], {}),
    "share, a host per rank": (["-m", "mpimap"], {"MPIMAP_HOST": "node{rank}"}),
}


def drive(mb: int, rounds: int) -> None:
    from mpimap.launch import find_mpiexec

    results: dict[str, list] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, (prefix, env) in CONFIGS.items():
            system = "bcast" if name == "bcast" else "share"
            command = [find_mpiexec(), "-n", "3", sys.executable, *prefix, HERE, "--system", system, "--mb", str(mb)]
            out = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{name} failed:\n{out.stdout}\n{out.stderr}")
            results[name].append(json.loads(line[-1][7:]))
    base = statistics.median(r["seconds"] for r in results["bcast"])
    warm = statistics.median(r["again"] for r in results["bcast"])
    print(f"{mb} MB of state to 2 workers (-n 3), median of {rounds} rounds; node memory = growth of the sum of PSS of "
          "the job's processes, in units of the state")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        memory = statistics.median(r["node_mb"] for r in runs) / mb
        extra = ""
        if name == "bcast":
            extra = f" (a second Bcast into the same, already resident, buffer: {warm:.2f} s)"
        else:
            call = statistics.median(r["share_call"] for r in runs)
            extra = (f" (share() itself {call:.2f} s) -> {seconds / base:.2f}x the first Bcast, "
                     f"{seconds / warm:.2f}x the second (target <= 2)")
        print(f"   {name}: {seconds:.2f} s until every worker read every page{extra}; node memory {memory:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=["share", "bcast"])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.system is None:
        drive(args.mb, args.rounds)
        return
    result = run_share(args.mb) if args.system == "share" else run_bcast(args.mb)
    if result:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
