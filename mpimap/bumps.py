"""bumps on mpimap: a mapper class with bumps' protocol that evaluates a fit's nllf on mpimap's workers.

bumps' fitters (DREAM, DE) call a *mapper*, ``mapper(points) -> nllf values``,
once per generation with an ``(npop, nparams)`` array.  :class:`Mapper` makes
that callable (``start_mapper``): the fit's problem goes to every worker once,
as shared state (``Pool.share``), and each call sends only the points.  A point
whose evaluation crashes or runs past ``point_timeout`` gets ``inf`` (logged),
so the fit goes on.  docs/bumps.rst says how to switch a script or the
``bumps`` command to it.
"""

from __future__ import annotations

import logging
import runpy
import sys
import threading

import cloudpickle  # bumps depends on it
import numpy as np

from . import world
from .pool import Pool, map_settings

log = logging.getLogger("mpimap.bumps")

DEFAULT_OPTIONS = {"isolation": "process"}  # a model that crashes costs its point, not the rank


class _ByValue:
    """The problem, pickled as bumps pickles it for its own workers: with cloudpickle, functions and classes of the
    model file by value (bumps loads a model file as a module no other process can import)."""

    def __init__(self, problem):
        self.problem = problem

    def __reduce__(self):
        return cloudpickle.loads, (cloudpickle.dumps(self.problem, protocol=5),)


class _Nllf:
    """A fit's function for the workers: the problem's negative log-likelihood at a point."""

    def __init__(self, shared):
        self.shared = shared
        self.problem = None

    def __call__(self, point) -> float:
        return float(self.problem.nllf(point))

    def __reduce__(self):
        return _arrived, (self.shared,)


def _arrived(shared) -> _Nllf:
    """Where the function arrives (a worker rank, with its first chunk of each call), load the problem: it is read
    once per process and fit, and an evaluation process forked from the rank later starts with it and the modules
    it needs (no import of the model's packages after every crash)."""
    function = _Nllf(shared)
    value = shared.value  # the wrapper itself in the process that shared it (a pool of one process)
    function.problem = value.problem if isinstance(value, _ByValue) else value
    return function


class Mapper:
    """bumps' mapper protocol (``bumps.mapper.BaseMapper``) on mpimap's workers; every method is static.

    ``start_mapper(problem)`` shares the problem with the workers and returns
    the callable a fitter maps with; ``stop_mapper()`` lets the workers go.
    Options for the points (``isolation``, ``point_timeout``, ``quarantine``,
    ...: see docs/resilience.rst) are set with :meth:`configure`.
    """

    has_problem = False  # the problem travels by pickle (cloudpickle), as for bumps' MPMapper
    options = dict(DEFAULT_OPTIONS)
    _pool: Pool | None = None
    _lock = threading.Lock()

    @staticmethod
    def configure(**options) -> None:
        """Set the options of the points of the next fits, e.g. ``configure(point_timeout=60)`` (None: default).

        The defaults are ``isolation="process"``; a bad option raises here.
        """
        merged = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
        map_settings(merged)  # TypeError or ValueError now, not in the fit
        with Mapper._lock:
            Mapper.options = merged
            pool, Mapper._pool = Mapper._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    @staticmethod
    def start_worker(problem) -> None:
        """Nothing to do: under ``python -m mpimap`` the worker ranks serve mpimap and only rank 0 runs bumps."""

    @staticmethod
    def start_mapper(problem, modelargs=None, cpus=0):
        """A new fit: send ``problem`` to every worker once; return ``mapper(points) -> nllf values``.

        ``cpus`` is not used: the worker ranks of the MPI job evaluate the points.
        """
        pool = _pool()
        return _FitMapper(pool, pool.share(_ByValue(problem)))

    @staticmethod
    def stop_mapper(mapper=None) -> None:
        """Wait for the maps in flight, then let the pool go (a later fit starts a new one)."""
        with Mapper._lock:
            pool, Mapper._pool = Mapper._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _pool() -> Pool:
    with Mapper._lock:
        if Mapper._pool is None:
            Mapper._pool = Pool(**Mapper.options)
        return Mapper._pool


class _FitMapper:
    """One fit's mapper: ``(npop, nparams)`` points in, one nllf per point out, in order."""

    def __init__(self, pool: Pool, shared):
        self.pool = pool
        self.shared = shared  # the problem on the workers, while this fit lives
        self.function = _Nllf(shared)

    def __call__(self, points) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        out = np.empty(len(points))
        for chunk in self.pool.imap_chunks(self.function, points) if len(points) else ():
            if not chunk.failures and not chunk.skip:
                out[chunk.start:chunk.stop] = chunk.values
                continue
            for offset in chunk.offsets():
                failure = chunk.failures.get(offset)
                if failure is not None and failure.status == "failed":
                    # bumps turns a model's exceptions into inf itself: this one is mpimap's or the problem's
                    # (it could not be loaded on a worker).  Counting it as inf would fit nonsense.
                    raise failure.exception()
                out[chunk.start + offset] = np.inf if failure else chunk.values[offset]
                if failure:
                    log.warning("nllf failed at point %s (%s): counted as inf",
                                points[chunk.start + offset].tolist(), failure.text)
        return out


def install() -> None:
    """Make bumps fit with :class:`Mapper` where it would use its MPI or process-pool mapper.

    Sets ``bumps.mapper.MPIMapper`` (the ``bumps`` command under ``mpiexec``)
    and, when this session has worker ranks, ``bumps.mapper.MPMapper``
    (``bumps.fitters.fit(..., parallel=0)`` and ``bumps --parallel``).
    """
    import bumps.mapper

    bumps.mapper.MPIMapper = Mapper
    if world.active():
        bumps.mapper.MPMapper = Mapper


def main(argv=None) -> None:
    """The ``bumps`` command with its fits on mpimap's workers: ``mpimap bumps MODEL.py [bumps options]``."""
    install()
    sys.argv = ["bumps", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("bumps", run_name="__main__")  # what `python -m bumps` runs, whichever bumps version

