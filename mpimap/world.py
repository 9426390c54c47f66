"""The process-wide session of ``python -m mpimap``: worker ranks serve for the whole run, and
every ``Pool()`` on rank 0 shares one master until the session ends."""

from __future__ import annotations

_comm = None
_master = None


def start(comm) -> None:
    """Declare that the worker ranks of ``comm`` serve until :func:`end` (called on rank 0)."""
    global _comm
    _comm = comm


def active() -> bool:
    return _comm is not None


def workers() -> int:
    """How many processes evaluate points in this session: the worker ranks, or 1 outside ``python -m mpimap``."""
    return _comm.Get_size() - 1 if _comm is not None else 1


def master():
    """The session's master, started on first use."""
    global _master
    if _master is None:
        from .master import Master

        _master = Master(_comm, stop_workers=False)
    return _master


def end(cancel: bool = False) -> set:
    """Finish the maps still open (``cancel``: drop them), then stop the session's workers (they return from
    serving, also if the master thread died) and its master; return the ranks lost on the way."""
    global _comm, _master
    if _comm is None:
        return set()
    current = master()
    current.stop_workers = True
    current.close(cancel=cancel)
    _comm = _master = None
    return current.lost
