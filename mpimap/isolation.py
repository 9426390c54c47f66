"""Where a worker rank evaluates points: in the rank itself, or in a supervised child process.

A worker rank must never die because of the user's code (with the MPI wheels
we use, any dead rank ends the whole job).  ``isolation="process"`` forks one
child per worker rank that evaluates the points; the rank watches it, and a
crash, a hang past ``point_timeout`` or a memory leak costs one point (or
nothing), never the rank.  ``isolation="fresh"`` forks a new child for every
point.  ``isolation="rank"`` evaluates in the rank: fastest, and contains only
Python exceptions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Pipe

import numpy as np

from . import seeds
from .failures import Failure, signal_name, unpicklable_values
from .native_models import NativeFunction, arrays
from .orphans import die_with_parent
from .pointlogs import PointLogs, capture_level, captured
from .protocol import LogLine, record
from .shared import drop_released, forget_initialized, initialize

ISOLATIONS = ("rank", "process", "fresh")
BATCH_SECONDS = 0.01  # the child reports results at least this often while it works
CHECK_SECONDS = 0.005  # while the child keeps sending, the rank checks timeouts and cancellation this often


@dataclass(frozen=True)
class Isolation:
    """How a map's points are evaluated on a worker rank (travels with the map's function)."""

    mode: str = "rank"
    point_timeout: float | None = None  # seconds per point; process and fresh only
    max_points: int | None = None  # recycle the child after this many points
    max_memory_mb: float | None = None  # recycle the child once its resident memory passes this
    scratch: bool = False  # a private TMPDIR per evaluation, removed afterwards

    def __post_init__(self):
        if self.mode not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, not {self.mode!r}")
        if self.mode == "rank" and (self.point_timeout or self.max_points or self.max_memory_mb):
            raise ValueError("point_timeout, max_points and max_memory_mb need isolation='process' or 'fresh': "
                             "code running in the rank itself cannot be stopped or recycled")
        for name in ("point_timeout", "max_points", "max_memory_mb"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")


@record
class Outcome:
    """A chunk's evaluation: values in point order (None where a point failed), failures by offset, timings, logs."""

    values: object  # a list, or one numpy array when the map packs its values
    failures: dict  # offset within the chunk -> Failure
    durations: object  # float64 array of seconds per point
    logs: dict  # offset -> captured log text, where the map keeps it


def evaluate_points(fn, star: bool, args, *, scratch: bool = False, logs: PointLogs | None = None,
                    timed: bool = True, seed: int | None = None, keys=None) -> Outcome:
    """Evaluate ``fn`` on every point of ``args`` in this process (the captured log where ``logs`` keeps it).

    Without ``timed`` (and with no scratch, log capture or seed) the points
    run in one tight loop and each one's duration is the chunk's mean: timing
    every point costs ~5x a microsecond function.  With a ``seed``, point
    ``i`` runs in the random stream of ``keys[i]`` (see :mod:`mpimap.seeds`).
    """
    outer = seeds._current
    if seed is None and outer is not None:  # a map without a seed, nested in a seeded point: no stream of its own
        seeds._leave(None)
        try:
            return evaluate_points(fn, star, args, scratch=scratch, logs=logs, timed=timed)
        finally:
            seeds._leave(outer)
    n = len(args)
    if not timed and not scratch and not (logs is not None and logs.active) and seed is None:
        t0 = time.perf_counter()
        values, failures = _call_all(fn, star, args)
        return Outcome(values, failures, np.full(n, (time.perf_counter() - t0) / max(n, 1)), {})
    values = [None] * n
    durations = np.empty(n)
    failures = {}
    kept = {}
    clock = time.perf_counter
    capture = logs is not None and logs.active
    level = capture_level() if capture else None
    for i in range(n):
        scratch_dir = _enter_scratch() if scratch else None
        key = None if seed is None else keys[i]
        if capture:
            with captured(level) as lines:
                t0 = clock()
                value, failure = _call(fn, star, args[i], seed, key)
                durations[i] = clock() - t0
            if logs.keep is not None and logs.wanted(args[i], value, durations[i], failure is not None):
                kept[i] = "\n".join(lines)
            if failure is not None and logs.debug_rerun:  # (in the same random stream: the same failure)
                with captured(logging.DEBUG) as lines:
                    _call(fn, star, args[i], seed, key)
                kept[i] = (kept.get(i, "") + "\n--- debug re-run ---\n" + "\n".join(lines)).lstrip("\n")
        else:
            t0 = clock()
            value, failure = _call(fn, star, args[i], seed, key)
            durations[i] = clock() - t0
        if failure is None:
            values[i] = value
        else:
            failures[i] = failure
        if scratch_dir is not None:
            _leave_scratch(scratch_dir)
    return Outcome(values, failures, durations, kept)


