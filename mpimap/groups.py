"""Multi-rank tasks: ``map(fn, points, ranks_per_task=k)`` runs each point on k worker ranks at once.

Inside ``fn``, :func:`task_comm` is an MPI communicator of the task's k ranks
(rank 0 of it is the lowest pool rank), for a solver that is itself MPI-parallel.
The scheduler forms groups from idle ranks (``Scheduler._assign_groups``), the
transport builds and caches their communicators (``Transport.group_comm``), and
the master settles each point from its members' reports: the first failure, else
what task rank 0 returned.  docs/mpi-tasks.rst is the user's guide.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

_UNSET = object()
_current = _UNSET  # the communicator of the point being evaluated in this process; None: a one-rank task


@dataclass(frozen=True)
class GroupSpec:
    """What the master needs to know about a k-rank map: its width and the point timeout it enforces itself."""

    ranks_per_task: int
    timeout: float | None = None  # seconds: a point running longer is failed as timed out (its members stay busy)


def task_comm():
    """The MPI communicator of the task being evaluated.

    In a map with ``ranks_per_task=k`` it holds the task's k ranks; in a
    one-rank map evaluated in the rank (``isolation="rank"``) it is
    ``MPI.COMM_SELF``.  Anywhere else (rank 0, an evaluation process of
    ``isolation="process"``, outside a point) it raises RuntimeError.
    """
    if _current is _UNSET:
        raise RuntimeError("mpimap.task_comm() is only available inside a point's function evaluated in a worker "
                           "rank (isolation='rank'); for several ranks per point, map with ranks_per_task=k")
    if _current is None:
        from mpi4py import MPI

        return MPI.COMM_SELF
    return _current


def group_size() -> int:
    """The number of ranks of the k-rank task being evaluated in this process (1: none, or a one-rank task)."""
    return 1 if _current is _UNSET or _current is None else _current.Get_size()


def _enter(comm):
    """Make ``comm`` (None: a one-rank task) what :func:`task_comm` returns while a chunk is evaluated; return what
    :func:`_leave` restores.  Plain functions, as for seeds and nested maps: this runs for every chunk."""
    global _current
    saved, _current = _current, comm
    return saved


def _leave(saved) -> None:
    global _current
    _current = saved


def split_options(options: dict, isolation, chunksize) -> tuple[dict, GroupSpec | None]:
    """Take ``ranks_per_task`` out of a map's options; for k > 1, check what a k-rank map allows.

    ``isolation`` is the pool's default; ``point_timeout`` of a k-rank map is
    enforced by the master (the points run in the rank, which nothing can
    stop), so it leaves the options for the :class:`GroupSpec`.  Raises
    ValueError or TypeError with the fix.
    """
    k = options.get("ranks_per_task", 1)
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"ranks_per_task must be a positive integer (the ranks each point runs on), not {k!r}")
    options = {name: value for name, value in options.items() if name != "ranks_per_task"}
    if k == 1:
        return options, None
    mode = options.get("isolation", isolation.mode)
    if mode != "rank":
        raise ValueError(f"ranks_per_task={k} needs isolation='rank', not {mode!r}: a point's k ranks share an MPI "
                         "communicator, and evaluation processes are not MPI processes (pass isolation='rank')")
    if chunksize not in (None, 1):
        raise ValueError(f"chunksize={chunksize} cannot be used with ranks_per_task={k}: each k-rank task is one "
                         "point (leave chunksize out)")
    timeout = options.pop("point_timeout", isolation.point_timeout)
    if timeout is not None and (not isinstance(timeout, numbers.Real) or timeout <= 0):
        raise ValueError(f"point_timeout must be a positive number of seconds, not {timeout!r}")
    return options, GroupSpec(int(k), timeout)


def timeout_failure(seconds: float, stuck: list):
    """The failure of a k-rank point that ran past its ``point_timeout`` (its ranks could not be stopped)."""
    from .failures import Failure

    return Failure("Timeout", f"the {len(stuck)}-rank task ran longer than its point_timeout ({seconds:g} s); its "
                   f"ranks {stuck} cannot be stopped and get no other work until they return", "", status="timeout")
