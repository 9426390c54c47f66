"""The master loop: rank 0's thread that turns scheduler decisions into messages and results into handles.

All MPI traffic of rank 0 happens in this one thread; the caller's threads
talk to it through a command queue (``submit``, ``cancel``, ``close``) and
read results from the :class:`~mpimap.maps.MapHandle` objects it fills.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .maps import ChunkResult, MapHandle
from .protocol import Kind, Result, Task
from .scheduler import Scheduler
from .transport import Transport, Waiter
from .worker import Evaluator, load_function

log = logging.getLogger("mpimap.master")
DEFAULT_RANK_TIMEOUT = 60.0  # seconds without a word from a rank before it is declared lost
DEFAULT_HOST_FAILURES = 3  # points failed on a host and succeeded elsewhere before the host is retired
IDLE_WAIT = 0.02  # seconds an idle master (no maps) sleeps between polls for heartbeats


@dataclass
class RankInfo:
    """What a worker rank told the master about itself."""

    host: str | None = None
    pid: int | None = None


class Master:
    """Dispatches maps to the worker ranks of ``comm`` (rank 0 is this one)."""

    def __init__(self, comm=None, *, stop_workers: bool = True, rank_timeout: float | None = DEFAULT_RANK_TIMEOUT,
                 stall_timeout: float | None = None, host_failures: int | None = DEFAULT_HOST_FAILURES):
        self.transport = Transport(comm) if comm is not None else None
        ranks = self._worker_ranks()
        self.scheduler = Scheduler(ranks, now=time.monotonic())
        self.ranks = {r: RankInfo() for r in ranks}
        self.stop_workers = stop_workers
        self.rank_timeout = rank_timeout  # seconds of silence after which a rank is lost (None: never)
        self.lost: set[int] = set()  # ranks declared lost: never sent to again, their messages dropped
        self.stall_timeout = stall_timeout  # warn when a busy rank returns nothing for this long
        self._stalled: set[int] = set()  # ranks warned about, until they return something
        self.host_failures = host_failures  # failures disproved elsewhere before a host is retired
        self.host_strikes: dict[str, int] = {}
        self.retired: set[int] = set()  # alive, but given no more work: their host kept failing
        self.verification: list = []  # (map_id, index, first host, second host, same result)
        self._last_check = 0.0
        self.error: BaseException | None = None
        self._handles: dict[int, MapHandle] = {}
        self._holders: dict[int, set] = {}  # map_id -> ranks that hold its function
        self._inbox: deque = deque()
        self._map_ids = itertools.count()
        self._closing = False
        self._chunk_seconds = 0.0  # moving average of how long a chunk takes to evaluate
        self._wake = threading.Event()  # set with every command: an idle master waits on it
        self._thread = threading.Thread(target=self._run, name="mpimap-master", daemon=True)
        self._thread.start()

    def _worker_ranks(self):
        return range(1, self.transport.size)

    # -- called from the caller's threads ----------------------------------------
    def submit(self, handle: MapHandle) -> MapHandle:
        if self.error is not None:
            raise RuntimeError("the mpimap master has failed") from self.error
        if self._closing:
            raise RuntimeError("cannot submit to a pool that has been shut down")
        handle.map_id = next(self._map_ids)
        handle.master = self
        self._command("add", handle)
        return handle

    def cancel(self, handle: MapHandle) -> None:
        self._command("cancel", handle)

    def set_log_level(self, level: int, ranks) -> None:
        """Change the log level of worker ranks (an iterable of ranks, or None for all) while they run."""
        self._command("level", (level, None if ranks is None else list(ranks)))

    def _command(self, name: str, handle) -> None:
        self._inbox.append((name, handle))
        self._wake.set()

    def close(self) -> None:
        """Cancel what is left, stop the workers if this master owns them, and end the thread."""
        self._closing = True
        self._command("close", None)
        self._thread.join()

    def status(self) -> list[dict]:
        """One row per worker rank: host, pid, chunks in flight, points done, busy time, seconds since last heard."""
        now = time.monotonic()
        return [
            dict(rank=r, host=info.host, pid=info.pid, in_flight=len(s.in_flight), points_done=s.points_done,
                 busy_seconds=s.busy_seconds, last_heard=now - s.last_heard, lost=r in self.lost,
                 retired=r in self.retired)
            for (r, info), s in zip(self.ranks.items(), self.scheduler.ranks.values())
        ]

    # -- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        waiter = Waiter(window=5e-5, hot_window=5e-3)
        try:
            while True:
                while self._inbox:
                    command, handle = self._inbox.popleft()
                    if command == "close":
                        return
                    getattr(self, "_" + command)(handle)
                self._dispatch()
                if self.rank_timeout is not None or self.stall_timeout is not None:
                    self._check_silence()
                if self._receive():
                    waiter.activity()
                elif not self._handles:
                    # Nothing to do but hear heartbeats: a command wakes us at once.
                    self._wake.wait(IDLE_WAIT)
                    self._wake.clear()
                else:
                    waiter.cap = self._sleep_cap()
                    waiter.idle()
        except BaseException as exc:  # the master must never die silently: every waiter hears of it
            log.exception("mpimap master failed")
            self.error = exc
        finally:
            for handle in list(self._handles.values()):
                handle.finish(error=self.error, cancelled=self.error is None)
            self._handles.clear()
            self._shutdown_workers()

    def _sleep_cap(self) -> float:
        """The longest nap between polls: 1 ms, up to 20 ms while long chunks are in flight.

        Every rank has a chunk queued behind the one it evaluates, so a result
        noticed a fifth of a chunk late costs no worker any time, and every
        wake-up costs ~100 µs of CPU on a VM whatever the nap: long chunks
        earn long naps.
        """
        return min(20e-3, max(1e-3, self._chunk_seconds / 5))

    def _level(self, request) -> None:
        level, ranks = request
        for rank in self.ranks if ranks is None else ranks:
            if rank in self.ranks and rank not in self.lost and self.transport is not None:
                self.transport.send(rank, Kind.LEVEL, level)

    def _check_silence(self) -> None:
        """Declare lost the ranks not heard from for ``rank_timeout``; their chunks go to the others."""
        now = time.monotonic()
        if now - self._last_check < 0.1:
            return
        self._last_check = now
        for rank in self.scheduler.silent_ranks(now, self.rank_timeout) if self.rank_timeout else ():
            info = self.ranks[rank]
            log.warning("rank %d (%s, pid %s) silent for %.1f s: declared lost, its work goes to other ranks",
                        rank, info.host, info.pid, now - self.scheduler.ranks[rank].last_heard)
            self.scheduler.lose_rank(rank)
            self.lost.add(rank)
        if self.stall_timeout:
            stalled = set(self.scheduler.stalled_ranks(now, self.stall_timeout))
            for rank in stalled - self._stalled:
                log.warning("rank %d (%s) is alive but has returned nothing for %.1f s: a point may be stuck "
                            "(isolation='process' with point_timeout stops such points)", rank,
                            self.ranks[rank].host, self.stall_timeout)
            self._stalled = stalled

    def _add(self, handle: MapHandle) -> None:
        self._handles[handle.map_id] = handle
        self._holders[handle.map_id] = set()
        self.scheduler.add_map(handle.map_id, handle.size, chunksize=handle.chunksize, priority=handle.priority)
        if handle.size == 0:
            self._end_map(handle)

    def _cancel(self, handle: MapHandle) -> None:
        if self._handles.get(handle.map_id) is handle:
            self._end_map(handle, cancelled=True)

    def _end_map(self, handle: MapHandle, cancelled: bool = False) -> None:
        self.scheduler.remove_map(handle.map_id)
        del self._handles[handle.map_id]
        for rank in self._holders.pop(handle.map_id):
            self.transport.send(rank, Kind.FORGET, handle.map_id)
        handle.finish(cancelled=cancelled)

    def _claim(self, chunk) -> MapHandle | None:
        """The handle a chunk belongs to, as it leaves; None if its future was cancelled while queued."""
        handle = self._handles.get(chunk.map_id)
        if handle is not None and handle.future is not None and not handle.future.set_running_or_notify_cancel():
            self._end_map(handle, cancelled=True)
            return None
        return handle

    def _dispatch(self) -> None:
        for rank, chunk in self.scheduler.assign(time.monotonic()):
            handle = self._claim(chunk)
            if handle is None:
                continue
            holders = self._holders[chunk.map_id]
            function = None if rank in holders else handle.function
            holders.add(rank)
            self.transport.send(rank, Kind.TASK,
                                Task(chunk.chunk_id, chunk.map_id, function, handle.args[chunk.start:chunk.stop]))

    def _receive(self, limit: int = 64) -> int:
        """Handle up to ``limit`` waiting messages; return how many there were."""
        for count in range(limit):
            message = self.transport.poll()
            if message is None:
                return count
            source, kind, body = message
            now = time.monotonic()
            if source in self.lost:
                continue
            if kind is Kind.RESULT:
                self._result(source, body, now)
                self._dispatch()  # refill that rank at once
            elif kind is Kind.HELLO:
                self.ranks[source].host, self.ranks[source].pid = body.host, body.pid
                self.scheduler.heard(source, now)
            elif kind is Kind.LOG:
                # The rank already applied its own level: the record is logged whatever the master's level.
                logger = logging.getLogger(f"mpimap.rank{source}")
                logger.handle(logger.makeRecord(logger.name, body.levelno, "(worker)", 0, "[rank %d %s] %s: %s",
                                                (source, self.ranks[source].host, body.name, body.text), None))
                self.scheduler.heard(source, now)
            else:  # HEARTBEAT
                self.scheduler.heard(source, now)
        return limit

    def _result(self, rank: int, result: Result, now: float) -> None:
        values, failures = result.values, result.failures
        self._chunk_seconds += (result.seconds - self._chunk_seconds) / 8
        chunk = self.scheduler.complete(rank, result.chunk_id, result.seconds, now)
        if chunk is None:  # its map was cancelled meanwhile, or another copy came first
            return
        handle = self._handles[chunk.map_id]
        if chunk.start in handle.verifying and len(chunk) == 1:
            self._verified(handle, chunk.start, values, failures, rank)
        else:
            self._deliver(handle, chunk, values, failures, result.durations, rank, result.logs)
        if self.scheduler.map_finished(chunk.map_id):
            self._end_map(handle)

    def _deliver(self, handle, chunk, values, failures, durations, rank, logs) -> None:
        """Hand a chunk's results to its map: retry what deserves another attempt, sample points to verify."""
        attempts = {k: handle.attempts[i] for k, i in enumerate(range(chunk.start, chunk.stop))
                    if i in handle.attempts} if handle.attempts else {}
        skip = []
        for offset, failure in failures.items():
            made = attempts.get(offset, 1)
            if made < handle.policy.limit(failure):
                skip.append(offset)
                handle.attempts[chunk.start + offset] = made + 1
        if skip:
            self.scheduler.retry(chunk.map_id, [chunk.start + k for k in skip], avoid=rank)
            failures = {k: f for k, f in failures.items() if k not in skip}
            for k in skip:
                handle.failed_on[chunk.start + k] = self.ranks[rank].host
        if handle.failed_on:
            self._strike_hosts(handle, chunk, failures, skip, rank)
        handle.deliver(ChunkResult(chunk.start, chunk.stop, values, failures, durations, rank, frozenset(skip),
                                   attempts, logs))
        if handle.policy.verify:
            self._sample(handle, chunk, values, failures, skip, rank)

    def _sample(self, handle, chunk, values, failures, skip, rank) -> None:
        """Re-evaluate a sample of good points on another host, to compare (``verify=`` fraction)."""
        host = self.ranks[rank].host
        same_host = {r for r, info in self.ranks.items() if info.host == host}
        if len(same_host) == len(self.ranks):
            return  # one host: nothing to compare against
        for k in range(len(chunk)):
            index = chunk.start + k
            if k in skip or k in failures or (index * 2654435761) % 2 ** 32 >= handle.policy.verify * 2 ** 32:
                continue
            handle.verifying[index] = (values[k], host)
            self.scheduler.retry(chunk.map_id, [index], avoid=same_host)

    def _verified(self, handle, index, values, failures, rank) -> None:
        first, first_host = handle.verifying.pop(index)
        host = self.ranks[rank].host
        same = not failures and _same(first, values[0])
        self.verification.append((handle.map_id, index, first_host, host, same))
        if not same:
            log.warning("point %d: verification mismatch: %r on %s, %r on %s", index, first, first_host,
                        None if failures else values[0], host)

    def _strike_hosts(self, handle, chunk, failures, skip, rank) -> None:
        """A point that failed on one host and now succeeded on another is a strike against the first host."""
        host = self.ranks[rank].host
        for k in range(len(chunk)):
            index = chunk.start + k
            if k in skip or index not in handle.failed_on:
                continue
            bad = handle.failed_on.pop(index)
            if k in failures:  # it failed everywhere: the point's fault, not the host's
                continue
            if bad == host:
                continue
            self.host_strikes[bad] = self.host_strikes.get(bad, 0) + 1
            if self.host_failures and self.host_strikes[bad] >= self.host_failures:
                self._retire_host(bad)

    def _retire_host(self, host: str) -> None:
        ranks = [r for r, info in self.ranks.items() if info.host == host and not self.scheduler.ranks[r].lost]
        others = [r for r, info in self.ranks.items() if info.host != host and not self.scheduler.ranks[r].lost]
        if not ranks or not others:  # never retire the last healthy capacity
            return
        log.warning("host %s: %d points failed there and succeeded elsewhere: its ranks %s get no more work",
                    host, self.host_strikes[host], ranks)
        for r in ranks:
            self.scheduler.lose_rank(r)
            self.retired.add(r)

    def _shutdown_workers(self) -> None:
        if self.stop_workers:
            for rank in self.ranks:
                if rank not in self.lost:
                    self.transport.send(rank, Kind.STOP)
        self.transport.flush(timeout=1.0 if self.lost else 10.0)