def _call(fn, star: bool, point, seed: int | None = None, key=None):
    """``(value, None)``, or ``(None, Failure)`` if the function raised; with a ``seed``, in stream ``key``."""
    if seed is not None:
        saved = seeds._enter(seed, key)
        try:
            return _call(fn, star, point)
        finally:
            seeds._leave(saved)
    try:
        return (fn(*point) if star else fn(point)), None
    except (Exception, SystemExit) as exc:
        return None, Failure.from_exception(exc)


def _call_all(fn, star: bool, args):
    """``(values, failures)`` for every point, as :func:`_call` would give them one by one, without its per-point cost."""
    values, failures = [], {}
    append = values.append
    points = iter(args)
    while True:
        try:  # the loop resumes after a failed point: the iterator has moved past it
            if star:
                for point in points:
                    append(fn(*point))
            else:
                for point in points:
                    append(fn(point))
            return values, failures
        except (Exception, SystemExit) as exc:
            failures[len(values)] = Failure.from_exception(exc)
            append(None)


def _enter_scratch() -> str:
    path = tempfile.mkdtemp(prefix="mpimap-scratch-", dir=_SCRATCH_BASE)
    os.environ["TMPDIR"] = tempfile.tempdir = path
    return path


def _leave_scratch(path: str) -> None:
    os.environ["TMPDIR"] = tempfile.tempdir = _SCRATCH_BASE
    shutil.rmtree(path, ignore_errors=True)


_SCRATCH_BASE = tempfile.gettempdir()


# -- the child process -----------------------------------------------------------------------------------------
def _child_setup() -> None:
    """In the fresh child: die with the rank, default fatal signals, never touch MPI; ignore the warning before
    the walltime (SIGUSR1, which Grid Engine sends to every process of the job): the master handles it."""
    die_with_parent()  # not Linux: a dead rank's child ends when its pipe closes
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
                signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    import faulthandler

    faulthandler.disable()
    forget_initialized()  # the pool's initializer runs in this process too


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _Slot(ctypes.Structure):
    """Shared with the child (MAP_SHARED): which point it evaluates and since when.

    A seqlock: ``seq`` is odd while the slot is rewritten, since a torn read
    would pair a new position with an old start time.  Each field is one
    aligned 8-byte load or store (``struct.pack_into`` zero-fills first and
    writes byte by byte, so a reader could see an old sequence number again).
    """

    _fields_ = [("seq", ctypes.c_int64), ("position", ctypes.c_int64), ("started", ctypes.c_double)]


def _write_slot(slot: _Slot, position: int, started: float) -> None:
    seq = slot.seq | 1  # odd: being written (also after a writer killed mid-write)
    slot.seq = seq
    slot.position = position
    slot.started = started
    slot.seq = seq + 1


def _read_slot(slot: _Slot):
    """``(position, started)``; None if the slot is being written (or its writer died while writing it)."""
    for _ in range(100):
        seq = slot.seq
        point = slot.position, slot.started
        if not seq & 1 and slot.seq == seq:
            return point
        os.sched_yield()
    return None


@record
class ChildChunk:
    """The rank's message to its child: evaluate ``args``, which are the chunk's points at ``positions``."""

    map_id: int
    function: bytes | None  # the pickled MapFunction when the child does not hold this map's function yet
    args: object
    keys: object  # the stream index of each point of ``args`` (a map with a seed), else None
    positions: list
    options: Isolation
    logs: PointLogs
    level: int  # the rank's log level, for the child's root logger


@record
class Batch:
    """The child's report on ``positions[first:first + len(values)]`` of its chunk (failures and logs by offset)."""

    first: int
    values: list
    failures: dict
    durations: list
    logs: dict
    end: str | None = None  # None: more batches follow; "done": the chunk is done; "recycle": done, and the child left


