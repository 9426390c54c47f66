"""Native models benchmark: the C extension's loop against a pure-Python ctypes loop and a plain C program, and
``mpimap run --native`` end to end against the same model as a Python function; side by side in one run.

Driver (what to run):   python benchmarks/bench_native.py [--rounds 3] [--points 1000000] [--quick]
It builds benchmarks/native/ with the C compiler (``cc -O3 -ffast-math``: what a model's author would use),
runs every configuration round-robin over rounds (this machine is noisy: compare within one run only) and
prints medians and the ratios the targets are about.  The figures in docs/performance.rst come from it.

Models (benchmarks/native/model.c; the same in Python below, for the end-to-end comparison):
    poly    chi-square of a cubic over 100 data points (4 parameters): a cheap model, ~40 ns in C
    gauss   chi-square of a Gaussian over 100 data points (4 parameters): 100 exp, ~0.5 µs in C

Workloads:
    loop    one process evaluates every point: ``c`` the plain C program (benchmarks/native/loop.c),
            ``extension`` NativeFunction.run through the extension, ``ctypes`` the same through the pure-Python
            ctypes loop (what mpimap does without the extension); all three checked to give the same sum
    run     ``mpiexec -n 3 python -m mpimap run`` on every point, results stored (HDF5), wall time of the command:
            ``--native`` (rank isolation) against the Python function (rank isolation, automatic chunks;
            and chunks of 10000; and process isolation): the best Python configuration is the reference
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NDATA = 100
T = -1.0 + 2.0 * np.arange(NDATA) / (NDATA - 1)
D = 0.5 + T - 0.3 * T * T + 0.01 * ((np.arange(NDATA) * 37) % 11 - 5)


def poly_py(point):
    """The ``poly`` model in numpy: one point's chi-square."""
    a, b, c, e = point
    r = a + T * (b + T * (c + T * e)) - D
    return float(r @ r)


def gauss_py(point):
    """The ``gauss`` model in numpy."""
    a, mu, s, bg = point
    r = a * np.exp(-0.5 * (T - mu) ** 2 / (s * s)) + bg - D
    return float(r @ r)


def build(work: str) -> tuple[str, str]:
    """Compile the models' library and the plain C loop into ``work``; return their paths."""
    cc = os.environ.get("CC", "cc")
    include = os.path.join(HERE, "..", "c_ext")
    library, loop = os.path.join(work, "libbench.so"), os.path.join(work, "loop")
    subprocess.run([cc, "-O3", "-ffast-math", "-shared", "-fPIC", "-I", include, "-o", library,
                    os.path.join(HERE, "native", "model.c"), "-lm"], check=True)
    subprocess.run([cc, "-O2", "-I", include, "-o", loop, os.path.join(HERE, "native", "loop.c"), "-ldl"],
                   check=True)
    return library, loop


def loop_c(loop: str, library: str, symbol: str, points_bin: str, n: int) -> tuple[float, float]:
    out = subprocess.run([loop, library, symbol, points_bin, str(n)], check=True, capture_output=True, text=True)
    seconds, total = out.stdout.split()
    return float(seconds), float(total)


def loop_mpimap(library: str, symbol: str, points: np.ndarray, use_extension: bool) -> tuple[float, float]:
    from mpimap import native_models

    fn = native_models.native(library, symbol)
    n = len(points)
    y, codes = np.empty((n, 1)), np.empty(n, np.int32)
    extension = native_models.extension if use_extension else None
    t0 = time.perf_counter()
    fn.run(points, y, codes, None, 0, n, extension=extension)
    seconds = time.perf_counter() - t0
    return seconds, float(y[codes == 0].sum())


