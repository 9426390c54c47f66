"""Nested maps: a task running on a worker maps, submits and waits on the pool it runs in.

``current_pool()`` inside a point's function (``isolation="rank"``) returns a
:class:`WorkerPool`.  Its maps travel to the master as SUBMAP messages and are
scheduled there like any map, with a higher priority than their parent map
(inner work drains first); their results come back as SUBRESULT messages.  A
task waiting for them keeps its rank serving: it evaluates the chunks the
master sends (the scheduler *parks* the waiting chunk, so it no longer takes a
prefetch slot), so no depth of nesting deadlocks even when every task waits.
The master keeps the tree (:class:`MasterNesting`): when a parent map ends, its
task's chunk comes back, or its rank is lost, the nested maps under it are
cancelled.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager

import numpy as np

from . import groups, seeds
from .failures import Failure
from .maps import MapHandle, Policy
from .protocol import Kind, SubMap, SubResult, UnloadableArgs

_PROCESS_ERROR = ("mpimap.current_pool(): nested maps need isolation='rank'; this point runs in an evaluation "
                  "process (isolation='process' or 'fresh'), which is not an MPI rank: map with isolation='rank' "
                  "for the outer map (its inner maps may still use isolation='process')")


_GROUP_ERROR = ("mpimap.current_pool(): a task of a map with ranks_per_task={k} cannot open nested maps: its {k} "
                "ranks run only that task until it returns, so no rank of theirs could serve the inner work, and each "
                "member would open its own copy of the map; parallelise inside the task with mpimap.task_comm(), or "
                "map the inner work from a one-rank task or from rank 0")


_local = threading.local()  # .context: the task this thread evaluates (set by the evaluating loop), if any
_pools: weakref.WeakSet = weakref.WeakSet()  # pools created in this process (rank 0): the latest open one is current


def current_pool():
    """The pool the calling code runs in.

    * Inside a point's function on a worker (``isolation="rank"``): a
      :class:`WorkerPool` with ``map``, ``imap_unordered`` and ``submit``, whose
      work the master schedules on every rank (the waiting rank included).
    * Inside a point's function in a pool of one process: a :class:`SerialPool`
      evaluating nested calls in place.
    * In an evaluation process (``isolation="process"`` or ``"fresh"``), or in a
      task of a map with ``ranks_per_task`` > 1: RuntimeError.
    * Elsewhere (rank 0, outside a task): the most recently created open ``Pool``
      of this process; under ``python -m mpimap`` a new ``Pool()`` on the session if none is open.
    """
    context = getattr(_local, "context", None)
    if context is not None:
        source, chunk_id, function, pid = context
        if pid != os.getpid():  # inherited across the fork of an evaluation process
            raise RuntimeError(_PROCESS_ERROR)
        if groups.group_size() > 1:
            raise RuntimeError(_GROUP_ERROR.format(k=groups.group_size()))
        return source.pool(chunk_id, function)
    from . import world
    from .pool import Pool

    pools = [p for p in _pools if getattr(p, "_master", None) is not None]
    if pools:
        return max(pools, key=lambda p: p._created)
    if world.active():
        return Pool()
    raise RuntimeError("mpimap.current_pool(): no pool here: call it inside a function mapped by a Pool (in the "
                       "thread that evaluates the point), or on the rank that created an open Pool")


def register(pool) -> None:
    """Record a pool created in this process (rank 0): outside a task it is the current pool."""
    pool._created = time.monotonic()
    _pools.add(pool)


def _enter(source, chunk_id=None, function=None):
    """Before this thread evaluates a chunk: ``current_pool()`` is then ``source.pool(chunk_id, function)``.

    Returns what :func:`_leave` restores (chunks nest while a task waits).  A
    plain tuple, and the pool built only when asked for: this runs for every chunk.
    """
    saved = getattr(_local, "context", None)
    _local.context = (source, chunk_id, function, os.getpid())
    return saved


def _leave(saved) -> None:
    _local.context = saved


# -- on a worker rank ----------------------------------------------------------------------------------------------
class WorkerPool:
    """The pool as a task on a worker sees it: its maps and calls run on every rank of the pool.

    ``map`` and ``imap_unordered`` take the options of ``Pool.map`` (isolation and
    failure policy; the isolation and point logs default to the outer map's);
    ``submit`` returns a Future, completed while the task waits on it.  A point's
    exception is raised where the task reads it, as with ``Pool.map``.  Nested
    maps still open when the task's chunk ends are cancelled.
    """

    def __init__(self, nesting: "WorkerNesting", chunk_id: int, function):
        self._nesting = nesting
        self._chunk_id = chunk_id
        self._function = function  # the outer map's MapFunction

    def map(self, fn, *iterables, timeout=None, chunksize=None, priority=0, seed=None, **options):
        """Like ``Pool.map``: results in input order; a point's exception raises at its turn."""
        from .pool import _deadline

        handle = self._open(fn, iterables, chunksize, priority, True, options, seed=seed)
        return handle.ordered(_deadline(timeout))

    def imap_unordered(self, fn, *iterables, timeout=None, chunksize=None, priority=0, indexed=False, seed=None,
                       **options):
        """Like ``Pool.imap_unordered``: results as they arrive (``(index, value)`` pairs if ``indexed``)."""
        from .pool import _deadline, _unordered

        handle = self._open(fn, iterables, chunksize, priority, False, options, seed=seed)
        return _unordered(handle, _deadline(timeout), indexed)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Evaluate ``fn(*args, **kwargs)`` on some rank; the Future completes when the task waits on it."""
        call = functools.partial(fn, **kwargs) if kwargs else fn
        return _NestedFuture(self._open(call, ([args],), None, 0, True, {}, star=True))

    def _open(self, fn, iterables, chunksize, priority, ordered, options, star=None, seed=None) -> MapHandle:
        from .pool import _check_map_options, _pickle_function, map_settings

        if not iterables:
            raise TypeError("map() needs at least one iterable of points")
        _check_map_options(chunksize, priority)
        if len(iterables) == 1:
            points = iterables[0]
            args = points if isinstance(points, (list, tuple, np.ndarray, range)) else list(points)
            star = bool(star)
        else:
            args, star = list(zip(*iterables)), True
        outer = self._function  # its isolation and point logs are the defaults; its pool's initializer runs too
        isolation, policy, logs = map_settings(options, outer.isolation, Policy(), outer.logs)
        seed = None if seed is None else seeds.check_seed(seed)  # no seed: the pool's is the top-level maps'
        blob = _pickle_function(fn, star, False, isolation, logs, seed=seed, init=outer.init)
        return self._nesting.open(self._chunk_id, blob, args, ordered, chunksize, priority, policy, seed is not None)


class _NestedFuture(Future):
    """A nested ``submit``: one call as a one-point map, read (and so waited on, serving) in ``result()``."""

    def __init__(self, handle: MapHandle):
        super().__init__()
        self._handle = handle

    def _settle(self, timeout) -> None:
        """Wait (serving) for the call's result and set it; a timeout leaves the call running."""
        from .pool import _deadline

        if self.done():
            return
        handle = self._handle
        try:
            with handle._cond:
                handle._wait(lambda: handle._ready[0], _deadline(timeout))
                if not handle._ready[0]:  # ended without its result
                    raise handle.error or CancelledError("the call was cancelled")
                failure = handle._failures.get(0)
                value = handle._values[0]
        except CancelledError:
            super().cancel()
        except TimeoutError:
            raise
        except Exception as exc:
            self.set_exception(exc)
        else:
            if failure is None:
                self.set_result(value)
            else:
                self.set_exception(failure.exception())

    def result(self, timeout=None):
        self._settle(timeout)
        return super().result(0)

    def exception(self, timeout=None):
        self._settle(timeout)
        return super().exception(0)

    def cancel(self) -> bool:
        if not self.done():
            self._handle.cancel()
        return super().cancel()


class WorkerNesting:
    """A worker rank's side of nested maps: sends SUBMAP/SUBCANCEL, takes SUBRESULT, serves while a task waits.

    It stands in for the master of the worker-side :class:`~mpimap.maps.MapHandle`
    objects: their waits call :meth:`drive`, which runs one step of the rank's
    serve loop (a message, or a queued chunk, newest map first).
    """

    drivable = True

    def __init__(self, worker):
        self.worker = worker  # the rank's worker._Worker
        self.maps: dict[int, MapHandle] = {}  # sub_id -> its handle, while open
        self.by_chunk: dict[int, list] = {}  # chunk_id -> sub_ids its task opened
        self._ids = itertools.count()

    def pool(self, chunk_id: int, function) -> WorkerPool:
        return WorkerPool(self, chunk_id, function)

    def open(self, chunk_id, blob, args, ordered, chunksize, priority, policy, seeded) -> MapHandle:
        handle = MapHandle(blob, args, chunksize=chunksize, priority=priority, ordered=ordered, policy=policy)
        if not args:  # nothing to ask the master for
            handle.finish()
            return handle
        handle.map_id = sub_id = next(self._ids)
        self.worker.transport.send(0, Kind.SUBMAP, SubMap(sub_id, chunk_id, blob, args, ordered, chunksize,
                                                          priority, policy, seeded))
        handle.master = self
        self.maps[sub_id] = handle
        self.by_chunk.setdefault(chunk_id, []).append(sub_id)
        return handle

    def cancel(self, handle: MapHandle) -> None:
        if handle.map_id in self.maps:
            self.worker.transport.send(0, Kind.SUBCANCEL, handle.map_id)

    def chunk_done(self, chunk_id: int) -> None:
        """The task of a chunk has ended: its nested maps are dropped here (the master cancels those still open)."""
        for sub_id in self.by_chunk.pop(chunk_id, ()):
            self.maps.pop(sub_id, None)

    def receive(self, message: SubResult) -> None:
        handle = self.maps.get(message.sub_id)
        if handle is None:  # its task has ended
            return
        if message.chunk is not None:
            handle.deliver(message.chunk)
        if message.end:
            del self.maps[message.sub_id]
            error = message.error.exception() if message.error is not None else None
            handle.finish(error=error, cancelled=message.cancelled)

    def drive(self, cond: threading.Condition, timeout) -> None:
        """Called by a waiting task's handle: one step of serving (a message, or a chunk evaluated here)."""
        cond.release()
        try:
            if self.worker.stopping:  # the master said STOP: no result will ever come
                for handle in self.maps.values():
                    handle.finish(cancelled=True)
                self.maps.clear()
            else:
                self.worker.step(waiting=True)
        finally:
            cond.acquire()

    @contextmanager
    def signals_between_turns(self):
        yield _nothing


def _nothing() -> None:
    """A worker rank holds no signals for its waiting tasks."""


# -- on the master --------------------------------------------------------------------------------------------------
class RemoteHandle(MapHandle):
    """A nested map on the master: its results go to the rank whose task asked for it, not to a local reader."""

    nested = True

    def __init__(self, master, rank: int, sub: SubMap, parent_map: int):
        super().__init__(sub.function, sub.args, chunksize=sub.chunksize, priority=sub.priority, ordered=False,
                         policy=sub.policy, keys=range(len(sub.args)) if sub.seeded else None)
        self.rank, self.sub_id, self.parent_chunk, self.parent_map = rank, sub.sub_id, sub.parent, parent_map
        self._master = master

    def _send(self, message: SubResult) -> None:
        if self.rank not in self._master.lost:
            self._master.transport.send(self.rank, Kind.SUBRESULT, message)

    def deliver(self, result) -> None:
        self.done += result.stop - result.start - len(result.skip)
        self._send(SubResult(self.sub_id, chunk=result))

    def finish(self, error: BaseException | None = None, cancelled: bool = False) -> None:
        self.finished = True
        self._send(SubResult(self.sub_id, end=True, cancelled=cancelled,
                             error=None if error is None else Failure.from_exception(error)))


class MasterNesting:
    """The master's record of nested maps: which task opened each, and what ends them."""

    def __init__(self, master):
        self.master = master
        self.maps: dict[int, RemoteHandle] = {}  # map_id -> nested map, while open

    def open(self, rank: int, sub: SubMap) -> None:
        """A task asked for a nested map: schedule it above its parent map, and park the task's chunk."""
        master = self.master
        chunk = master.scheduler.ranks[rank].in_flight.get(sub.parent)
        parent = master._handles.get(chunk.map_id) if chunk is not None else None
        handle = RemoteHandle(master, rank, sub, None if chunk is None else chunk.map_id)
        if parent is None:  # its task's chunk is gone (its map cancelled, or another copy came first)
            handle.finish(cancelled=True)
            return
        if isinstance(sub.args, UnloadableArgs):
            handle.finish(error=sub.args.failure.exception())
            return
        handle.priority = parent.priority + 1 + sub.priority
        handle.map_id = next(master._map_ids)
        handle.master = master
        self.maps[handle.map_id] = handle
        master.scheduler.park(rank, sub.parent)
        master._add(handle)

    def cancel(self, rank: int, sub_id: int) -> None:
        """The task dropped a nested map (closed its iterator, cancelled its future)."""
        for handle in list(self.maps.values()):
            if handle.rank == rank and handle.sub_id == sub_id:
                self.master._cancel(handle)

    def ended(self, map_id: int) -> None:
        """A map has ended: if nested, its task runs again once it has no other open (the scheduler counts it if it
        is on top of its rank's stack); maps nested under it are cancelled."""
        handle = self.maps.pop(map_id, None)
        if handle is not None and not any(h.rank == handle.rank and h.parent_chunk == handle.parent_chunk
                                          for h in self.maps.values()):
            self.master.scheduler.resume(handle.rank, handle.parent_chunk)
        self._cancel_where(lambda h: h.parent_map == map_id)

    def chunk_done(self, rank: int, chunk_id: int) -> None:
        """A task's chunk came back: what it opened and left open is cancelled."""
        if self.maps:  # every result passes here: nothing to build when no map is nested
            self._cancel_where(lambda h: h.rank == rank and h.parent_chunk == chunk_id)

    def rank_lost(self, rank: int) -> None:
        """A rank was lost or retired: the nested maps its tasks were waiting on are cancelled (the tasks run again)."""
        self._cancel_where(lambda h: h.rank == rank)

    def _cancel_where(self, condition) -> None:
        for handle in [h for h in self.maps.values() if condition(h)]:
            self.master._cancel(handle)


# -- in a pool of one process -------------------------------------------------------------------------------------
class SerialPool:
    """Nested calls in a pool of one process: evaluated in place, in the calling task (options are checked)."""

    def pool(self, chunk_id, function) -> "SerialPool":
        return self

    def map(self, fn, *iterables, timeout=None, chunksize=None, priority=0, seed=None, **options):
        seed = None if seed is None else seeds.check_seed(seed)
        points = self._points(iterables, chunksize, priority, options)
        return (_in_stream(seed, i, fn, point) for i, point in enumerate(points))

    def imap_unordered(self, fn, *iterables, timeout=None, chunksize=None, priority=0, indexed=False, seed=None,
                       **options):
        seed = None if seed is None else seeds.check_seed(seed)
        for i, point in enumerate(self._points(iterables, chunksize, priority, options)):
            value = _in_stream(seed, i, fn, point)
            yield (i, value) if indexed else value

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(_in_stream(None, 0, functools.partial(fn, **kwargs), args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    @staticmethod
    def _points(iterables, chunksize, priority, options):
        from .pool import _check_map_options, map_settings

        if not iterables:
            raise TypeError("map() needs at least one iterable of points")
        _check_map_options(chunksize, priority)
        map_settings(options)
        return zip(*iterables)


def _in_stream(seed, index: int, fn, point):
    """``fn(*point)`` in stream ``index`` of ``seed``, or in no stream (``mpimap.rng()`` raises) without a seed."""
    saved = seeds._current
    if seed is None:
        seeds._leave(None)
    else:
        seeds._enter(seed, index)
    try:
        return fn(*point)
    finally:
        seeds._leave(saved)
