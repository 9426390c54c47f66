"""The master loop: rank 0's thread that turns scheduler decisions into messages and results into handles.

All MPI traffic of rank 0 happens in this one thread; the caller's threads
talk to it through a command queue (``submit``, ``cancel``, ``close``) and
read results from the :class:`~mpimap.maps.MapHandle` objects it fills.
"""

from __future__ import annotations

import _signal
import atexit
import itertools
import logging
import os
import pickle
import signal
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import nested, shared
from .groups import timeout_failure
from .maps import ChunkResult, MapHandle
from .protocol import Kind, Result, Task
from .scheduler import Scheduler, too_wide_message
from .transport import Transport, Waiter
from .worker import Evaluator, host_name, load_function

log = logging.getLogger("mpimap.master")
DEFAULT_RANK_TIMEOUT = 60.0  # seconds without a word from a rank before it is declared lost
DEFAULT_HOST_FAILURES = 3  # points failed on a host and succeeded elsewhere before the host is retired
IDLE_WAIT = 0.02  # seconds an idle master (no maps) sleeps between polls for heartbeats
_DEFERRED_SIGNALS = (int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGUSR1))
SPIN = 5e-5  # seconds the master polls without yielding after a message while chunks are short
SHORT_CHUNK = 1e-4  # seconds: while chunks take less, the waiting master does not sleep (a sleep costs ~80 µs)
MAX_NAP = 0.04  # seconds: the longest nap of a waiting master (workers wait that long if points get much cheaper)
BUSY_NAP = 0.7  # of the time until a rank may run out of work (Scheduler.busy_until): the master naps that long
DRIVEN_GRACE = 5e-3  # seconds the master thread leaves the loop to a caller that drove it last
DRIVEN_WAIT = 0.05  # seconds between the master thread's looks while a caller drives
RECEIVE_LIMIT = 64  # messages handled per pass of the loop before it dispatches again
AWAY_FRACTION = 0.25  # a pass of the loop this late (in rank_timeout) means the master was away, not the ranks


class RanksLostError(RuntimeError):
    """``Pool(comm).shutdown()``: worker ranks were lost; they never return, so the program must end with Abort."""

    def __init__(self, ranks):
        self.ranks = sorted(ranks)
        super().__init__(
            f"worker ranks {self.ranks} were lost (silent for longer than rank_timeout) and never return from "
            "Pool(comm): their work went to other ranks, but a collective call "
            "that includes them, MPI_Finalize too, would hang. Store what you need, then end the job with "
            "comm.Abort()")


@dataclass
class RankInfo:
    """What a worker rank told the master about itself."""

    host: str | None = None
    pid: int | None = None