class _ChildPipe:
    """The child's end of the pipe: one lock around every send, as a background thread of the function may log.

    Reentrant: a value's ``__reduce__`` may log while its batch is pickled,
    which is before any byte of the batch is written.
    """

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.RLock()

    def send(self, message) -> None:
        with self.lock:
            self.conn.send(message)

    def report(self, batch: Batch) -> None:
        """Send a batch; a value that cannot be pickled fails its point with the pickling error."""
        try:
            self.send(batch)
        except (Exception, SystemExit) as exc:
            values, failures = unpicklable_values(batch.values, batch.failures, exc)
            self.send(dataclasses.replace(batch, values=values, failures=failures))


class _PipeLog(logging.Handler):
    """In the child: log records go up the pipe to the rank, which passes them on to the job's log."""

    def __init__(self, pipe: _ChildPipe):
        super().__init__()
        self.pipe = pipe

    def emit(self, record):
        try:
            self.pipe.send(LogLine(record.levelno, record.name, record.getMessage()))
        except Exception:
            self.handleError(record)


def _child_main(conn, slot) -> None:
    """The child's loop: evaluate chunks, report results in batches, leave when told or when due for recycling."""
    pipe = _ChildPipe(conn)
    functions = {}
    evaluated = 0
    root = logging.getLogger()
    root.handlers = [_PipeLog(pipe)]  # the rank's own handlers (its MPI forwarder) are not for us
    while True:
        chunk = conn.recv()
        if chunk is None:
            return
        root.setLevel(chunk.level)
        drop_released()
        if chunk.function is not None:
            function = pickle.loads(chunk.function)
            # Only the current map's function is kept, with the failure of the pool's initializer, if it raised.
            functions = {chunk.map_id: (function.fn, function.star, function.seed, initialize(function.init))}
        fn, star, seed, broken = functions[chunk.map_id]
        args, keys, options, logs = chunk.args, chunk.keys, chunk.options, chunk.logs
        if broken is not None:  # the points fail as if evaluated: a fresh child is still replaced after its point
            n = len(chunk.positions)
            evaluated += n
            due = bool(options.max_points and evaluated >= options.max_points)
            end = "recycle" if due else "done"
            pipe.report(Batch(0, [None] * n, dict.fromkeys(range(n), broken), [0.0] * n, {}, end))
            if due:
                return
            continue
        plain = not options.scratch and not (logs is not None and logs.active)
        if plain and isinstance(fn, NativeFunction) and (batch := arrays(fn, args)) is not None:
            evaluated, due = _native_chunk(fn, batch, chunk, slot, pipe, evaluated)
            if due:
                return
            continue
        first, values, failures, durations, kept = 0, [], {}, [], {}
        last_report, last_memory_check = time.monotonic(), 0.0
        clock, perf = time.monotonic, time.perf_counter
        due = False
        for k, position in enumerate(chunk.positions):
            started = clock()
            _write_slot(slot, position, started)
            if plain:  # the hot path: no scratch directory, no log capture
                t0 = perf()
                value, failure = _call(fn, star, args[k], seed, None if seed is None else keys[k])
                durations.append(perf() - t0)
            else:
                one = evaluate_points(fn, star, args[k:k + 1], scratch=options.scratch, logs=logs, seed=seed,
                                      keys=None if seed is None else keys[k:k + 1])
                value, failure = one.values[0], one.failures.get(0)
                durations.append(one.durations[0])
                if 0 in one.logs:
                    kept[k - first] = one.logs[0]
            values.append(value)
            if failure is not None:
                failures[k - first] = failure
            evaluated += 1
            now = clock()
            due = bool(options.max_points and evaluated >= options.max_points)
            if options.max_memory_mb and (now - last_memory_check > 0.005 or now - started > 0.005):
                last_memory_check = now  # reading /proc costs ~10 µs: not after every microsecond point
                due = due or _rss_mb() > options.max_memory_mb
            if due or k + 1 == len(chunk.positions):
                break
            if now - last_report > BATCH_SECONDS:
                pipe.report(Batch(first, values, failures, durations, kept))
                first, values, failures, durations, kept = k + 1, [], {}, [], {}
                last_report = now
        # The last batch says the chunk is done, in the same message: a death after it blames no point.
        pipe.report(Batch(first, values, failures, durations, kept, "recycle" if due else "done"))
        if due:
            return


