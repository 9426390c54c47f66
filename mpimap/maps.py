"""One map in flight: its points, its results as they arrive, and the ways to wait for them.

The master thread fills a :class:`MapHandle` (``deliver``, ``finish``); the
caller's thread reads it, in input order (``ordered``) or chunk by chunk as
results arrive (``chunks``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field

from .protocol import SCALARS

ON_ERROR = ("raise", "record")


@dataclass(frozen=True)
class Policy:
    """What a map does with failed points."""

    on_error: str = "raise"  # raise: the map raises at the point; record: the failure is its result
    retries: int = 0  # further attempts for a point whose function raised
    quarantine: int = 2  # attempts after which a crashed or timed-out point is failed for good
    verify: float = 0.0  # fraction of good points evaluated once more on another host, to compare

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, not {self.on_error!r}")
        if not 0.0 <= self.verify <= 1.0:
            raise ValueError("verify must be a fraction between 0 and 1")
        if self.retries < 0 or self.quarantine < 1:
            raise ValueError("retries must be >= 0 and quarantine >= 1")

    def limit(self, failure) -> int:
        """How many attempts a point with this failure gets in all."""
        return 1 + self.retries if failure.status == "failed" else self.quarantine


@dataclass
class ChunkResult:
    """The results of points ``start .. stop-1`` of a map, as one rank returned them."""

    start: int
    stop: int
    values: object  # list, or a numpy array when the map packs its values
    failures: dict  # offset within the chunk -> Failure
    durations: object  # float64 array of seconds per point
    rank: int
    skip: frozenset = frozenset()  # offsets whose failure earned another attempt: their result comes later
    attempts: dict = field(default_factory=dict)  # offset -> attempts made, where more than one
    logs: dict = field(default_factory=dict)  # offset -> captured log text, where kept
    host: str | None = None  # the node of the rank that evaluated them

    def offsets(self):
        """Offsets of the points this chunk delivers."""
        return [k for k in range(self.stop - self.start) if k not in self.skip] if self.skip else \
            range(self.stop - self.start)

    def delivered(self) -> "ChunkResult":
        """This chunk without the points that went to another attempt (offsets renumbered): what to store."""
        if not self.skip:
            return self
        keep = self.offsets()
        new = {k: i for i, k in enumerate(keep)}
        return ChunkResult(self.start, self.stop, [self.values[k] for k in keep],
                           {new[k]: f for k, f in self.failures.items()}, self.durations[keep], self.rank,
                           frozenset(), {new[k]: n for k, n in self.attempts.items() if k in new},
                           {new[k]: t for k, t in self.logs.items() if k in new}, self.host)


class MapHandle:
    """A map submitted to the master; thread-safe between the master and one reading thread."""

    nested = False  # a map opened by a task on a worker (nested.RemoteHandle)

    def __init__(self, function: bytes, args, *, chunksize=None, priority=0, ordered=True, futures=None,
                 policy: Policy = Policy(), keys=None, group=None):
        self.function = function  # the pickled protocol.MapFunction
        self.args = args  # a sequence (list or numpy array) sliced into chunks
        self.keys = keys  # the stream index of each point (a map with a seed: see mpimap.seeds), else None
        self.size = len(args)
        self.chunksize = chunksize
        self.priority = priority
        # A batch of submit() calls: one future per point; calls join it until the master takes it (seal).
        self.futures = futures
        self.sealed = futures is None
        self.policy = policy
        self.group = group  # a groups.GroupSpec for a map of k-rank tasks, else None
        self.attempts: dict[int, int] = {}  # point index -> attempts made so far, where more than one
        self.failed_on: dict[int, str] = {}  # point index -> host of its last failed attempt, while retried
        self.verifying: dict[int, tuple] = {}  # point index -> (first value, its host), while re-evaluated
        self.map_id = None  # set by the master
        self.master = None
        self.done = 0
        self.finished = False
        self.cancelled = False
        self.error: BaseException | None = None  # the master failed, or this map could not be sent
        self._cond = threading.Condition()
        self._ordered = ordered
        if ordered:
            self._values = [None] * self.size
            self._failures = {}
            self._ready = bytearray(self.size)
        else:
            self._chunks = deque()

    # -- batches of submit() calls ----------------------------------------------
    def join(self, args, future, key=None) -> bool:
        """Add one call to this batch (caller side; ``key``: its stream index, with a seed); False if the master
        has taken the batch already."""
        with self._cond:
            if self.sealed:
                return False
            self.args.append(args)
            self.futures.append(future)
            if self.keys is not None:
                self.keys.append(key)
            return True

    def seal(self) -> None:
        """The master takes the batch: its size is final."""
        with self._cond:
            self.sealed = True
            self.size = len(self.args)
            self._started = bytearray(self.size)  # calls whose future was told it runs (or that it was cancelled)

    def start_calls(self, start: int, stop: int) -> list[int]:
        """Offsets of the calls ``start .. stop-1`` of a batch to evaluate now; the others were cancelled.

        Each future hears ``set_running_or_notify_cancel`` exactly once, the
        first time its call leaves (``concurrent.futures.wait`` counts a
        cancelled future only then); a call sent again (a retry) is live while
        its future runs, and a verification run of a settled call is live too.
        """
        live = []
        futures = self.futures
        for k in range(start, stop):
            future = futures[k]
            if k in self.verifying:
                live.append(k - start)
            elif not self._started[k]:
                self._started[k] = 1
                if future.set_running_or_notify_cancel():
                    live.append(k - start)
                else:
                    futures[k] = None  # cancelled: the batch lets go of it
            elif future is not None and future.running():
                live.append(k - start)
        return live

    def _settle(self, result: ChunkResult) -> None:
        """Set the futures of a batch's chunk (outside the lock: their callbacks run here), then let go of them."""
        futures, failures, values = self.futures, result.failures, result.values
        for offset in result.offsets():
            future = futures[result.start + offset]
            if future is None or future.done():  # cancelled before it ran
                continue
            futures[result.start + offset] = None  # the caller alone keeps the future and its result alive
            if offset in failures:
                future.set_exception(failures[offset].exception())
            else:
                future.set_result(values[offset])

    # -- master side -------------------------------------------------------------
    def deliver(self, result: ChunkResult) -> None:
        if self.futures is not None:
            self._settle(result)
        with self._cond:
            if self.futures is None:  # a batch keeps nothing: its futures hold the results
                self._store(result)
            self.done += result.stop - result.start - len(result.skip)
            self._cond.notify_all()

    def _store(self, result: ChunkResult) -> None:
        if self._ordered:
            self._values[result.start:result.stop] = result.values
            for offset, failure in result.failures.items():
                self._failures[result.start + offset] = failure
            self._ready[result.start:result.stop] = b"\x01" * (result.stop - result.start)
            for offset in result.skip:
                self._ready[result.start + offset] = 0
        else:
            self._chunks.append(result)

    def finish(self, error: BaseException | None = None, cancelled: bool = False) -> None:
        if self.futures is not None:
            self._settle_rest(error)  # before ``finished``: whoever waits for that sees every future done
        with self._cond:
            self.finished = True
            self.error = error
            self.cancelled = cancelled
            self._cond.notify_all()

    def _settle_rest(self, error: BaseException | None) -> None:
        """Give the batch's futures still open their outcome (a cancelled one is notified, so wait() sees it)."""
        if not self.sealed:  # a batch the master never took (closed meanwhile)
            self.seal()
        for k, future in enumerate(self.futures):
            if not self._started[k]:  # never sent: it fails or is cancelled, and its waiters hear of it
                self._started[k] = 1
                if error is None:
                    future.cancel()
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)
            elif future is not None and future.running():  # sent, and will never complete now
                future.set_exception(error or CancelledError("the call was cancelled"))

    # -- caller side -------------------------------------------------------------
    def cancel(self) -> None:
        """Drop the map's queued points and abandon its in-flight ones."""
        if not self.finished and self.master is not None:
            self.master.cancel(self)

    def _wait(self, ready, deadline) -> None:
        """Wait, under the lock, until ``ready()`` or the map ends; TimeoutError after ``deadline``."""
        if ready():
            return
        master = self.master
        if master is None or not master.drivable:
            self._wait_for(ready, deadline, lambda timeout: self._cond.wait(timeout))
            return
        with master.signals_between_turns() as deliver:
            def drive(timeout):
                master.drive(self._cond, timeout)  # run the master loop here: no hand-off between threads
                deliver()

            self._wait_for(ready, deadline, drive)

    def _wait_for(self, ready, deadline, wait) -> None:
        while not ready():
            if self.error is not None:
                raise self.error
            if self.cancelled:
                raise CancelledError("the map was cancelled")
            if self.finished:
                return
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise TimeoutError(f"map results not ready: {self.done} of {self.size} points done")
            wait(timeout)

    def ordered(self, deadline: float | None = None):
        """An iterator of the values in input order; it raises a point's exception when its turn comes."""
        return primed(self._in_order(deadline))

    def _in_order(self, deadline):
        i, n = 0, self.size
        try:
            yield  # where primed leaves it
            while i < n:
                with self._cond:
                    self._wait(lambda: self._ready[i], deadline)
                    end = self._ready.find(0, i)
                    end = n if end < 0 else end
                    if end == i:  # finished without this point: only a cancelled or failed master
                        raise self.error or CancelledError("the map was cancelled")
                values, failures = self._values, self._failures
                if (not failures or not any(j in failures for j in range(i, end))) and \
                        SCALARS.issuperset(map(type, values[i:end])):
                    # Values whose lifetime nobody can observe (not weak-referable): yield them at C speed.
                    run = values[i:end]
                    values[i:end] = itertools.repeat(None, end - i)
                    i = end
                    yield from run
                    continue
                record = self.policy.on_error == "record"
                for j in range(i, end):
                    if failures and j in failures:
                        if not record:
                            raise failures[j].exception()
                        values[j] = failures[j].exception()
                    i = j + 1
                    yield _take(values, j)  # not held by a local: the caller alone keeps it alive
        finally:
            if i < n:
                self.cancel()

    def chunks(self, deadline: float | None = None):
        """An iterator of :class:`ChunkResult` objects in the order they arrive."""
        return primed(self._chunks_as_they_come(deadline))

    def _chunks_as_they_come(self, deadline):
        taken = 0
        try:
            yield  # where primed leaves it
            while taken < self.size:
                with self._cond:
                    self._wait(lambda: self._chunks, deadline)
                    if not self._chunks:
                        raise self.error or CancelledError("the map was cancelled")
                    result = self._chunks.popleft()
                taken += result.stop - result.start - len(result.skip)
                yield result
        finally:
            if taken < self.size:
                self.cancel()


def primed(generator):
    """``generator`` run to its first ``yield``, inside its ``try``: closing or dropping it before its first item
    then runs its ``finally`` (which cancels the rest of the map), as it does after any item."""
    next(generator)
    return generator


def _take(values: list, j: int):
    """``values[j]``, leaving None in its place."""
    value, values[j] = values[j], None
    return value
