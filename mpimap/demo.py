"""The demo job: a chi-square scan of a damped oscillator over a grid of (decay time, frequency)."""

from __future__ import annotations

import subprocess

import numpy as np

_T = np.linspace(0.0, 10.0, 400)
_TRUE = (2.5, 0.8)  # decay time, frequency


def model(tau: float, freq: float) -> np.ndarray:
    return np.exp(-_T / tau) * np.cos(2 * np.pi * freq * _T)


_DATA = model(*_TRUE) + np.random.default_rng(42).normal(0.0, 0.05, _T.size)


def chi2(point) -> float:
    """Chi-square of the model at ``point = (tau, freq)`` against the demo's synthetic data."""
    tau, freq = point
    return float(np.sum(((_DATA - model(tau, freq)) / 0.05) ** 2))


def grid(npoints: int) -> np.ndarray:
    side = max(2, int(round(np.sqrt(npoints))))
    taus, freqs = np.meshgrid(np.linspace(0.5, 5.0, side), np.linspace(0.2, 1.6, side), indexing="ij")
    return np.column_stack([taus.ravel(), freqs.ravel()])


def run_demo(ranks: int, npoints: int, out: str) -> int:
    """Write the grid, run it with ``mpiexec -n ranks``, report the best fit; return the exit status."""
    from .launch import mpiexec_command
    from .store import read_results

    points_file = out.rsplit(".", 1)[0] + "-points.npy"
    np.save(points_file, grid(npoints))
    command = mpiexec_command(ranks, "run", "mpimap.demo:chi2", "--points", points_file, "--out", out, "--fresh")
    print("$ " + " ".join(command), flush=True)
    rc = subprocess.call(command)
    if rc != 0:
        return rc
    results = read_results(out)
    best = int(np.nanargmin(results["value"]))
    tau, freq = results["points"][best]
    print(f"best fit: tau = {tau:.3f}, freq = {freq:.3f} (true {_TRUE[0]}, {_TRUE[1]}), "
          f"chi2 = {results['value'][best]:.1f} for {_T.size} data points")
    return 0
