"""Core benchmark: mpimap against what a user would write by hand, side by side in one run.

Driver (what to run):   python benchmarks/bench_core.py [--rounds 3] [--quick]
It launches every configuration, round-robin over rounds (this machine is noisy: compare within one
run only), and prints medians, the ratios the performance targets are about (each ratio is the
median of per-round ratios, so both sides of a ratio ran minutes apart at most) and whether each
target is met.  The figures in docs/performance.rst come from it.

One configuration (what the driver launches):
    python bench_core.py --system serial --workload trivial             # list(map(f, xs))
    python bench_core.py --system ppe-submit --workload trivial         # ProcessPoolExecutor(2).submit
    mpiexec -n N python bench_core.py --system raw --workload trivial [--chunksize 1000]
    mpiexec -n N python -m mpi4py.futures bench_core.py --system futures --workload trivial
    mpiexec -n N python -m mpimap bench_core.py --system mpimap --workload trivial [--chunksize 1]
    mpiexec -n N python -m mpimap bench_core.py --system mpimap-submit --workload trivial
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
SEEDS = (1, 2, 3)


# -- workloads ----------------------------------------------------------------------------------------------------
def square(x):
    return x * x


def nap(seconds):
    """Sleep; return the time it really took (the in-task time that the ideal makespan is built from)."""
    t0 = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - t0


def skewed_points(n=2000, seed=7):
    """1 ms sleeps, 1% of them (at random places) 50 ms."""
    rng = random.Random(seed)
    return [0.05 if rng.random() < 0.01 else 0.001 for _ in range(n)]


def burn(loops):
    """Pure-Python CPU work (holds the GIL, like most user functions): ~1 ms per 30,000 loops here."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def workload(name, npoints, seed=7):
    if name == "trivial":
        return square, list(range(npoints))
    if name == "skewed":
        return nap, skewed_points(seed=seed)
    if name == "cpu1ms":  # 2,000 points of ~1 ms of CPU
        return burn, [30_000] * 2000
    if name == "cputail":  # heavy-tailed CPU work: ~1 ms points, 1% of them (random places) ~50 ms
        return burn, [int(s * 30_000_000) for s in skewed_points(seed=seed)]
    if name == "slow":  # the master's CPU while every worker sleeps through 50 ms points
        return nap, [0.05] * npoints
    raise ValueError(name)


# -- systems, each run inside mpiexec -------------------------------------------------------------------------------
def run_raw(fn, points, chunksize=1):
    """The anchor: master sends a chunk's first index, worker replies with the chunk's values as a list.

    Two chunks in flight per worker, blocking receives: what a user writes by hand with mpi4py.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    n = len(points)
    if rank > 0:
        while True:
            i = comm.recv(source=0)
            if i is None:
                return None
            if chunksize == 1:
                comm.send((i, fn(points[i])), dest=0)
            else:
                comm.send((i, [fn(points[j]) for j in range(i, min(i + chunksize, n))]), dest=0)
    results = [None] * n
    t0, cpu0 = time.perf_counter(), _cpu()
    nxt, status = 0, MPI.Status()
    for _ in range(2):
        for w in range(1, size):
            if nxt < n:
                comm.send(nxt, dest=w)
                nxt += chunksize
    for _ in range(-(-n // chunksize)):
        i, value = comm.recv(source=MPI.ANY_SOURCE, status=status)
        if chunksize == 1:
            results[i] = value
        else:
            results[i:i + len(value)] = value
        if nxt < n:
            comm.send(nxt, dest=status.Get_source())
            nxt += chunksize
    elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    for w in range(1, size):
        comm.send(None, dest=w)
    return elapsed, cpu, results


def run_serial(fn, points):
    """The in-process reference: ``list(map(f, xs))``."""
    list(map(fn, points[:20]))
    t0, cpu0 = time.perf_counter(), _cpu()
    results = list(map(fn, points))
    return time.perf_counter() - t0, _cpu() - cpu0, results


def run_ppe_submit(fn, points):
    """``ProcessPoolExecutor(2).submit`` once per point, then every result."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        [f.result() for f in [pool.submit(fn, p) for p in points[:20]]]
        t0, cpu0 = time.perf_counter(), _cpu()
        results = [f.result() for f in [pool.submit(fn, p) for p in points]]
        return time.perf_counter() - t0, _cpu() - cpu0, results


