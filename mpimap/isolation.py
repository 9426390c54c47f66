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
import logging
import mmap
import os
import pickle
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Pipe

import numpy as np

from .failures import Failure
from .pointlogs import PointLogs, capture_level, captured

ISOLATIONS = ("rank", "process", "fresh")
BATCH_SECONDS = 0.01  # the child reports results at least this often while it works
_SLOT = struct.Struct("<qd")  # shared with the child: (index of the point it evaluates, when it started)


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


def evaluate_points(fn, star: bool, args, *, scratch: bool = False, logs: PointLogs | None = None,
                    timed: bool = True):
    """Evaluate ``fn`` on every point of ``args`` in this process.

    Returns ``(values, failures, durations, kept_logs)``: values in point
    order (``None`` where a point failed), failures as ``{offset: Failure}``,
    durations as a float64 array of seconds per point, and the captured log of
    the points whose log ``logs`` keeps, as ``{offset: text}``.  Without
    ``timed`` (and with no scratch or log capture) the points run in one tight
    loop and each one's duration is the chunk's mean: timing every point costs
    ~5x a microsecond function.
    """
    n = len(args)
    if not timed and not scratch and not (logs is not None and logs.active):
        t0 = time.perf_counter()
        values, failures = _call_all(fn, star, args)
        return values, failures, np.full(n, (time.perf_counter() - t0) / max(n, 1)), {}
    values = [None] * n
    durations = np.empty(n)
    failures = {}
    kept = {}
    clock = time.perf_counter
    capture = logs is not None and logs.active
    level = capture_level() if capture else None
    for i in range(n):
        scratch_dir = _enter_scratch() if scratch else None
        if capture:
            with captured(level) as lines:
                t0 = clock()
                value, failure = _call(fn, star, args[i])
                durations[i] = clock() - t0
            if logs.keep is not None and logs.wanted(args[i], value, durations[i], failure is not None):
                kept[i] = "\n".join(lines)
            if failure is not None and logs.debug_rerun:
                with captured(logging.DEBUG) as lines:
                    _call(fn, star, args[i])
                kept[i] = (kept.get(i, "") + "\n--- debug re-run ---\n" + "\n".join(lines)).lstrip("\n")
        else:
            t0 = clock()
            value, failure = _call(fn, star, args[i])
            durations[i] = clock() - t0
        if failure is None:
            values[i] = value
        else:
            failures[i] = failure
        if scratch_dir is not None:
            _leave_scratch(scratch_dir)
    return values, failures, durations, kept


def _call(fn, star: bool, point):
    """``(value, None)``, or ``(None, Failure)`` if the function raised."""
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
    """In the fresh child: die with the rank, default fatal signals, never touch MPI."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a dead rank's child ends when its pipe closes
        pass
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
                signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    import faulthandler

    faulthandler.disable()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _PipeLog(logging.Handler):
    """In the child: log records go up the pipe to the rank, which passes them on to the job's log."""

    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def emit(self, record):
        self.conn.send(("log", record.levelno, record.name, record.getMessage()))


def _child_main(conn, slot) -> None:
    """The child's loop: evaluate chunks, report results in batches, leave when told or when due for recycling."""
    functions = {}
    evaluated = 0
    root = logging.getLogger()
    root.handlers = [_PipeLog(conn)]  # the rank's own handlers (its MPI forwarder) are not for us
    while True:
        message = conn.recv()
        if message is None:
            return
        map_id, blob, args, positions, options, logs, level = message
        root.setLevel(level)
        if blob is not None:
            functions = {map_id: pickle.loads(blob)[:2]}  # only the current map's function is kept
        fn, star = functions[map_id]
        # A batch reports positions[first:first + len(values)]: (first, values, failures, durations, logs),
        # with failures and logs keyed by the offset within the batch.
        first, values, failures, durations, kept = 0, [], {}, [], {}
        last_report, last_memory_check = time.monotonic(), 0.0
        plain = not options.scratch and not (logs is not None and logs.active)
        clock, perf, pack_slot = time.monotonic, time.perf_counter, _SLOT.pack
        for k, position in enumerate(positions):
            started = clock()
            slot[:_SLOT.size] = pack_slot(position, started)
            if plain:  # the hot path: no scratch directory, no log capture
                t0 = perf()
                value, failure = _call(fn, star, args[k])
                durations.append(perf() - t0)
            else:
                one, fails, secs, logged = evaluate_points(fn, star, args[k:k + 1], scratch=options.scratch, logs=logs)
                value, failure = one[0], fails.get(0)
                durations.append(secs[0])
                if 0 in logged:
                    kept[k - first] = logged[0]
            values.append(value)
            if failure is not None:
                failures[k - first] = failure
            evaluated += 1
            now = clock()
            due = bool(options.max_points and evaluated >= options.max_points)
            if options.max_memory_mb and (now - last_memory_check > 0.005 or now - started > 0.005):
                last_memory_check = now  # reading /proc costs ~10 µs: not after every microsecond point
                due = due or _rss_mb() > options.max_memory_mb
            if due or now - last_report > BATCH_SECONDS:
                conn.send((first, values, failures, durations, kept))
                first, values, failures, durations, kept = k + 1, [], {}, [], {}
                last_report = now
            if due:
                conn.send("recycle")
                return
        conn.send((first, values, failures, durations, kept))
        conn.send("done")