class Master:
    """Dispatches maps to the worker ranks of ``comm`` (rank 0 is this one)."""

    def __init__(self, comm=None, *, stop_workers: bool = True, rank_timeout: float | None = DEFAULT_RANK_TIMEOUT,
                 stall_timeout: float | None = None, host_failures: int | None = DEFAULT_HOST_FAILURES,
                 free_comm: bool = False):
        self.transport = Transport(comm) if comm is not None else None
        ranks = self._worker_ranks()
        self.scheduler = Scheduler(ranks, now=time.monotonic())
        self.ranks = {r: RankInfo() for r in ranks}
        self.stop_workers = stop_workers
        self.rank_timeout = rank_timeout  # seconds of silence after which a rank is lost (None: never)
        self.lost: set[int] = set()  # ranks declared lost: never sent to again, their messages dropped
        self.silent: set[int] = set()  # the last rank in service, silent for rank_timeout, until it speaks again
        self.stall_timeout = stall_timeout  # warn when a busy rank returns nothing for this long
        self._stalled: set[int] = set()  # ranks warned about, until they return something
        # rank -> when its native heartbeat first said its Python side had not moved (a C call holding the GIL),
        # until a beat says it moves again; and the ranks warned about meanwhile
        self._frozen: dict[int, float] = {}
        self._frozen_said: set[int] = set()
        self.host_failures = host_failures  # failures disproved elsewhere before a host is retired
        self.host_strikes: dict[str, int] = {}
        self.retired: set[int] = set()  # alive, but given no more work: their host kept failing
        self.verification: list = []  # (map_id, index, first host, second host, same result)
        self.paused = False  # see pause()
        self._last_check = 0.0
        self._last_pass = time.monotonic()  # when the loop last looked at the ranks' silence
        self._free_comm = free_comm  # free comm once the workers are stopped (unless ranks were lost)
        self._workers_stopped = False
        self._detached = False  # closed with wait=False: what goes wrong at the end can only be logged
        self.error: BaseException | None = None
        self._handles: dict[int, MapHandle] = {}
        self._published: dict[str, shared.Published] = {}  # name -> a shared object the workers hold (pool.share)
        self._to_share: list = []  # (Published, Event) waiting for every rank's host to be known
        self._to_unshare: list = []  # (name, map_id): released once no map up to map_id is open
        self._last_map_id = -1  # the latest map submitted by a caller
        self._holders: dict[int, set] = {}  # map_id -> ranks that hold its function
        self._inbox: deque = deque()
        self._holes: dict[int, list] = {}  # chunk_id -> offsets sent, for chunks sent without cancelled calls
        self._costs: dict[int, float] = {}  # hash of a pickled function -> seconds per point, from its last map
        self._leaders: dict[int, Result] = {}  # chunk_id -> task rank 0's result of a k-rank task not yet settled
        self._map_ids = itertools.count()
        self._closing = False
        self._draining = False  # close was asked for: finish the open maps, accept no new ones, then end
        self._lock = threading.Lock()  # a submit and a close never interleave: nothing is added after "close"
        self._chunk_seconds = 0.0  # moving average of how long a chunk takes to evaluate
        self._last_sent = 0.0  # perf_counter of the last chunk handed out
        self._wake = threading.Event()  # set with every command: an idle master waits on it
        # Whoever holds _turn_lock runs a turn of the loop: the master thread, or a caller that waits for
        # results and drives the loop itself (no hand-off between threads, no fight for the GIL).
        self._turn_lock = threading.Lock()
        self._drivers = 0  # callers driving the loop right now: the master thread keeps out of their way
        self._drivers_lock = threading.Lock()
        self._last_driven = 0.0
        self._stopped = False  # the loop has ended (closed, or failed): nobody drives it any more
        # Released by a command from another thread (a submit, a cancel): a driving caller's nap ends at once.
        self._doorbell = threading.Lock()
        self._doorbell.acquire()
        self._waiter = Waiter(window=5e-5, hot_window=5e-3, sleep=self._nap)
        shared.sweep()  # shared files left behind by a master killed with -9
        self.nesting = nested.MasterNesting(self)
        self._thread = threading.Thread(target=self._run, name="mpimap-master", daemon=True)
        self._thread.start()

    def _worker_ranks(self):
        return range(1, self.transport.size)

    # -- called from the caller's threads ----------------------------------------
    def submit(self, handle: MapHandle) -> MapHandle:
        with self._lock:
            if self.error is not None:
                raise RuntimeError("the mpimap master has failed") from self.error
            if self._closing:
                raise RuntimeError("cannot submit to a pool that has been shut down")
            handle.map_id = self._last_map_id = next(self._map_ids)
            handle.master = self
            self._command("add", handle)
        return handle

    def cancel(self, handle: MapHandle) -> None:
        self._command("cancel", handle)

    def share(self, published: shared.Published) -> None:
        """Send a shared object to every worker rank; return once it is sent (before any point that uses it)."""
        sent = threading.Event()
        with self._lock:
            if self._closing or self.error is not None:
                published.release()
                raise RuntimeError("cannot share with a pool that has been shut down")
            self._command("share", (published, sent))
        while not sent.wait(IDLE_WAIT):
            if self._stopped:
                raise RuntimeError("the mpimap master stopped before the shared object was sent") from self.error

    def unshare(self, name: str) -> None:
        """Let the workers drop a shared object, and remove its files (from any thread, also a finalizer).

        Not before the maps submitted so far have ended: their function or points may hold the handle in a
        form that outlives the caller's handle object (a ``functools.partial``, a copy, submit's keywords).
        """
        self._command("unshare", (name, self._last_map_id))

    def set_log_level(self, level: int, ranks) -> None:
        """Change the log level of worker ranks (an iterable of ranks, or None for all) while they run."""
        self._command("level", (level, None if ranks is None else list(ranks)))

    def pause(self, paused: bool) -> None:
        """Stop handing out chunks (``paused``) or start again; chunks in flight finish and are delivered."""
        self.paused = paused  # what was asked for; the loop applies it at its next turn
        self._command("pause", paused)

    def _pause(self, paused: bool) -> None:
        self.scheduler.paused = paused

    def drained(self) -> bool:
        """Whether a pause has taken effect and every chunk handed out has come back to its map."""
        return self.scheduler.paused and not any(len(r.in_flight) for r in list(self.scheduler.ranks.values()))

    def _command(self, name: str, handle) -> None:
        self._inbox.append((name, handle))
        self._wake.set()
        try:
            self._doorbell.release()
        except RuntimeError:  # rung already, not yet heard
            pass

    def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or until a command comes."""
        self._doorbell.acquire(timeout=seconds)

    def close(self, wait: bool = True, cancel: bool = False) -> None:
        """Accept no more maps; finish the open ones (``cancel``: drop them), stop the workers if this
        master owns them, and end the thread.  ``wait=False`` returns at once; the interpreter waits at exit."""
        with self._lock:
            self._closing = True
            self._detached = not wait
            self._command("close", cancel)
        if wait:
            self.join()
        else:
            atexit.register(self.join)

    def join(self) -> None:
        """Wait for the thread to end; if it died early, stop the workers it was to stop."""
        self._thread.join()
        if self.stop_workers and not self._workers_stopped:
            self._shutdown_workers()

    def status(self) -> list[dict]:
        """One row per worker rank: host, pid, chunks in flight (``chunks``: the scheduler's Chunk records),
        points done, busy time, seconds since last heard, seconds its Python side had not moved when its native
        heartbeat last beat (``frozen``: a stopped process's stops growing; its silence grows).  Safe to call from
        any thread."""
        now = time.monotonic()
        stuck = set(self.scheduler.stuck_ranks())
        frozen = dict(self._frozen)
        return [
            dict(rank=r, host=info.host, pid=info.pid, in_flight=len(chunks), chunks=chunks,
                 points_done=s.points_done, busy_seconds=s.busy_seconds, last_heard=now - s.last_heard,
                 lost=r in self.lost, retired=r in self.retired, stuck=r in stuck,
                 frozen=max(0.0, s.last_heard - frozen[r]) if r in frozen else 0.0)
            for (r, info), s in zip(self.ranks.items(), self.scheduler.ranks.values())
            for chunks in [list(s.in_flight.values())]  # one copy, taken at once: the master thread changes it
        ]

    # -- the loop ----------------------------------------------------------------
    drivable = True  # callers may run turns of the loop while they wait

    def drive(self, cond: threading.Condition, timeout: float | None) -> None:
        """Called by a caller waiting for results, holding ``cond`` (once): run a turn of the loop, or wait a little.

        ``cond`` is released meanwhile, so the turn can deliver to its handle
        and other threads are never blocked on it.
        """
        if self._stopped:
            cond.wait(IDLE_WAIT if timeout is None else min(timeout, IDLE_WAIT))
            return
        with self._drivers_lock:
            self._drivers += 1
        cond.release()
        try:
            # If another caller drives, the lock does not come: look at our results again.
            if self._locked_turn(1e-3) is False:
                self._idle(None if timeout is None else max(timeout, 0.0))
        finally:
            self._last_driven = time.monotonic()
            with self._drivers_lock:
                self._drivers -= 1
            cond.acquire()

    @contextmanager
    def signals_between_turns(self):
        """While a caller drives the loop: Ctrl-C, SIGTERM and SIGUSR1 handlers run between turns, never inside one.

        A handler's exception (KeyboardInterrupt, the CLI's interrupt) raised
        half-way through a turn would leave the loop's state torn; here it is
        held and raised by ``deliver()``, which the waiting caller calls after
        each turn, and on leaving.
        """
        if threading.current_thread() is not threading.main_thread():  # only the main thread runs handlers
            yield _nothing
            return
        pending: list = []
        saved = {}
        # _signal, not signal: the same calls without the enum conversions, which cost more than the rest of a
        # turn (this runs each time a caller waits: for every point of a map with chunksize=1).
        for sig in _DEFERRED_SIGNALS:
            handler = _signal.getsignal(sig)
            if callable(handler):
                saved[sig] = handler
                _signal.signal(sig, lambda signum, frame: pending.append(signum))

        def deliver():
            while pending:
                signum = pending.pop(0)
                saved[signum](signum, None)

        try:
            yield deliver
        finally:
            for sig, handler in saved.items():
                _signal.signal(sig, handler)
            deliver()

    def _turn(self) -> bool:
        """One turn of the loop: commands, dispatch, messages, liveness; True if messages came."""
        self._commands()
        if self._to_share:
            self._send_shares()
        if self._draining and not self._handles:
            self._stopped = True
            self._wake.set()
            return False
        self._dispatch()
        if self.scheduler.groups:
            self._group_timeouts()
        received = self._receive()
        if self.rank_timeout is not None or self.stall_timeout is not None:
            # Silence is judged only once every message waiting has been read.
            self._check_silence(drained=received < RECEIVE_LIMIT)
        return received > 0

    def _locked_turn(self, wait: float) -> bool | None:
        """A turn under the turn lock: True if messages came; None if the lock did not come within ``wait``
        seconds (another thread drives) or the turn failed, which stops the master."""
        if not self._turn_lock.acquire(timeout=wait):
            return None
        try:
            busy = self._turn()
        except BaseException as exc:
            self._fail(exc)
            return None
        finally:
            self._turn_lock.release()
        if busy:
            self._waiter.activity()
        return busy

    def _fail(self, exc: BaseException) -> None:
        """The master must never die silently: every waiter hears of it."""
        log.error("mpimap master failed", exc_info=exc)
        self.error = exc
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopped:
                since = time.monotonic() - self._last_driven
                if self._drivers or since < DRIVEN_GRACE:
                    # A caller drives the loop; when it stops (to use a result) it is usually back soon.
                    self._wake.wait(DRIVEN_WAIT if self._drivers else DRIVEN_GRACE - since)
                    self._wake.clear()
                    continue
                busy = self._locked_turn(IDLE_WAIT)
                if busy is None or busy:
                    continue
                if not self._handles:
                    # Nothing to do but hear heartbeats: a command wakes us at once.
                    self._wake.wait(IDLE_WAIT)
                    self._wake.clear()
                else:
                    self._idle(IDLE_WAIT)
        finally:
            with self._turn_lock:
                self._stopped = True
                with self._lock:  # no submit slips in between: each one either raises or is finished here
                    self._closing = True
                    queued = [h for command, h in self._inbox if command == "add"]
                    self._inbox.clear()
                for handle in list(self._handles.values()) + queued:
                    handle.finish(error=self.error, cancelled=self.error is None)
                self._handles.clear()
                self.lost |= self.silent  # the last rank, kept in service while silent, never came back
                self._give_up_stuck()
                self._shutdown_workers()
                for published in [*self._published.values(), *(p for p, _ in self._to_share)]:
                    published.release()
                self._published.clear()
                if self._free_comm and not self.lost:
                    self.transport.comm.Free()  # collective with the workers, which free it as they return
                elif self._free_comm and self._detached:  # shutdown(wait=False): nobody is there to raise it to
                    log.error("%s", RanksLostError(self.lost))

    def _idle(self, limit: float | None) -> None:
        """Wait a little (at most ``limit`` seconds) for the next message: spin while chunks are short (a result
        is due any moment), else nap, until shortly before a rank may run out of work if that is known.
        Before the first chunk comes back their length is unknown: nap."""
        waiter = self._waiter
        short = 0.0 < self._chunk_seconds < SHORT_CHUNK
        waiter.spin = SPIN if short else 0.0
        if short:
            waiter.window = waiter.hot_window
        # Silence counts from the last message or the last chunk sent, whichever is later: a caller's pause between
        # maps is no sign that the next map's chunks are long.
        nap = self._sleep_cap(time.perf_counter() - max(waiter.last, self._last_sent))
        if self._chunk_seconds > 1e-3:  # shorter chunks would earn naps too short to pay for the scan of every rank
            busy = self.scheduler.busy_until()
            if busy is not None:  # every rank has work until then: look again a little before
                nap = max(nap, min(MAX_NAP, (busy - time.monotonic()) * BUSY_NAP))
        if self.rank_timeout:  # a longer absence would make the silence check take the master for away
            nap = min(nap, AWAY_FRACTION * self.rank_timeout / 4)
        waiter.cap = nap if limit is None else min(nap, limit)
        if waiter.cap > 1e-3:  # long chunks: nap the whole cap at once, not from 10 µs doubling (a turn costs CPU)
            waiter.sleep = waiter.cap
        waiter.idle()

    def _commands(self) -> None:
        """Carry out the caller's commands (in a call of its own: no local outlives it to keep a map alive)."""
        while self._inbox:
            command, argument = self._inbox.popleft()
            getattr(self, "_" + command)(argument)

    def _share(self, request) -> None:
        self._to_share.append(request)
        self._send_shares()

    def _send_shares(self) -> None:
        """Send waiting shared objects once every live rank has said which host it is on: ranks of the master's
        host map the master's file; the others get the bytes (one raw buffer) and write their host's file."""
        ranks = [r for r in self.ranks if r not in self.lost] if self.transport is not None else []  # inline: none
        if any(self.ranks[r].host is None for r in ranks):
            return
        here = host_name(0)
        for published, sent in self._to_share:
            self._published[published.name] = published
            for rank in ranks:
                data = None if self.ranks[rank].host == here else pickle.PickleBuffer(published.data)
                self.transport.send(rank, Kind.SHARE, shared.ShareMessage(published.name, data))
            sent.set()
        self._to_share.clear()

    def _unshare(self, request) -> None:
        self._to_unshare.append(request)
        self._release_shares()

    def _release_shares(self) -> None:
        """Release the shared objects whose maps (every map up to the one submitted last when their handle went)
        have all ended."""
        oldest = min(self._handles, default=None)
        for name, last in [r for r in self._to_unshare if oldest is None or r[1] < oldest]:
            self._to_unshare.remove((name, last))
            self._release_share(name)

    def _release_share(self, name: str) -> None:
        published = self._published.pop(name, None)
        if published is None:
            return
        for rank in self.ranks if self.transport is not None else ():
            if rank not in self.lost:
                self.transport.send(rank, Kind.UNSHARE, name)
        published.release()

    def _close(self, cancel: bool) -> None:
        self._draining = True
        if cancel:
            for handle in list(self._handles.values()):
                self._end_map(handle, cancelled=True)

    def _sleep_cap(self, quiet: float) -> float:
        """The longest nap between polls: 1 ms, up to 20 ms while long chunks are in flight or nothing has come
        for ``quiet`` seconds.

        Every rank has a chunk queued behind the one it evaluates, so a result
        noticed a fifth of a chunk late costs no worker any time, and every
        wake-up costs ~100 µs of CPU on a VM whatever the nap: long chunks
        earn long naps.  Before the first of them comes back (a first map of
        long points, or chunks far longer than the last map's) the silence
        says as much: without it the master woke 1,000 times a second.
        """
        return min(20e-3, max(1e-3, self._chunk_seconds / 5, quiet / 5))

    def _level(self, request) -> None:
        level, ranks = request
        for rank in self.ranks if ranks is None else ranks:
            if rank in self.ranks and rank not in self.lost and self.transport is not None:
                self.transport.send(rank, Kind.LEVEL, level)

    def _check_silence(self, drained: bool) -> None:
        """Declare lost the ranks not heard from for ``rank_timeout``; their chunks go to the others.

        A long gap since the last look means this loop did not run (the job was
        suspended, rank 0 stopped, another thread held the GIL): the ranks'
        silence is then the master's own absence, so their clocks restart.
        """
        now = time.monotonic()
        away, self._last_pass = now - self._last_pass, now
        if self.rank_timeout and away > AWAY_FRACTION * self.rank_timeout:
            log.warning("the master did not run for %.1f s (job suspended, or a thread held the GIL): "
                        "no rank is judged silent for that time", away)
            for rank in self.scheduler.ranks:
                self.scheduler.heard(rank, now)
            return
        if not drained or now - self._last_check < 0.1:
            return
        self._last_check = now
        for rank in self.scheduler.silent_ranks(now, self.rank_timeout) if self.rank_timeout else ():
            info = self.ranks[rank]
            silence = now - self.scheduler.ranks[rank].last_heard
            if self.scheduler.live == 1:
                self._no_rank_left(rank, silence)
                break
            log.warning("rank %d (%s, pid %s) silent for %.1f s: declared lost, its work goes to other ranks",
                        rank, info.host, info.pid, silence)
            self.scheduler.lose_rank(rank)
            self.lost.add(rank)
            self._frozen.pop(rank, None)
            self.nesting.rank_lost(rank)
        self._fail_too_wide()
        if self.stall_timeout:
            stalled = set(self.scheduler.stalled_ranks(now, self.stall_timeout))
            for rank in stalled - self._stalled:
                log.warning("rank %d (%s) is alive but has returned nothing for %.1f s: a point may be stuck "
                            "(isolation='process' with point_timeout stops such points)", rank,
                            self.ranks[rank].host, self.stall_timeout)
            self._stalled = stalled

    def _frozen_python(self, rank: int, moved: bool, now: float) -> None:
        """A native heartbeat said whether the rank's Python side moved: alive but stuck (in a C call that holds
        the GIL) is told once it lasts ``rank_timeout``, when a rank without native heartbeats would be lost."""
        if moved:
            since = self._frozen.pop(rank)
            if rank in self._frozen_said:
                self._frozen_said.discard(rank)
                log.warning("rank %d (%s) moves again after %.1f s", rank, self.ranks[rank].host, now - since)
            return
        since = self._frozen.setdefault(rank, now)
        if self.rank_timeout and now - since > self.rank_timeout and rank not in self._frozen_said:
            self._frozen_said.add(rank)
            log.warning("rank %d (%s, pid %s) is alive but its Python side has not moved for %.1f s (a C call "
                        "holding the GIL?)", rank, self.ranks[rank].host, self.ranks[rank].pid, now - since)

    def _no_rank_left(self, rank: int, silence: float) -> None:
        """The last live rank is silent: it is kept (it may come back) but the open maps fail, rather than wait."""
        error = RuntimeError(
            f"no worker rank is left: rank {rank} ({self.ranks[rank].host}), the last one in service, has been "
            f"silent for {silence:.1f} s (rank_timeout {self.rank_timeout:g} s)"
            + (f" and ranks {sorted(self.lost)} were lost" if self.lost else "")
            + "; results received so far are kept: run again (with a larger rank_timeout if the ranks are busy "
            "in code that holds the GIL, or isolation='process')")
        if self._handles or rank not in self.silent:  # said once, and again only when it fails maps
            log.error("%s", error)
        for handle in list(self._handles.values()):
            self._end_map(handle, error=error)
        self.silent.add(rank)
        self.scheduler.heard(rank, time.monotonic())  # later maps give it a full rank_timeout again

    def _add(self, handle: MapHandle) -> None:
        handle.seal()
        self._handles[handle.map_id] = handle
        self._holders[handle.map_id] = set()
        # A map (or batch of submit() calls) of a function seen before starts with its measured cost: maps are often
        # small (a fitter's generation), and learning the cost again from one-point chunks costs messages.
        cost = self._costs.get(hash(handle.function))
        try:
            self.scheduler.add_map(handle.map_id, handle.size, chunksize=handle.chunksize, priority=handle.priority,
                                   cost=cost, nested=handle.nested, shares=handle.futures is None,
                                   ranks_per_task=handle.group.ranks_per_task if handle.group else 1)
        except Exception as exc:  # the map's own fault: it fails, the master serves on
            self._end_map(handle, error=exc)
            return
        if handle.size == 0:
            self._end_map(handle)

    def _cancel(self, handle: MapHandle) -> None:
        if self._handles.get(handle.map_id) is handle:
            self._end_map(handle, cancelled=True)

    def _end_map(self, handle: MapHandle, cancelled: bool = False, error: BaseException | None = None) -> None:
        state = self.scheduler.maps.get(handle.map_id)
        if state is not None and state.cost is not None:
            if len(self._costs) > 256:
                self._costs.clear()
            self._costs[hash(handle.function)] = state.cost  # not the blob: it may hold a closure's big data
        self.scheduler.remove_map(handle.map_id)
        del self._handles[handle.map_id]
        for rank in self._holders.pop(handle.map_id):
            if rank not in self.lost:
                self.transport.send(rank, Kind.FORGET, handle.map_id)
        handle.finish(error=error, cancelled=cancelled)
        self.nesting.ended(handle.map_id)
        if self._to_unshare:
            self._release_shares()

    def _claim(self, chunk):
        """The handle, the arguments and their stream indices (a map with a seed; else None) of a chunk as it
        leaves; a batch's cancelled calls are left out.

        Where calls are left out, the chunk's positions are kept in ``_holes``
        so that its results can be put back in place (:func:`_fill_holes`).
        """
        handle = self._handles.get(chunk.map_id)
        if handle is None:
            return None, None, None
        args = handle.args[chunk.start:chunk.stop]
        keys = None if handle.keys is None else handle.keys[chunk.start:chunk.stop]
        if handle.futures is None:
            return handle, args, keys
        live = handle.start_calls(chunk.start, chunk.stop)
        if len(live) < len(args):
            self._holes[chunk.chunk_id] = live
            args = [args[k] for k in live]
            keys = None if keys is None else [keys[k] for k in live]
        return handle, args, keys

    def _dispatch(self) -> None:
        assigned = self.scheduler.assign(time.monotonic())
        if assigned:
            self._last_sent = time.perf_counter()  # results are due from now on: see _idle
        for rank, chunk in assigned:
            handle, args, keys = self._claim(chunk)
            if handle is None:
                continue
            holders = self._holders[chunk.map_id]
            function = None if rank in holders else handle.function
            holders.add(rank)
            try:
                self.transport.send(rank, Kind.TASK, Task(chunk.chunk_id, chunk.map_id, function, args, keys,
                                                          chunk.group))
            except Exception as exc:  # points that cannot be pickled: that map fails, the master serves on
                self._end_map(handle, error=exc)

    def _receive(self, limit: int = RECEIVE_LIMIT) -> int:
        """Handle up to ``limit`` waiting messages; return how many there were."""
        for count in range(limit):
            message = self.transport.poll()
            if message is None:
                return count
            source, kind, body = message
            now = time.monotonic()
            if source in self.lost:
                continue
            if self.silent:
                self.silent.discard(source)
            if kind is Kind.RESULT:
                self._result(source, body, now)
                self._dispatch()  # refill that rank at once
            elif kind is Kind.SUBMAP:
                self.nesting.open(source, body)
            elif kind is Kind.SUBCANCEL:
                self.nesting.cancel(source, body)
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
                if body is False or source in self._frozen:
                    self._frozen_python(source, body, now)
        return limit

    def _result(self, rank: int, result: Result, now: float) -> None:
        values, failures, durations, logs = result.values, result.failures, result.durations, result.logs
        self._chunk_seconds += (result.seconds - self._chunk_seconds) / 8
        if rank in self._frozen:  # a result comes from its Python side: it moves again
            self._frozen_python(rank, True, now)
        if result.chunk_id in self.scheduler.groups:
            self._group_result(rank, result, now)
            return
        chunk = self.scheduler.complete(rank, result.chunk_id, result.seconds, now)
        self.nesting.chunk_done(rank, result.chunk_id)
        live = self._holes.pop(result.chunk_id, None)
        if chunk is None:  # its map was cancelled meanwhile, or another copy came first
            return
        if live is not None:
            values, failures, durations, logs = _fill_holes(live, len(chunk), values, failures, durations, logs)
        self._chunk_done(chunk, rank, values, failures, durations, logs)

    def _chunk_done(self, chunk, rank, values, failures, durations, logs) -> None:
        """Hand a chunk's results to its map (or to the verification it was for); end the map when it is done."""
        handle = self._handles[chunk.map_id]
        if chunk.start in handle.verifying and len(chunk) == 1:
            self._verified(handle, chunk.start, values, failures, rank)
        else:
            self._deliver(handle, chunk, values, failures, durations, rank, logs)
        if self.scheduler.map_finished(chunk.map_id):
            self._end_map(handle)

    # -- k-rank tasks (mpimap/groups.py) -----------------------------------------
    def _group_result(self, rank: int, result: Result, now: float) -> None:
        """A member of a k-rank task reported.  Its point's result: the first member's failure, else the value of
        task rank 0 once every member is back."""
        cid = result.chunk_id
        group = self.scheduler.groups[cid].chunk.group
        if rank == group[0] and not result.failures:
            self._leaders[cid] = result
        chunk = self.scheduler.complete_member(rank, cid, result.seconds, now, bool(result.failures))
        leader = self._leaders.get(cid) if cid in self.scheduler.groups else self._leaders.pop(cid, None)
        if chunk is None:
            return
        if not result.failures:
            result = leader
        else:
            self._leaders.pop(cid, None)
            inside = sorted(self.scheduler.groups[cid].waiting) if cid in self.scheduler.groups else []
            if inside:
                log.warning("point %d failed on rank %d of its %d-rank task; ranks %s are still inside it (perhaps "
                            "blocked in a collective call): they get no work until they return", chunk.start, rank,
                            len(group), inside)
        self._chunk_done(chunk, rank, result.values, result.failures, result.durations, result.logs)

    def _group_timeouts(self) -> None:
        """Fail the k-rank points that ran past their map's ``point_timeout``; their ranks stay reserved."""
        for chunk in self.scheduler.overdue_groups(time.monotonic(), self._group_timeout):
            self._leaders.pop(chunk.chunk_id, None)
            timeout = self._handles[chunk.map_id].group.timeout
            inside = sorted(self.scheduler.groups[chunk.chunk_id].waiting)
            log.warning("point %d of a %d-rank map timed out after %g s: ranks %s get no work until they return",
                        chunk.start, len(chunk.group), timeout, inside)
            self._chunk_done(chunk, chunk.group[0], [None], {0: timeout_failure(timeout, inside)}, np.zeros(1), {})

    def _group_timeout(self, map_id: int) -> float | None:
        handle = self._handles.get(map_id)
        return handle.group.timeout if handle is not None and handle.group is not None else None

    def _give_up_stuck(self) -> None:
        """At the end: ranks still inside a settled k-rank task would never see STOP, nor end MPI_Finalize."""
        stuck = set(self.scheduler.stuck_ranks())
        if stuck:
            log.error("ranks %s are still inside k-rank tasks that ended without them (blocked in a collective "
                      "call): they count as lost", sorted(stuck))
            self.lost |= stuck

    def _fail_too_wide(self) -> None:
        """After ranks were lost: the k-rank maps that need more ranks than are left fail (they could never run)."""
        for map_id in self.scheduler.too_wide():
            handle = self._handles[map_id]
            self._end_map(handle, error=RuntimeError(too_wide_message(handle.group.ranks_per_task,
                                                                      self.scheduler.live)))

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
                                   attempts, logs, self.ranks[rank].host))
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
            self.nesting.rank_lost(r)
        self._fail_too_wide()

    def _shutdown_workers(self) -> None:
        if self.stop_workers:
            for rank in self.ranks:
                if rank not in self.lost:
                    self.transport.send(rank, Kind.STOP)
            self._workers_stopped = True
        self.transport.flush(timeout=1.0 if self.lost else 10.0)


