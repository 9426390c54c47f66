"""Reproducible random numbers: one seed per map, one independent stream per point.

Point ``index`` of a map with seed ``seed`` draws from
``numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=(index,))))``,
which is ``SeedSequence(seed).spawn(n)[index]`` made directly.  The stream
depends on nothing but the seed and the index, so results are the same
whatever the ranks, chunks, isolation, retries or resumes; the evaluator
enters a point's stream around each call (:func:`_enter`, :func:`_leave`)
and the function reaches it with :func:`rng`.
"""

from __future__ import annotations

import numbers

import numpy as np

DERIVATION = "numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=(index,))))"
DERIVATION_VERSION = 1

# The point being evaluated in this process: [seed, index, its Generator once asked for], or None.  One per
# process, not per thread: a function that draws from threads of its own still gets its point's stream.
_current: list | None = None


def point_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of point ``index`` of a map with seed ``seed``: what :func:`rng` gave that point.

    Plain Python, no pool needed: re-evaluate one point alone with it.
    """
    seed, index = check_seed(seed), _check_index(index)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))


def rng() -> np.random.Generator:
    """The random stream of the point being evaluated (a ``numpy.random.Generator``), in a map with a seed.

    Each evaluation of a point starts its stream afresh (a retry or a second
    copy draws the same numbers); calls within one evaluation continue it.
    """
    current = _current
    if current is None:
        raise RuntimeError("mpimap.rng() gives the stream of the point being evaluated, and only in a map with a "
                           "seed: give one (Pool(seed=N), pool.map(..., seed=N), mpimap run --seed N), or use "
                           "mpimap.point_rng(seed, index) outside a map")
    if current[2] is None:
        current[2] = point_rng(current[0], current[1])
    return current[2]


def check_seed(seed) -> int:
    """``seed`` as a Python int; TypeError or ValueError (one line saying what a seed is) otherwise."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be a non-negative integer, not {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    return int(seed)


def _check_index(index) -> int:
    if not isinstance(index, numbers.Integral) or isinstance(index, (bool, np.bool_)) or index < 0:
        raise ValueError(f"a point's index must be a non-negative integer, not {index!r}")
    return int(index)


def check_keys(keys, n: int):
    """A map's stream indices as given (``keys=``): one non-negative integer per point; ValueError otherwise."""
    if isinstance(keys, range):
        ok = len(keys) == n and (n == 0 or min(keys[0], keys[-1]) >= 0)
    else:
        keys = np.asarray(keys)
        ok = keys.shape == (n,) and (n == 0 or (keys.dtype.kind in "iu" and keys.min() >= 0))
    if not ok:
        raise ValueError(f"keys must hold one non-negative integer stream index per point ({n})")
    return keys


def _enter(seed: int, index) -> list | None:
    """Make point ``index``'s stream the current one; return what was current (for :func:`_leave`)."""
    global _current
    saved, _current = _current, [seed, int(index), None]
    return saved


def _leave(saved: list | None) -> None:
    global _current
    _current = saved