def _native_chunk(fn: NativeFunction, batch, chunk: ChildChunk, slot: _Slot, pipe: _ChildPipe, evaluated: int):
    """The child's loop for a native function on ``batch`` (its arrays, see ``arrays``): the C loop in slices of
    BATCH_SECONDS, a batch after each (it writes the slot before every point, as the Python loop does).  Returns
    the points evaluated so far and whether the child is due for recycling."""
    x, y, codes = batch
    options, n, durations = chunk.options, len(x), np.empty(len(x))
    positions = np.asarray(chunk.positions, dtype=np.int64)
    first, due = 0, False
    while first < n:
        stop = n if not options.max_points else min(n, first + max(options.max_points - evaluated, 1))
        done = fn.run(x, y, codes, durations, first, stop, BATCH_SECONDS, ctypes.addressof(slot), positions)
        evaluated += done - first
        due = bool(options.max_points and evaluated >= options.max_points) or bool(
            options.max_memory_mb and _rss_mb() > options.max_memory_mb)
        values, failures = fn.results(y, codes, first, done, packed=False)
        end = ("recycle" if due else "done") if due or done == n else None
        pipe.report(Batch(first, values, failures, durations[first:done].tolist(), {}, end))
        first = done
        if due:
            break
    return evaluated, due


class ChildProcess:
    """A supervised child that evaluates points for this rank; restarted after a crash, hang or recycling."""

    def __init__(self):
        self.pid = None
        self.conn = None
        self.map_id = None
        self._shared = mmap.mmap(-1, ctypes.sizeof(_Slot))  # MAP_SHARED with every child forked later
        self.slot = _Slot.from_buffer(self._shared)
        self._leaving: list[int] = []  # recycled children not yet reaped: their exit need not be waited for

    def _start(self) -> None:
        self._leaving = [pid for pid in self._leaving if os.waitpid(pid, os.WNOHANG)[0] == 0]
        parent, child = Pipe()
        pid = os.fork()
        if pid == 0:  # the child
            status = 0
            try:
                parent.close()
                _child_setup()
                _child_main(child, self.slot)
            except BaseException:
                status = 1
            finally:
                os._exit(status)  # never run the rank's atexit handlers (MPI_Finalize)
        child.close()
        self.pid, self.conn, self.map_id = pid, parent, None

    def _stop(self, kill: bool) -> int:
        """End the child; return its wait status."""
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(self.pid, 0)
        self.conn.close()
        self.pid = self.conn = None
        return status

    def close(self) -> None:
        if self.pid is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self._stop(kill=False)
        for pid in self._leaving:
            os.waitpid(pid, 0)
        self._leaving = []

    def evaluate(self, map_id, blob, args, options: Isolation, logs: PointLogs, tick, keys=None) -> Outcome | None:
        """Evaluate a chunk in the child (``keys``: the points' stream indices, in a map with a seed).

        ``tick()`` is called at least every 50 ms while the child works (every
        few ms while it sends); if it returns False the chunk is abandoned (its
        map was cancelled, or the rank stops) and None is returned.
        """
        n = len(args)
        out = Outcome([None] * n, {}, np.zeros(n), {})
        left = np.ones(n, dtype=bool)  # points with no result yet
        child_options = _one_point(options) if options.mode == "fresh" else options
        while left.any():
            positions = np.flatnonzero(left)
            part, part_keys = (args, keys) if len(positions) == n else (
                _subset(args, positions), None if keys is None else _subset(keys, positions))
            try:
                self._send_chunk(map_id, blob, part, part_keys, positions, child_options, logs)
            except (Exception, SystemExit) as exc:  # points that cannot be pickled to the child
                out.failures.update(dict.fromkeys(positions.tolist(), Failure.from_exception(exc)))
                break
            # A child that ended its part (fresh isolation: after each point) leaves the rest to the next one: the
            # rank takes its messages in between, so a cancel or a stop never waits for the whole chunk.
            if not self._watch(options, tick, positions, out, left) or left.any() and not tick():
                if self.pid is not None:
                    self._stop(kill=True)
                return None
        return out

    def _send_chunk(self, map_id, blob, part, keys, positions, options, logs) -> None:
        """Send a chunk to the child; a child that died while idle (its pipe is closed) is replaced first."""
        if self.pid is not None:
            try:
                while self.conn.poll(0):  # records its background threads logged since the last chunk
                    self._log(self.conn.recv())
            except Exception:
                self._stop(kill=True)
        for attempt in range(2):
            if self.pid is None:
                self._start()
            _write_slot(self.slot, int(positions[0]), time.monotonic())
            try:
                self.conn.send(ChildChunk(map_id, blob if self.map_id != map_id else None, part, keys,
                                          positions.tolist(), options, logs, logging.getLogger().level))
                break
            except OSError:
                if attempt:
                    raise
                self._stop(kill=True)
        self.map_id = map_id

    def _watch(self, options, tick, positions, out: Outcome, left) -> bool:
        """Collect the child's reports until the chunk is done or the child ends; False if abandoned.

        Cancellation, STOP and ``point_timeout`` are checked whenever the pipe
        is quiet, and every ``CHECK_SECONDS`` while the child keeps sending (a
        hung point that logs is still killed on time).
        """
        last_check = time.monotonic()
        while True:
            ready = self.conn.poll(0.05)
            if ready:
                try:
                    message = self.conn.recv()
                except Exception:  # EOF, a broken pipe, or a message that does not unpickle: the child is done for
                    self._fail_current("crashed", self._stop(kill=True), out, left)
                    return True
                if isinstance(message, LogLine):
                    self._log(message)
                elif self._take(message, positions, out, left):
                    return True
                if time.monotonic() - last_check < CHECK_SECONDS:
                    continue
            last_check = now = time.monotonic()
            if not tick():
                return False
            slot = _read_slot(self.slot)
            if options.point_timeout and slot is not None and now - slot[1] > options.point_timeout:
                self._fail_current("timeout", self._stop(kill=True), out, left)
                return True
            if not ready:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.conn.close()
                    self.pid = self.conn = None
                    self._fail_current("crashed", status, out, left)
                    return True

    @staticmethod
    def _log(line: LogLine) -> None:
        """Pass on a log record of the evaluation (to the rank's handlers: the job's log)."""
        logging.getLogger(line.name).log(line.levelno, "%s", line.text)

    def _take(self, batch: Batch, positions, out: Outcome, left) -> bool:
        """Record a batch of results; True if it ends the chunk."""
        where = positions[batch.first:batch.first + len(batch.values)]
        if len(where) and where[-1] - where[0] == len(where) - 1:
            out.values[where[0]:where[-1] + 1] = batch.values
        else:
            for position, value in zip(where, batch.values):
                out.values[position] = value
        out.durations[where] = batch.durations
        left[where] = False
        out.failures.update((int(where[k]), f) for k, f in batch.failures.items())
        out.logs.update((int(where[k]), t) for k, t in batch.logs.items())
        if batch.end == "recycle":  # the child leaves by itself
            self._leaving.append(self.pid)
            self.conn.close()
            self.pid = self.conn = None
        return batch.end is not None

    def _fail_current(self, kind, status, out: Outcome, left) -> None:
        """Record the point the child was on as timed out or crashed (the child is gone).

        No point is blamed if the point the slot names already has its result
        (the child died just after reporting it, before starting the next).
        """
        slot = _read_slot(self.slot)
        if slot is None or not 0 <= slot[0] < len(left) or not left[slot[0]]:
            return
        position, started = slot
        if kind == "timeout":
            message = f"Timeout: evaluation killed after {time.monotonic() - started:.3g} s (point_timeout)"
        else:
            message = f"Crash: {_describe_exit(status)}"
        out.failures[position] = Failure(message.split(": ", 1)[0], message.split(": ", 1)[1], "", status=kind)
        out.durations[position] = time.monotonic() - started
        left[position] = False


def _subset(items, positions):
    """``items`` (a list, range or numpy array) at ``positions`` (an int array)."""
    return items[positions] if isinstance(items, np.ndarray) else [items[k] for k in positions]


def _one_point(options: Isolation) -> Isolation:
    return Isolation("process", options.point_timeout, 1, options.max_memory_mb, options.scratch)


def _describe_exit(status) -> str:
    if status is None:
        return "the evaluation process died"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"the evaluation process was killed by signal {sig} ({signal_name(sig)})"
    return f"the evaluation process exited with status {os.WEXITSTATUS(status)}"