def _fill_holes(live, n, values, failures, durations, logs):
    """The results of a chunk evaluated without its cancelled calls, put back at the positions ``live``."""
    full = [None] * n
    for j, k in enumerate(live):
        full[k] = values[j]
    spread = np.zeros(n)
    spread[live] = durations
    return (full, {live[j]: f for j, f in failures.items()}, spread, {live[j]: t for j, t in logs.items()})


def _nothing() -> None:
    """No signal is ever held for a caller that is not the main thread."""


def _same(a, b) -> bool:
    """Whether two results of one point agree (exactly: numbers bit for bit, arrays element by element)."""
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return a == b


class InlineMaster(Master):
    """The same loop without MPI: evaluates every chunk itself (a pool of one process)."""

    drivable = False  # chunks are evaluated in the loop: a caller's timeout must not wait for one

    def __init__(self):
        self._evaluator = Evaluator()
        self._functions = {}  # map_id -> its MapFunction (or the Failure of loading it)
        super().__init__(rank_timeout=None)
        self.ranks[0].host, self.ranks[0].pid = socket.gethostname(), os.getpid()

    def _worker_ranks(self):
        return [0]

    def _dispatch(self) -> None:
        for rank, chunk in self.scheduler.assign(time.monotonic()):
            handle, args, keys = self._claim(chunk)
            if handle is None:
                continue
            if chunk.map_id not in self._functions:
                self._functions = {chunk.map_id: load_function(handle.function)}
            t0 = time.perf_counter()
            try:
                saved = nested._enter(nested.SerialPool())
                try:
                    out = self._evaluator.run(chunk.map_id, handle.function, self._functions[chunk.map_id], args,
                                              keys=keys)
                finally:
                    nested._leave(saved)
            except Exception as exc:  # points that cannot be pickled to the child: that map fails, not the pool
                self._end_map(handle, error=exc)
                continue
            self._result(rank, Result(chunk.chunk_id, out.values, out.failures, out.durations,
                                      time.perf_counter() - t0, out.logs), time.monotonic())

    def _receive(self, limit: int = RECEIVE_LIMIT) -> int:
        return 1 if self._handles else 0

    def _shutdown_workers(self) -> None:
        self._evaluator.close()
        self._workers_stopped = True
