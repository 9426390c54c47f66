"""bumps benchmark: mpimap.bumps.Mapper against bumps' own MPIMapper and serial mapper, side by side in one run.

Driver (what to run):   python benchmarks/bench_bumps.py [--rounds 3] [--quick]
It launches every configuration, round-robin over rounds (this machine is noisy: compare within one run
only), and prints medians and the ratios the targets are about.  The figures in docs/performance.rst come
from it.  The problem is the 2-parameter line fit of docs/bumps.rst (21 data points, ~10 µs per nllf).

Workloads (what one configuration measures):
    call   a 20-point call (one DREAM generation of a 2-parameter problem), the problem already on the
           workers: the median time per call over many calls
    idle   the CPU time of rank 0 while the thread that calls the mapper sleeps between calls (a fitter's
           own work on rank 0 sits there), as a share of one core
    fit    the whole DREAM fit (samples=2000, burn=50: 151 calls of 20 points), start_mapper included: the
           second fit of the session (``first_fit``: the first one, where mpimap's workers import bumps)
    fit1ms the same with a model that takes 1 ms more per evaluation (time.sleep), where parallel pays

One configuration (what the driver launches):
    python bench_bumps.py --system serial --workload fit
    mpiexec -n 3 python bench_bumps.py --system mpimapper --workload call        # bumps.mapper.MPIMapper
    mpiexec -n 3 python -m mpimap bench_bumps.py --system mpimap --workload call [--isolation process]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.abspath(__file__)
CALL_POINTS = 20


# -- the problem ------------------------------------------------------------------------------------------------
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))  # seconds added to each evaluation (workload fit1ms)


def line(x, m, b):
    if SLEEP:
        time.sleep(SLEEP)
    return m * x + b


def make_problem():
    from bumps.curve import Curve
    from bumps.fitproblem import FitProblem

    x = np.linspace(0.0, 10.0, 21)
    y = 2.5 * x - 1.0 + np.random.default_rng(12345).normal(0.0, 0.5, size=x.shape)
    model = Curve(line, x, y, np.full_like(x, 0.5), m=1.0, b=0.0)
    model.m.range(0.0, 5.0)
    model.b.range(-5.0, 5.0)
    return FitProblem(model)


def call_points():
    rng = np.random.default_rng(1)
    return np.column_stack([rng.uniform(0, 5, CALL_POINTS), rng.uniform(-5, 5, CALL_POINTS)])


# -- the systems ------------------------------------------------------------------------------------------------
def mapper_class(system, isolation):
    """The bumps mapper class of a system (None on an MPIMapper worker rank, which has served and is done)."""
    if system == "serial":
        from bumps.mapper import SerialMapper

        return SerialMapper
    if system == "mpimapper":
        from bumps.mapper import MPIMapper

        MPIMapper.start_worker(make_problem())  # worker ranks serve here and exit; rank 0 returns
        return MPIMapper
    from mpimap.bumps import Mapper

    Mapper.configure(isolation=isolation)
    return Mapper


def measure_calls(mapper, calls):
    points = call_points()
    for _ in range(20):
        mapper(points)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        mapper(points)
        times.append(time.perf_counter() - t0)
    return dict(per_call=statistics.median(times), mean_call=statistics.fmean(times))


def measure_idle(mapper, calls, pause=0.02):
    """Rank 0's CPU share while the calling thread (a fit thread, as in bumps' CLI) sleeps between calls."""
    points = call_points()
    idle = dict(cpu=0.0, wall=0.0)

    def fit_thread():
        for _ in range(calls):
            mapper(points)
            c0, t0 = _cpu(), time.perf_counter()
            time.sleep(pause)
            idle["cpu"] += _cpu() - c0
            idle["wall"] += time.perf_counter() - t0

    thread = threading.Thread(target=fit_thread)
    thread.start()
    thread.join()
    return dict(idle_cpu=idle["cpu"] / idle["wall"])


def measure_fit(mapper_cls):
    from bumps.fitters import DreamFit, FitDriver

    times = []
    for _ in range(2):
        np.random.seed(7)
        problem = make_problem()
        t0 = time.perf_counter()
        mapper = mapper_cls.start_mapper(problem, [], cpus=0)
        driver = FitDriver(fitclass=DreamFit, problem=problem, monitors=[], mapper=mapper, samples=2000, burn=50,
                           trim=False)
        driver.clip()
        x, fx = driver.fit()
        times.append(time.perf_counter() - t0)
    return dict(fit=times[1], first_fit=times[0], x=[float(v) for v in x], fx=float(fx))


def _cpu():
    """CPU seconds of this process (all its threads: for mpimap, the master thread too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_configuration(args):
    cls = mapper_class(args.system, args.isolation)
    if args.workload.startswith("fit"):
        out = measure_fit(cls)
    else:
        mapper = cls.start_mapper(make_problem(), [], cpus=0)
        out = measure_calls(mapper, args.calls) if args.workload == "call" else measure_idle(mapper, args.calls)
    print("BENCH " + json.dumps(out), flush=True)
    cls.stop_mapper()  # MPIMapper: the workers leave, and rank 0 finalizes MPI


# -- the driver -----------------------------------------------------------------------------------------------
CONFIGS = [  # (label, ranks, system, isolation)
    ("serial", 1, "serial", None),
    ("bumps MPIMapper -n 3", 3, "mpimapper", None),
    ("mpimap rank -n 3", 3, "mpimap", "rank"),
    ("mpimap process -n 3", 3, "mpimap", "process"),
]


def launch(ranks, system, workload, isolation, calls):
    from mpimap.launch import find_mpiexec

    command = [sys.executable]
    if system == "mpimap":
        command += ["-m", "mpimap"]
    command += [HERE, "--system", system, "--workload", workload, "--calls", str(calls)]
    if isolation:
        command += ["--isolation", isolation]
    if ranks > 1 or system != "serial":
        command = [find_mpiexec(), "-n", str(ranks), *command]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               BENCH_SLEEP="0.001" if workload == "fit1ms" else "0")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("BENCH "):])