def run_command(args: list[str], work: str) -> float:
    """Wall seconds of ``mpiexec -n 3 python -m mpimap run ARGS`` (a fresh results file each time)."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    out = os.path.join(work, "results.h5")
    command = [mpiexec, "-n", "3", sys.executable, "-m", "mpimap", "run", *args, "--out", out, "--fresh",
               "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=HERE, capture_output=True, timeout=3600)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points", type=int, default=10 ** 6)
    parser.add_argument("--quick", action="store_true", help="one round of 10^5 points: checks the script runs")
    o = parser.parse_args()
    if o.quick:
        o.rounds, o.points = 1, 10 ** 5
    from mpimap import native_models

    if native_models.extension is None:
        sys.exit(f"bench_native: {native_models.describe()}; build it (pip install with a C compiler) to compare")
    work = tempfile.mkdtemp(prefix="bench-native-")
    library, loop = build(work)
    rng = np.random.default_rng(2024)
    points = np.ascontiguousarray(rng.uniform([0.0, 0.5, -0.5, 0.2], [1.0, 1.5, 0.5, 1.0], size=(o.points, 4)))
    points_npy, points_bin = os.path.join(work, "points.npy"), os.path.join(work, "points.bin")
    np.save(points_npy, points)
    points.tofile(points_bin)

    configs = {}
    for symbol in ("poly", "gauss"):
        configs[f"loop {symbol} c"] = lambda s=symbol: loop_c(loop, library, s, points_bin, o.points)
        configs[f"loop {symbol} extension"] = lambda s=symbol: loop_mpimap(library, s, points, True)
        configs[f"loop {symbol} ctypes"] = lambda s=symbol: loop_mpimap(library, s, points, False)
    for symbol in ("poly", "gauss"):
        native_args = ["--native", f"{library}:{symbol}", "--outputs", "1", "--points", points_npy]
        python_args = [f"bench_native.py:{symbol}_py", "--points", points_npy]
        configs[f"run {symbol} native rank"] = lambda a=native_args: (run_command([*a, "--isolation", "rank"], work), 0)
        configs[f"run {symbol} python rank"] = lambda a=python_args: (run_command([*a, "--isolation", "rank"], work), 0)
        configs[f"run {symbol} python rank chunks of 10000"] = lambda a=python_args: (
            run_command([*a, "--isolation", "rank", "--chunksize", "10000"], work), 0)
        configs[f"run {symbol} python process"] = lambda a=python_args: (
            run_command([*a, "--isolation", "process"], work), 0)

    seconds = {name: [] for name in configs}
    sums = {}
    for r in range(o.rounds):
        for name, measure in configs.items():
            s, total = measure()
            seconds[name].append(s)
            if name.startswith("loop"):
                sums.setdefault(name.split()[1], []).append(total)
            print(f"round {r + 1}: {name}: {s:.3f} s", file=sys.stderr, flush=True)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"{o.points} points, {o.rounds} rounds, medians (load: {os.getloadavg()[0]:.1f})")
    for symbol in ("poly", "gauss"):
        # The same values summed in another order: equal to ~1e-15 relative.
        assert max(sums[symbol]) - min(sums[symbol]) <= 1e-12 * abs(max(sums[symbol])), f"loops disagree: {symbol}"
        c, ext, ct = (median[f"loop {symbol} {k}"] for k in ("c", "extension", "ctypes"))
        print(f"{symbol}: per point  C program {1e9 * c / o.points:.0f} ns, extension {1e9 * ext / o.points:.0f} ns,"
              f" ctypes loop {1e9 * ct / o.points:.0f} ns")
        print(f"{symbol}:   extension vs ctypes loop {ct / ext:.1f}x faster;  extension vs C program {ext / c:.2f}x the time")
        native = o.points / median[f"run {symbol} native rank"]
        pythons = {k: o.points / v for k, v in median.items() if k.startswith(f"run {symbol} python")}
        best = max(pythons, key=pythons.get)
        print(f"{symbol}: run end to end (-n 3): native {native:,.0f} points/s;  "
              + ";  ".join(f"{k.split(' python ')[1]} {v:,.0f}/s" for k, v in pythons.items()))
        print(f"{symbol}:   native vs the best Python configuration ({best.split(' python ')[1]}): "
              f"{native / pythons[best]:.1f}x")


if __name__ == "__main__":
    main()