def _same(a, b) -> bool:
    """Whether two results of one point agree (exactly: numbers bit for bit, arrays element by element)."""
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return a == b


class InlineMaster(Master):
    """The same loop without MPI: evaluates every chunk itself (a pool of one process)."""

    def __init__(self):
        self._evaluator = Evaluator()
        self._functions = {}  # map_id -> its MapFunction (or the Failure of loading it)
        super().__init__(rank_timeout=None)
        self.ranks[0].host, self.ranks[0].pid = socket.gethostname(), os.getpid()

    def _worker_ranks(self):
        return [0]

    def _dispatch(self) -> None:
        for rank, chunk in self.scheduler.assign(time.monotonic()):
            handle = self._claim(chunk)
            if handle is None:
                continue
            if chunk.map_id not in self._functions:
                self._functions = {chunk.map_id: load_function(handle.function)}
            t0 = time.perf_counter()
            out = self._evaluator.run(chunk.map_id, handle.function, self._functions[chunk.map_id],
                                      handle.args[chunk.start:chunk.stop])
            self._result(rank, Result(chunk.chunk_id, out.values, out.failures, out.durations,
                                      time.perf_counter() - t0, out.logs), time.monotonic())

    def _receive(self, limit: int = 64) -> int:
        return 1 if self._handles else 0

    def _shutdown_workers(self) -> None:
        self._evaluator.close()