def run_mpimap_submit(fn, points):
    """``Pool.submit`` once per point, then every result."""
    import mpimap

    with mpimap.Pool() as pool:
        [f.result() for f in [pool.submit(fn, p) for p in points[:20]]]
        t0, cpu0 = time.perf_counter(), _cpu()
        results = [f.result() for f in [pool.submit(fn, p) for p in points]]
        return time.perf_counter() - t0, _cpu() - cpu0, results


def run_futures(fn, points):
    from mpi4py.futures import MPIPoolExecutor

    with MPIPoolExecutor() as pool:
        list(pool.map(fn, points[:20]))  # warm-up, as for every system
        t0, cpu0 = time.perf_counter(), _cpu()
        results = list(pool.map(fn, points))
        return time.perf_counter() - t0, _cpu() - cpu0, results


def run_mpimap(fn, points, chunksize=None):
    import mpimap

    with mpimap.Pool() as pool:
        list(pool.map(fn, points[:20]))
        t0, cpu0 = time.perf_counter(), _cpu()
        results = list(pool.map(fn, points, chunksize=chunksize))
        return time.perf_counter() - t0, _cpu() - cpu0, results


def _cpu():
    """CPU seconds of this process (all its threads: for mpimap, the master thread too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_configuration(args):
    fn, points = workload(args.workload, args.points, args.seed)
    chunksize = None if args.chunksize == 0 else args.chunksize
    if args.system == "raw":
        out = run_raw(fn, points, chunksize or 1)
        if out is None:  # a worker rank
            return
    elif args.system == "futures":
        out = run_futures(fn, points)
    elif args.system == "serial":
        out = run_serial(fn, points)
    elif args.system == "ppe-submit":
        out = run_ppe_submit(fn, points)
    elif args.system == "mpimap-submit":
        out = run_mpimap_submit(fn, points)
    else:
        out = run_mpimap(fn, points, chunksize)
    elapsed, master_cpu, results = out
    if args.workload == "trivial":
        assert results == [fn(p) for p in points]
    elif args.workload in ("cpu1ms", "cputail"):
        assert results == [(p - 1) * p * (2 * p - 1) // 6 for p in points]  # burn(p), in closed form
    print("BENCH " + json.dumps(dict(elapsed=elapsed, points=len(results), master_cpu=master_cpu,
                                     work=sum(results) if args.workload in ("skewed", "slow") else None)),
          flush=True)


# -- the driver -----------------------------------------------------------------------------------------------------
def launch(command, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    result = json.loads(line[6:]) if line else {}
    result["wall"] = wall
    return result


def configurations(quick):
    """(label, command) for every configuration of the matrix."""
    n_bulk = 300_000 if quick else 1_000_000
    n_one = 10_000 if quick else 30_000
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    py = sys.executable
    here = [py, HERE]
    yield "trivial serial", here + ["--system", "serial", "--workload", "trivial", "--points", str(n_bulk)]
    yield "submit ppe", here + ["--system", "ppe-submit", "--workload", "trivial", "--points", str(n_one)]
    for n in (2, 3):
        base = [mpiexec, "-n", str(n), py]
        mpimap = base + ["-m", "mpimap", HERE, "--workload", "trivial"]
        raw = base + [HERE, "--system", "raw", "--workload", "trivial"]
        yield f"bulk raw n{n}", raw + ["--points", str(n_bulk), "--chunksize", "1000"]
        yield f"bulk mpimap n{n}", mpimap + ["--system", "mpimap", "--points", str(n_bulk)]
        yield f"one raw n{n}", raw + ["--points", str(n_one)]
        yield f"one mpimap n{n}", mpimap + ["--system", "mpimap", "--points", str(n_one), "--chunksize", "1"]
        yield f"submit mpimap n{n}", mpimap + ["--system", "mpimap-submit", "--points", str(n_one)]
        # mpi4py.futures at its default chunksize 1 manages ~2k points/s: time 5k points (its rate is flat)
        yield f"one futures n{n}", base + ["-m", "mpi4py.futures", HERE, "--system", "futures",
                                           "--workload", "trivial", "--points", "5000"]
    base = [mpiexec, "-n", "3", py]
    for cpu in ("cpu1ms", "cputail"):
        yield f"{cpu} serial", here + ["--system", "serial", "--workload", cpu]
        yield f"{cpu} mpimap n3", base + ["-m", "mpimap", HERE, "--system", "mpimap", "--workload", cpu]
    for seed in SEEDS:  # where the slow points fall decides how lucky static chunking is
        skewed = ["--workload", "skewed", "--seed", str(seed)]
        yield f"skewed mpimap n3 {seed}", base + ["-m", "mpimap", HERE, "--system", "mpimap", *skewed]
        yield f"skewed static n3 {seed}", base + ["-m", "mpimap", HERE, "--system", "mpimap", *skewed,
                                                  "--chunksize", "1000"]
        yield f"skewed raw n3 {seed}", base + [HERE, "--system", "raw", *skewed]
    yield "slow mpimap n3", base + ["-m", "mpimap", HERE, "--system", "mpimap", "--workload", "slow",
                                    "--points", "100"]


def store_configurations(quick, workdir):
    """The CLI with its HDF5 store against the same map through the Python API, no store."""
    n = 50_000 if quick else 200_000
    np.save(os.path.join(workdir, "points.npy"), np.arange(n, dtype=float))
    script = os.path.join(workdir, "nostore.py")
    with open(script, "w") as f:
        f.write("import numpy as np, mpimap, bench_core, time\n"
                "if __name__ == '__main__':\n"
                "    pts = np.load('points.npy')\n"
                "    with mpimap.Pool() as pool:\n"
                "        t0 = time.perf_counter()\n"
                "        r = list(pool.imap_chunks(bench_core.square, pts, isolation='process'))\n"
                "        print('BENCH {\"elapsed\": %f}' % (time.perf_counter() - t0))\n")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    for n_ranks in (2, 3):
        base = [mpiexec, "-n", str(n_ranks), sys.executable, "-m", "mpimap"]
        yield f"cli-store n{n_ranks}", base + ["run", "bench_core:square", "--points", "points.npy", "--out",
                                                "r.h5", "--fresh"]
        yield f"api-nostore n{n_ranks}", base + [script]


def drive(args):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    workdir = tempfile.mkdtemp(prefix="mpimap-bench-")
    matrix = list(configurations(args.quick)) + list(store_configurations(args.quick, workdir))
    results = {label: [] for label, _ in matrix}
    for r in range(args.rounds):
        order = matrix[r % len(matrix):] + matrix[:r % len(matrix)]  # rotate: nobody always runs first
        for label, command in order:
            cwd = os.getcwd()
            os.chdir(workdir)
            try:
                results[label].append(launch(command, env))
            finally:
                os.chdir(cwd)
            print(f"round {r + 1}/{args.rounds}: {label}: {results[label][-1]}", file=sys.stderr, flush=True)

    def med(label, key):
        return statistics.median(x[key] for x in results[label])

    def rate(label):
        return statistics.median(x["points"] / x["elapsed"] for x in results[label])

    def ratio(label, anchor):
        """Median over rounds of the rate ratio measured side by side within each round."""
        return statistics.median(x["points"] / x["elapsed"] / (y["points"] / y["elapsed"])
                                 for x, y in zip(results[label], results[anchor]))

    def mark(ok):
        return "met" if ok else "NOT met"

    print(f"\n{args.rounds} rounds, medians (ratios: median of the per-round ratios); "
          f"commands: see benchmarks/bench_core.py --help\n")
    serial = rate("trivial serial")
    for n in (2, 3):
        bulk = ratio(f"bulk mpimap n{n}", f"bulk raw n{n}")
        half = ratio(f"bulk mpimap n{n}", "trivial serial")
        print(f"-n {n} Pool.map defaults, x*x: {rate(f'bulk mpimap n{n}'):,.0f}/s; hand-written loop, chunks of 1000: "
              f"{rate(f'bulk raw n{n}'):,.0f}/s; list(map) in one process {serial:,.0f}/s -> {bulk:.2f}x the loop "
              f"(target >= 0.6: {mark(bulk >= 0.6)}), {half:.2f}x list(map) (aim 0.5)")
    n3 = ratio("bulk mpimap n3", "bulk mpimap n2")
    print(f"-n 3 / -n 2, Pool.map defaults: {n3:.2f}x (target >= 1: {mark(n3 >= 1)})")
    for n in (2, 3):
        one = ratio(f"one mpimap n{n}", f"one raw n{n}")
        print(f"-n {n} Pool.map(chunksize=1): {rate(f'one mpimap n{n}'):,.0f}/s; hand-written loop, one point per "
              f"message, 2 in flight: {rate(f'one raw n{n}'):,.0f}/s; mpi4py.futures {rate(f'one futures n{n}'):,.0f}/s "
              f"-> {one:.2f}x the loop (target >= 0.5: {mark(one >= 0.5)})")
    for n in (2, 3):
        sub = ratio(f"submit mpimap n{n}", "submit ppe")
        print(f"-n {n} Pool.submit per call: {rate(f'submit mpimap n{n}'):,.0f}/s; ProcessPoolExecutor(2).submit "
              f"{rate('submit ppe'):,.0f}/s -> {sub:.2f}x (target >= 1: {mark(sub >= 1)})")
    for cpu, what in (("cpu1ms", "2,000 points of ~1 ms CPU"), ("cputail", "heavy-tailed CPU (1% of points 50x)")):
        eff = statistics.median(s["elapsed"] / (2 * m["elapsed"])
                                for s, m in zip(results[f"{cpu} serial"], results[f"{cpu} mpimap n3"]))
        print(f"-n 3 efficiency, {what}: serial time / (2 workers x makespan) = {eff:.3f} "
              f"(target >= 0.95: {mark(eff >= 0.95)})")
    for system in ("mpimap", "static", "raw"):
        ratios = {seed: [x["elapsed"] / (x["work"] / 2) for x in results[f"skewed {system} n3 {seed}"]]
                  for seed in SEEDS}
        detail = ", ".join(f"seed {seed}: {statistics.median(r):.3f}" for seed, r in ratios.items())
        medians = [statistics.median(r) for r in ratios.values()]
        target = (f" (target median <= 1.03, worst placement <= 1.05: "
                  f"{mark(statistics.median(medians) <= 1.03 and max(medians) <= 1.05)})" if system == "mpimap" else "")
        print(f"skewed 2000 sleeps, -n 3, {system}: makespan/ideal median "
              f"{statistics.median(medians):.3f}, worst placement {max(medians):.3f} ({detail}){target}")
    slow = results["slow mpimap n3"]
    share = statistics.median(x['master_cpu'] / x['elapsed'] for x in slow)
    print(f"master CPU while workers sleep (100 x 50 ms, -n 3): {share * 100:.1f}% of a core "
          f"(target <= 2%: {mark(share <= 0.02)})")
    for n in (2, 3):
        store, nostore = med(f"cli-store n{n}", "wall"), med(f"api-nostore n{n}", "wall")
        print(f"{'50k' if args.quick else '200k'} scalar results, -n {n}: CLI with HDF5 store {store:.2f} s, "
              f"same map without store {nostore:.2f} s (whole mpiexec commands) -> {store / nostore:.2f}x "
              f"(target <= 1.3: {mark(store / nostore <= 1.3)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=["raw", "futures", "mpimap", "serial", "ppe-submit", "mpimap-submit"])
    parser.add_argument("--workload", default="trivial")
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7, help="placement of the slow points (skewed workload)")
    parser.add_argument("--chunksize", type=int, default=0, help="mpimap chunksize (0: automatic); raw loop: points per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller trivial runs")
    args = parser.parse_args()
    if args.system:
        one_configuration(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
