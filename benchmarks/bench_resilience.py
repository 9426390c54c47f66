"""Resilience benchmark: the cost of each isolation level per point, and how fast a hung rank is detected.

Driver:   python benchmarks/bench_resilience.py [--rounds 3]
It launches ``mpiexec -n 2 python -m mpimap bench_resilience.py --case ...`` for every configuration,
round-robin over rounds, and prints medians.  Figures in docs/performance.rst come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def square(x):
    return x * x


def nap(x):
    time.sleep(0.001)
    return x


def isolation_case(isolation: str, workload: str, points: int):
    """Time one map at chunksize auto; return seconds per point."""
    import mpimap

    fn = square if workload == "trivial" else nap
    with mpimap.Pool() as pool:
        list(pool.map(fn, range(50), isolation=isolation))  # warm-up: starts the child if there is one
        t0 = time.perf_counter()
        out = list(pool.map(fn, range(points), isolation=isolation))
        elapsed = time.perf_counter() - t0
    assert out == [fn(x) for x in range(points)] if workload == "trivial" else len(out) == points
    return elapsed / points


def detection_case(timeout: float):
    """SIGSTOP rank 2 during a map; return seconds from the signal until the master declares it lost."""
    import mpimap

    with mpimap.Pool(rank_timeout=timeout) as pool:
        results = pool.map(nap, range(100000), chunksize=1)
        next(results)
        while any(r["pid"] is None for r in pool.status()):
            time.sleep(0.01)
        victim = next(r for r in pool.status() if r["rank"] == 2)
        os.kill(victim["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        while not any(r["lost"] for r in pool.status()):
            time.sleep(0.005)
        detected = time.monotonic() - t0
        results.close()
    return detected


def drive(rounds: int):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), MPIMAP_HEARTBEAT="0.25")
    configs = []
    for workload, points in (("trivial", 20000), ("sleep1ms", 1000)):
        for isolation in ("rank", "process", "fresh"):
            n = points if isolation != "fresh" else min(points, 1000)
            configs.append((f"{workload} {isolation}", ["-n", "2", sys.executable, "-m", "mpimap", HERE, "--case",
                                                        "isolation", "--isolation", isolation, "--workload",
                                                        workload, "--points", str(n)]))
    for timeout in (1.0, 2.0, 4.0):
        configs.append((f"detect {timeout}", ["-n", "3", sys.executable, "-m", "mpimap", HERE, "--case", "detect",
                                              "--timeout", str(timeout)]))
    results = {label: [] for label, _ in configs}
    for r in range(rounds):
        for label, args in configs[r % len(configs):] + configs[:r % len(configs)]:
            proc = subprocess.run([mpiexec, *args], capture_output=True, text=True, env=env, timeout=300)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
            if line is None:
                raise RuntimeError(f"{label} failed:\n{proc.stdout}\n{proc.stderr}")
            results[label].append(json.loads(line[6:]))
            print(f"round {r + 1}: {label}: {results[label][-1]}", file=sys.stderr, flush=True)
    print(f"\n{rounds} rounds, medians, mpiexec -n 2 (1 worker)\n")
    for workload in ("trivial", "sleep1ms"):
        base = statistics.median(x["per_point"] for x in results[f"{workload} rank"])
        for isolation in ("rank", "process", "fresh"):
            per = statistics.median(x["per_point"] for x in results[f"{workload} {isolation}"])
            print(f"{workload:9} isolation={isolation:8} {per * 1e6:9.1f} us/point, "
                  f"+{(per - base) * 1e6:8.1f} us over in-rank")
    print("\nhung rank (SIGSTOP), heartbeat 0.25 s, -n 3:")
    for timeout in (1.0, 2.0, 4.0):
        detected = [x["detected"] for x in results[f"detect {timeout}"]]
        print(f"rank_timeout {timeout:.1f} s: detected after {statistics.median(detected):.2f} s "
              f"(min {min(detected):.2f}, max {max(detected):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["isolation", "detect"])
    parser.add_argument("--isolation", default="rank")
    parser.add_argument("--workload", default="trivial")
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.case == "isolation":
        print("BENCH " + json.dumps({"per_point": isolation_case(args.isolation, args.workload, args.points)}),
              flush=True)
    elif args.case == "detect":
        print("BENCH " + json.dumps({"detected": detection_case(args.timeout)}), flush=True)
    else:
        drive(args.rounds)


if __name__ == "__main__":
    main()