def driver(args):
    calls = 100 if args.quick else 500
    plan = [(w, c) for w in ("call", "idle", "fit", "fit1ms") for c in CONFIGS
            if not (w == "idle" and c[2] == "serial")]
    results = {}
    for r in range(args.rounds):
        for workload, (label, ranks, system, isolation) in plan[r % len(plan):] + plan[:r % len(plan)]:
            out = launch(ranks, system, workload, isolation, calls)
            results.setdefault((workload, label), []).append(out)
            print(f"round {r + 1} {workload:5s} {label:22s} {json.dumps(out)}", file=sys.stderr, flush=True)
    fits = {(workload, label): runs[0]["x"] for (workload, label), runs in results.items() if workload == "fit"}
    same = all(x == fits[("fit", "serial")] for x in fits.values())
    print(f"\nDREAM fit x identical in every configuration: {same}")

    def median(workload, label, key):
        return statistics.median(run[key] for run in results[(workload, label)])

    print(f"\n{'configuration':24s} {'20-point call':>14s} {'rank 0 idle CPU':>16s} {'DREAM fit (first)':>18s} "
          f"{'fit, 1 ms model':>16s}")
    for label, _, system, _ in CONFIGS:
        call = f"{median('call', label, 'per_call') * 1e6:9.0f} µs"
        idle = "" if system == "serial" else f"{median('idle', label, 'idle_cpu') * 100:12.1f} %"
        fit = f"{median('fit', label, 'fit'):.2f} s ({median('fit', label, 'first_fit'):.2f})"
        print(f"{label:24s} {call:>14s} {idle:>16s} {fit:>18s} {median('fit1ms', label, 'fit'):14.2f} s")
    print()
    mpi = "bumps MPIMapper -n 3"
    for label in ("mpimap rank -n 3", "mpimap process -n 3"):
        ratios = [a["per_call"] / b["per_call"] for a, b in zip(results[("call", label)], results[("call", mpi)])]
        fit = [a["fit"] / b["fit"] for a, b in zip(results[("fit", label)], results[("fit", "serial")])]
        slow = [a["fit"] / b["fit"] for a, b in zip(results[("fit1ms", label)], results[("fit1ms", "serial")])]
        print(f"{label}: call / MPIMapper's {statistics.median(ratios):.2f}x (target <= 2: "
              f"{'met' if statistics.median(ratios) <= 2 else 'NOT met'}); fit / serial {statistics.median(fit):.2f}x, "
              f"with the 1 ms model {statistics.median(slow):.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=["serial", "mpimapper", "mpimap"])
    parser.add_argument("--workload", choices=["call", "idle", "fit", "fit1ms"], default="call")
    parser.add_argument("--isolation", choices=["rank", "process"], default="process")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.system:
        one_configuration(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