class ChildProcess:
    """A supervised child that evaluates points for this rank; restarted after a crash, hang or recycling."""

    def __init__(self):
        self.pid = None
        self.conn = None
        self.map_id = None
        self.slot = mmap.mmap(-1, _SLOT.size)  # shared (MAP_SHARED) with every child forked later
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

    def evaluate(self, map_id, blob, args, options: Isolation, logs: PointLogs, tick):
        """Evaluate a chunk in the child; same result shape as :func:`evaluate_points`.

        ``tick()`` is called at least every 50 ms while the child works; if it
        returns False the chunk is abandoned (its map was cancelled) and None
        is returned.
        """
        n = len(args)
        values, failures, durations, kept = [None] * n, {}, np.zeros(n), {}
        left = np.ones(n, dtype=bool)  # points with no result yet
        child_options = _one_point(options) if options.mode == "fresh" else options
        while left.any():
            if self.pid is None:
                self._start()
            positions = np.flatnonzero(left)
            part = args if len(positions) == n else (
                args[positions] if isinstance(args, np.ndarray) else [args[k] for k in positions])
            self.slot[:_SLOT.size] = _SLOT.pack(positions[0], time.monotonic())
            self.conn.send((map_id, blob if self.map_id != map_id else None, part, positions.tolist(),
                            child_options, logs, logging.getLogger().level))
            self.map_id = map_id
            if not self._watch(options, tick, positions, values, failures, durations, kept, left):
                self._stop(kill=True)
                return None
        return values, failures, durations, kept

    def _watch(self, options, tick, positions, values, failures, durations, kept, left) -> bool:
        """Collect the child's reports until the chunk is done or the child ends; False if abandoned."""
        while True:
            if self.conn.poll(0.05):
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    self._fail_current("crashed", self._stop(kill=True), failures, durations, left)
                    return True
                if message == "done":
                    return True
                if message == "recycle":  # the child leaves by itself
                    self._leaving.append(self.pid)
                    self.conn.close()
                    self.pid = self.conn = None
                    return True
                if message[0] == "log":  # ("log", levelno, name, text) from the evaluation
                    _, levelno, name, text = message
                    logging.getLogger(name).log(levelno, "%s", text)
                    continue
                first, got, failed, seconds, logged = message
                where = positions[first:first + len(got)]
                if len(where) and where[-1] - where[0] == len(where) - 1:
                    values[where[0]:where[-1] + 1] = got
                else:
                    for position, value in zip(where, got):
                        values[position] = value
                durations[where] = seconds
                left[where] = False
                failures.update((int(where[k]), f) for k, f in failed.items())
                kept.update((int(where[k]), t) for k, t in logged.items())
                continue
            if not tick():
                return False
            _, started = _SLOT.unpack(self.slot[:_SLOT.size])
            if options.point_timeout and time.monotonic() - started > options.point_timeout:
                self._fail_current("timeout", self._stop(kill=True), failures, durations, left)
                return True
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.conn.close()
                self.pid = self.conn = None
                self._fail_current("crashed", status, failures, durations, left)
                return True

    def _fail_current(self, kind, status, failures, durations, left) -> None:
        """Record the point the child was on as timed out or crashed (the child is gone)."""
        position, started = _SLOT.unpack(self.slot[:_SLOT.size])
        if kind == "timeout":
            message = f"Timeout: evaluation killed after {time.monotonic() - started:.3g} s (point_timeout)"
        else:
            message = f"Crash: {_describe_exit(status)}"
        failures[position] = Failure(message.split(": ", 1)[0], message.split(": ", 1)[1], "", status=kind)
        durations[position] = time.monotonic() - started
        left[position] = False


def _one_point(options: Isolation) -> Isolation:
    return Isolation("process", options.point_timeout, 1, options.max_memory_mb, options.scratch)


def _describe_exit(status) -> str:
    if status is None:
        return "the evaluation process died"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"the evaluation process was killed by signal {sig} ({signal.Signals(sig).name})"
    return f"the evaluation process exited with status {os.WEXITSTATUS(status)}"
