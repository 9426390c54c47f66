"""The public face: :class:`Pool`, a ``concurrent.futures.Executor`` over MPI ranks."""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import logging
import numbers
import pickle
import threading
import time
import weakref
from concurrent.futures import Executor, Future

import numpy as np

from . import groups, nested, shared, world
from .isolation import Isolation
from .maps import MapHandle, Policy, primed
from .master import DEFAULT_HOST_FAILURES, DEFAULT_RANK_TIMEOUT, InlineMaster, Master, RanksLostError
from .pointlogs import PointLogs
from .protocol import MapFunction
from .seeds import check_keys, check_seed
from .worker import is_period, serve

try:  # optional: sends lambdas, closures and functions of __main__ by value
    import cloudpickle
except ImportError:
    cloudpickle = None

ISOLATION_OPTIONS = ("isolation", "point_timeout", "max_points", "max_memory_mb", "scratch")
POLICY_OPTIONS = ("on_error", "retries", "quarantine", "verify")
LOG_OPTIONS = ("keep_logs", "slow_seconds", "debug_rerun")
MAP_OPTIONS = ISOLATION_OPTIONS + POLICY_OPTIONS + LOG_OPTIONS


class Pool(Executor):
    """Maps functions over points on the worker ranks of an MPI communicator.

    * Under ``mpiexec -n N python -m mpimap SCRIPT.py``, ``Pool()`` on rank 0
      uses the N-1 other ranks, which serve for the whole script.
    * Inside an MPI program, every rank of ``comm`` (default ``COMM_WORLD``)
      calls ``Pool(comm)``: rank 0 gets the pool; the other ranks serve until
      rank 0 shuts it down, then get a pool whose ``is_master`` is False
      (``with Pool(comm) as pool:`` gives them ``None``).
    * In a single process (no mpiexec), points are evaluated in-process, in a
      thread of the pool.

    The keyword options set the pool's defaults for isolation, timeouts,
    failure policy and point logs; each map can override them
    (``pool.map(f, xs, isolation="process", point_timeout=60)``).  What each
    one does: docs/resilience.rst.  ``seed`` gives every map (and every
    ``submit`` call) reproducible random streams, one per point, which the
    function reaches with :func:`mpimap.rng` (docs/random.rst).
    ``initializer(*initargs)`` runs once in every process that evaluates this
    pool's points, before its first one (docs/state.rst).
    """

    def __init__(self, comm=None, *, heartbeat: float | None = None, rank_timeout=DEFAULT_RANK_TIMEOUT,
                 stall_timeout=None, host_failures=DEFAULT_HOST_FAILURES,
                 isolation: str = "rank", point_timeout=None, max_points=None, max_memory_mb=None,
                 scratch: bool = False, on_error: str = "raise", retries: int = 0, quarantine: int = 2,
                 verify: float = 0.0,
                 keep_logs=None, slow_seconds: float = 1.0, debug_rerun: bool = False, seed: int | None = None,
                 initializer=None, initargs=()):
        if heartbeat is not None and not is_period(heartbeat):
            raise ValueError(f"heartbeat must be a positive number of seconds, not {heartbeat!r}")
        self._seed = None if seed is None else check_seed(seed)
        self._calls = itertools.count()  # submit() calls so far: a call's number is its stream index
        self._init = shared.new_init(initializer, initargs)
        _check_sendable(self._init)  # on every rank of Pool(comm) alike, before anything collective
        self._shares: list = []  # weakref.finalize of each handle of share(): run at shutdown at the latest
        self._isolation = Isolation(isolation, point_timeout, max_points, max_memory_mb, scratch)
        self._policy = Policy(on_error, retries, quarantine, verify)
        self._logs = PointLogs(keep_logs, slow_seconds, debug_rerun)
        self._handles = weakref.WeakSet()  # this pool's maps that still exist (the master holds the open ones)
        self._verify_maps: set[int] = set()  # maps with verify=: their entries make up verification()
        self._verification: list = []  # the master's record of verified points, kept for after shutdown
        self._batch = None  # (function, weak reference to the handle) of the latest batch of submit() calls
        self._batch_lock = threading.Lock()
        self._own_master = True
        self._comm = None
        nested.register(self)  # outside a task, mpimap.current_pool() is the latest open pool
        if comm is None and world.active():
            self._master = world.master()
            self._master.rank_timeout = rank_timeout
            self._master.stall_timeout = stall_timeout
            self._master.host_failures = host_failures
            self._own_master = False
            self._verification = self._master.verification
            return
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            self._master = InlineMaster()
            self._verification = self._master.verification
            return
        self._comm = comm.Dup()  # keep our traffic apart from the program's own
        if self._comm.Get_rank() == 0:
            self._master = Master(self._comm, rank_timeout=rank_timeout, stall_timeout=stall_timeout,
                                  host_failures=host_failures, free_comm=True)
            self._verification = self._master.verification
        else:
            self._master = None
            serve(self._comm, heartbeat)
            self._comm.Free()
            self._comm = None

    @property
    def is_master(self) -> bool:
        """True on the rank that submits work; False on a worker rank that has finished serving."""
        return self._master is not None

    @property
    def size(self) -> int:
        """The number of processes that evaluate points."""
        return len(self._live_master().ranks) if self.is_master else 0

    def __enter__(self):
        return self if self.is_master else None

    def __exit__(self, exc_type, exc, tb):
        # Leaving the block on an exception abandons the work still queued, as a caller would expect.
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False

    def _live_master(self):
        if self._master is None:
            raise RuntimeError("this pool is closed, or this rank is a worker: only the master rank submits work")
        return self._master

    def _submit_map(self, fn, args, *, star: bool, pack: bool = False, chunksize=None, priority=0,
                    ordered=True, futures=None, options=None, seed=None, keys=None) -> MapHandle:
        """Submit a map; with a seed (the map's, else the pool's) point ``k`` draws from stream ``keys[k]``
        (default ``k``)."""
        master = self._live_master()
        _check_map_options(chunksize, priority)
        options, group = groups.split_options(options or {}, self._isolation, chunksize)
        isolation, policy, logs = self._settings(options)
        seed = self._seed if seed is None else check_seed(seed)
        keys = None if seed is None else range(len(args)) if keys is None else keys
        handle = MapHandle(_pickle_function(fn, star, pack, isolation, logs, seed, self._init), args,
                           chunksize=chunksize, priority=priority, ordered=ordered, futures=futures, policy=policy,
                           keys=keys, group=group)
        master.submit(handle)
        self._handles.add(handle)  # only once submitted: shutdown waits for what the master holds
        if policy.verify:
            self._verify_maps.add(handle.map_id)
        return handle

    def _settings(self, options: dict):
        if not options:
            return self._isolation, self._policy, self._logs
        return map_settings(options, self._isolation, self._policy, self._logs)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Evaluate ``fn(*args, **kwargs)`` on a worker; return its ``concurrent.futures.Future``.

        Calls of one function submitted while the master is busy join one batch,
        which travels in chunks like a map's points: a submit costs about what a
        point of a map costs.  In a pool with a seed, the ``n``-th call (from 0)
        draws from stream ``n`` of that seed.
        """
        future = _DrivenFuture(self._live_master())
        call = functools.partial(fn, **kwargs) if kwargs else fn
        with self._batch_lock:
            key = next(self._calls)
            batch = self._batch and self._batch[1]()
            if batch is not None and self._batch[0] is call and batch.join(args, future, key):
                return future
            handle = self._submit_map(call, [args], star=True, futures=[future], keys=[key])
            self._batch = (call, weakref.ref(handle))  # the master holds it while it is open
        return future

    def map(self, fn, *iterables, timeout=None, chunksize=None, priority=0, seed=None, **options):
        """Like ``Executor.map``: results in input order, lazily; ``timeout`` bounds the whole iteration.

        ``chunksize=None`` sizes chunks from the measured cost of a point.  A
        point whose evaluation raised re-raises that exception here, with the
        worker's traceback as its ``__cause__`` (with ``on_error="record"`` the
        exception is yielded as that point's result instead); closing the
        iterator early cancels the points not yet evaluated.  ``options``
        override the pool's isolation and failure policy for this map;
        ``ranks_per_task=k`` runs each point on k ranks at once, with
        ``mpimap.task_comm()`` their communicator (docs/mpi-tasks.rst).
        ``seed`` (default: the pool's) gives point ``i`` the random stream
        :func:`mpimap.rng` returns there, the same as ``mpimap.point_rng(seed, i)``.
        """
        handle = self._map_handle(fn, iterables, chunksize, priority, ordered=True, options=options, seed=seed)
        return handle.ordered(_deadline(timeout))

    def imap_unordered(self, fn, *iterables, timeout=None, chunksize=None, priority=0, indexed=False, seed=None,
                       **options):
        """Yield results as they arrive, in no particular order (``(index, value)`` pairs if ``indexed``)."""
        handle = self._map_handle(fn, iterables, chunksize, priority, ordered=False, options=options, seed=seed)
        return _unordered(handle, _deadline(timeout), indexed)

    def imap_chunks(self, fn, points, *, timeout=None, chunksize=None, priority=0, seed=None, keys=None,
                    **options):
        """Yield :class:`~mpimap.maps.ChunkResult` objects as chunks finish: the streaming interface.

        Values of a chunk come back as one numpy array when they are all
        numbers (or arrays of one shape); failures and per-point durations
        come with them.  This is what ``mpimap run`` writes to its results file.
        With a ``seed``, ``keys`` (one non-negative integer per point; default
        0, 1, ...) are the points' stream indices: mapping some rows of a
        table with ``keys=rows`` gives each the stream it has in the whole table.
        """
        keys = None if keys is None else check_keys(keys, len(points))
        handle = self._submit_map(fn, points, star=False, pack=True, chunksize=chunksize, priority=priority,
                                  ordered=False, options=options, seed=seed, keys=keys)
        return handle.chunks(_deadline(timeout))

    def _map_handle(self, fn, iterables, chunksize, priority, ordered, options, seed):
        if not iterables:
            raise TypeError("map() needs at least one iterable of points")
        if len(iterables) == 1:
            points = iterables[0]
            args = points if isinstance(points, (list, tuple, np.ndarray, range)) else list(points)
            star = False
        else:
            args, star = list(zip(*iterables)), True
        return self._submit_map(fn, args, star=star, chunksize=chunksize, priority=priority, ordered=ordered,
                                options=options, seed=seed)

    def share(self, obj) -> shared.Shared:
        """Send ``obj`` once to every worker; return a small picklable handle whose ``.value`` is ``obj`` there.

        Pass the handle with the points (``pool.map(f, [(handle, x) for x in xs], ...)``
        or ``functools.partial(f, handle)``); the function reads ``handle.value``.
        One copy per host, in shared memory: every rank and evaluation process
        of a host maps it read-only, numpy arrays as views.  The handle is
        immutable: share again for a new version.  The workers drop the object
        once the handle is garbage-collected here and the maps submitted until
        then have ended, or at :meth:`shutdown`.
        """
        master = self._live_master()
        handle, published = shared.publish(obj)
        master.share(published)
        self._shares = [f for f in self._shares if f.alive]
        self._shares.append(weakref.finalize(handle, master.unshare, published.name))
        return handle

    def status(self) -> list[dict]:
        """One row per worker rank: host, pid, chunks in flight (``in_flight``; ``chunks``: which points of which
        map each holds), points done, busy seconds, seconds since last heard, and whether it was lost or retired,
        or is stuck inside a k-rank task whose point was settled without it (docs/mpi-tasks.rst); ``frozen``:
        seconds its Python side has not moved while its native heartbeat says it is alive (docs/resilience.rst)."""
        return self._live_master().status()

    def pause(self) -> None:
        """Hand out no more points until :meth:`resume`; the points being evaluated finish and are delivered.

        (The nested maps of points being evaluated are still handed out: those points must finish.)

        Maps stay open and their iterators keep waiting; worker ranks idle (and
        keep sending heartbeats, so none is judged lost).  Under ``python -m
        mpimap`` the pools of a session share one master: pausing one pauses all.
        """
        self._live_master().pause(True)

    def resume(self) -> None:
        """Hand out points again after :meth:`pause`."""
        self._live_master().pause(False)

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` was called last (rather than :meth:`resume`)."""
        return self._live_master().paused

    def drained(self) -> bool:
        """After :meth:`pause`: whether it has taken effect and every point handed out is back (delivered)."""
        return self._live_master().drained()

    def cancel_all(self) -> None:
        """Cancel this pool's open maps and queued calls (a call already running completes); the pool stays open.

        An iterator over a cancelled map yields what had arrived, then raises
        ``concurrent.futures.CancelledError``.  Safe to call from any thread.
        """
        _cancel(list(self._handles))

    def verification(self) -> list[dict]:
        """Every point of this pool's maps verified so far (also after shutdown): the map's position of the
        point (``index``), the two hosts, and whether their results agreed."""
        return [dict(index=i, first_host=a, second_host=b, same=same)
                for map_id, i, a, b, same in self._verification if map_id in self._verify_maps]

    def set_log_level(self, level, ranks="all") -> None:
        """Change log levels while the pool runs: ``ranks`` is "all", "master", "workers", a rank or a list.

        Worker ranks send records at or above their level to the master, which
        logs them as ``mpimap.rank<N>`` with rank and host (the job's log).
        """
        level = logging._checkLevel(level.upper() if isinstance(level, str) else level)
        master = self._live_master()
        if ranks in ("all", "master"):
            logging.getLogger().setLevel(level)
        if ranks != "master":
            targets = None if ranks in ("all", "workers") else ([ranks] if isinstance(ranks, int) else ranks)
            master.set_log_level(level, targets)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what is queued; the rest still runs (``wait``: wait for it).

        With ``wait=False`` the master finishes the work in the background and
        then releases the workers; the interpreter waits for it at exit.  A
        ``Pool(comm)`` whose worker ranks were lost raises :class:`RanksLostError`
        once everything else is done (with ``wait=True``).
        """
        master, self._master = self._master, None
        if master is None:
            return
        handles = list(self._handles)
        if cancel_futures:
            _cancel(handles)
        if self._own_master:
            master.close(wait=wait)
            if wait and master.lost and self._comm is not None:
                raise RanksLostError(master.lost)
        elif wait:  # the session's master serves later pools: wait for this pool's maps only
            for handle in handles:
                with handle._cond:
                    while not handle.finished:
                        handle._cond.wait()
            for release in self._shares:  # the session's master serves on: it drops this pool's shared objects
                release()


class _DrivenFuture(Future):
    """A Future whose ``result()`` and ``exception()`` run the master loop while they wait: no thread hand-off."""

    def __init__(self, master):
        super().__init__()
        self._master = master

    def result(self, timeout=None):
        return super().result(self._drive(timeout))

    def exception(self, timeout=None):
        return super().exception(self._drive(timeout))

    def _drive(self, timeout):
        """Drive the loop until this future is done or ``timeout`` passes; return the time left of ``timeout``."""
        master = self._master
        if not master.drivable or self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition, master.signals_between_turns() as deliver:
            while not self.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return 0
                master.drive(self._condition, left)
                deliver()
        return None if deadline is None else max(0.0, deadline - time.monotonic())


def _cancel(handles) -> None:
    """Cancel maps, and the calls of batches still queued (a running call completes)."""
    for handle in handles:
        if handle.futures is None:
            handle.cancel()
        else:
            for future in list(handle.futures):
                if future is not None:
                    future.cancel()


def map_settings(options: dict, isolation: Isolation = Isolation(), policy: Policy = Policy(),
                 logs: PointLogs = PointLogs()):
    """``isolation``, ``policy`` and ``logs`` with one map's options applied (TypeError or ValueError if bad)."""
    unknown = set(options) - set(MAP_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; map options are: {', '.join(MAP_OPTIONS)}")
    iso = {("mode" if k == "isolation" else k): v for k, v in options.items() if k in ISOLATION_OPTIONS}
    pol = {k: v for k, v in options.items() if k in POLICY_OPTIONS}
    log = {("keep" if k == "keep_logs" else k): v for k, v in options.items() if k in LOG_OPTIONS}
    return (dataclasses.replace(isolation, **iso), dataclasses.replace(policy, **pol),
            dataclasses.replace(logs, **log))


def _deadline(timeout):
    return None if timeout is None else time.monotonic() + timeout


def _unordered(handle: MapHandle, deadline, indexed: bool):
    """The values of ``handle`` as they arrive (``(index, value)`` pairs if ``indexed``)."""
    return primed(_values_of(handle.chunks(deadline), handle.policy.on_error == "record", indexed))


def _values_of(chunks, record: bool, indexed: bool):
    yield  # where primed leaves it: dropping or closing this iterator drops ``chunks``, which cancels the map
    for result in chunks:
        for offset in result.offsets():
            if offset in result.failures:
                if not record:
                    raise result.failures[offset].exception()
                value = result.failures[offset].exception()
            else:
                value = result.values[offset]
            yield (result.start + offset, value) if indexed else value


def _check_map_options(chunksize, priority) -> None:
    """Per-map input is checked in the caller's thread: a bad one raises here, never in the master."""
    if chunksize is not None and (not isinstance(chunksize, numbers.Integral) or isinstance(chunksize, bool)
                                  or chunksize < 1):
        raise ValueError(f"chunksize must be a positive integer (or None: sized from the cost of a point), "
                         f"not {chunksize!r}")
    if not isinstance(priority, numbers.Real) or priority != priority:
        raise TypeError(f"priority must be a number (higher runs first), not {priority!r}")


def _pickle_function(fn, star: bool, pack: bool, isolation: Isolation, logs: PointLogs, seed=None,
                     init=None) -> bytes:
    """The map's function and settings, pickled for the workers.

    A function plain pickle cannot send (a lambda, a closure), and one the
    workers cannot import (defined under a script's ``if __name__ == "__main__":``
    in ``python -m mpimap SCRIPT``), travel by value with cloudpickle when it is installed.
    """
    settings = MapFunction(fn, star, pack, isolation, logs, seed=seed, init=init)
    blob, error = _dumps(settings, fn, None if init is None else init.fn)
    if blob is not None:
        return blob
    name = getattr(_unwrap(fn), "__qualname__", repr(fn))
    fix = "define it at the top level of a module (or of the script) the workers can import"
    if cloudpickle is None:
        fix += ", or install cloudpickle (pip install cloudpickle) to send it by value"
    raise TypeError(f"cannot send function {name} to the workers ({error}): {fix}") from None


def _check_sendable(init) -> None:
    """TypeError, naming the initializer, if it or its initargs cannot travel to the workers: said when the pool
    is made, not by every map failing to send its function.  Large buffers are not copied to find out."""
    if init is None:
        return
    blob, error = _dumps(init, init.fn, buffer_callback=lambda buffer: None)
    if blob is not None:
        return
    name = getattr(_unwrap(init.fn), "__qualname__", repr(init.fn))
    raise TypeError(f"cannot send the pool's initializer {name} and its initargs to the workers ({error}): define "
                    "the initializer at the top level of a module the workers can import, pass initargs that pickle "
                    "(plain data, numpy arrays), and build what cannot inside the initializer")


def _dumps(obj, *functions, **options) -> tuple[bytes | None, object]:
    """``obj`` pickled as the workers can load the ``functions`` in it (None: absent), and None; or None and why not.

    By reference with pickle, else by value with cloudpickle if installed; by
    value only for a function of the script's main block (the workers lack it).
    """
    picklers = [pickle, cloudpickle]
    if any(fn is not None and _guarded(fn) for fn in functions):
        picklers = [cloudpickle]
    error = "the workers import the script as a module, where its main block does not run"
    for pickler in filter(None, picklers):
        try:
            return pickler.dumps(obj, protocol=5, **options), None
        except Exception as exc:
            error = exc
    return None, error


def _unwrap(fn):
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _guarded(fn) -> bool:
    """Whether ``fn`` is a function of the script (script mode) defined under ``if __name__ == "__main__":``.

    The workers import the script as a module, so only its unguarded definitions exist there.
    """
    fn = _unwrap(fn)
    code = getattr(fn, "__code__", None)
    if not world.active() or code is None or getattr(fn, "__module__", None) != "__main__":
        return False
    return any(first <= code.co_firstlineno <= last for first, last in _main_blocks(code.co_filename))


@functools.lru_cache(maxsize=8)
def _main_blocks(path: str) -> tuple:
    """The line ranges of a script's top-level ``if __name__ == "__main__":`` blocks."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return ()
    return tuple((node.lineno, node.end_lineno) for node in tree.body if isinstance(node, ast.If)
                 and ast.unparse(node.test).replace("'", '"') in ('__name__ == "__main__"', '"__main__" == __name__'))
