"""The worker loop: receive chunks, evaluate them, send results back; heartbeats on the side."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import sys
import threading
import time
from collections import deque

import numpy as np

from . import groups, native_models, nested, shared
from .failures import Failure, unpicklable_values
from .isolation import ChildProcess, Outcome, evaluate_points
from .native_models import NativeFunction, arrays, evaluate_chunk
from .protocol import Hello, Kind, LogLine, MapFunction, Result, Task, UnloadableArgs, encode
from .transport import Transport, Waiter, native_send

DEFAULT_HEARTBEAT = 1.0


def _pack(values):
    """Values that are all numbers, or all arrays of one shape, as one numpy array (one buffer on the wire)."""
    first = values[0] if values else None
    if isinstance(first, (int, float, complex, np.number, np.bool_, np.ndarray)) and not isinstance(first, bool):
        try:
            packed = np.asarray(values)
        except ValueError:  # ragged arrays
            return values
        if packed.dtype.kind in "biufc" and packed.shape[:1] == (len(values),):
            return packed
    return values


def load_function(blob: bytes) -> MapFunction | Failure:
    """Unpickle a map's :class:`MapFunction`; one that cannot be loaded here becomes the Failure of every point."""
    try:
        return pickle.loads(blob)
    except (Exception, SystemExit) as exc:
        return Failure.from_exception(exc)


class Evaluator:
    """Evaluates chunks for one rank, in the rank or in its supervised child, as each map's isolation says."""

    def __init__(self):
        self.child: ChildProcess | None = None

    def run(self, map_id, blob: bytes, function: MapFunction | Failure, args, tick=lambda: True,
            keys=None, comm=None) -> Outcome | None:
        """Evaluate ``args``; None if ``tick()`` abandoned the chunk (its map was forgotten, or the rank stops).

        ``keys``: the points' stream indices, in a map with a seed; ``comm``: the communicator of a k-rank task
        (``mpimap.task_comm()``), None for one rank.
        """
        n = len(args)
        failure = function if isinstance(function, Failure) else args.failure if isinstance(args, UnloadableArgs) \
            else None
        if failure is None and function.isolation.mode == "rank":
            failure = shared.initialize(function.init)  # in a child, the child runs it
        if failure is not None:  # the function, the points or the initializer failed here: every point fails with why
            return Outcome([None] * n, dict.fromkeys(range(n), failure), np.zeros(n), {})
        isolation = function.isolation
        if isolation.mode == "rank" and isinstance(function.fn, NativeFunction) and not isolation.scratch \
                and not (function.logs is not None and function.logs.active) \
                and (batch := arrays(function.fn, args)) is not None:
            out = evaluate_chunk(function.fn, *batch, timed=function.pack, packed=function.pack, tick=tick)
            return None if out is None else Outcome(*out, {})
        if isolation.mode == "rank":
            saved = groups._enter(comm)
            try:
                out = evaluate_points(function.fn, function.star, args, scratch=isolation.scratch,
                                      logs=function.logs, timed=function.pack, seed=function.seed, keys=keys)
            finally:
                groups._leave(saved)
        else:
            if self.child is None:
                self.child = ChildProcess()
            out = self.child.evaluate(map_id, blob, args, isolation, function.logs, tick, keys)
            if out is None:
                return None
        if function.pack and not out.failures:
            return dataclasses.replace(out, values=_pack(out.values))
        return out

    def close(self) -> None:
        if self.child is not None:
            self.child.close()


class _Heartbeat(threading.Thread):
    """Tells the master this rank is alive every ``period`` seconds, even while a point runs in the rank.

    With the C extension the beats come from a native thread that never takes
    the GIL (c_ext/heartbeat.c), so a C call holding the GIL cannot stop them;
    this thread then only bumps the counter by which each beat says whether
    the rank's Python side has moved since the last one (docs/design.rst,
    "Heartbeats").  Without the extension this thread sends the beats.
    """

    def __init__(self, comm, period: float):
        super().__init__(name="mpimap-heartbeat", daemon=True)
        self.comm = comm
        self.period = period
        self.stopped = threading.Event()
        self.in_c = False
        self.transport = None  # the Python beats' own Transport: no state shared across threads

    def start(self) -> None:
        self.in_c = native_models.extension is not None and self._start_native()
        if not self.in_c:
            self.transport = Transport(self.comm)
        super().start()

    def _start_native(self) -> bool:
        try:
            mpi = native_send(self.comm)
            native_models.extension.heartbeat_start(mpi.isend, mpi.test, mpi.request_free, mpi.handle_size,
                                                    mpi.comm, mpi.byte, 0, Kind.HEARTBEAT, encode(False)[0],
                                                    encode(True)[0], self.period)
        except (ValueError, OSError, AttributeError) as exc:  # an MPI whose functions or handles are not found
            logging.getLogger(__name__).warning("no native heartbeat (%s): heartbeats come from Python", exc)
            return False
        return True

    def run(self):
        if self.in_c:  # twice a period: a beat finds it moved, even when the two threads' wake-ups drift
            moved = native_models.extension.heartbeat_moved
            while not self.stopped.wait(self.period / 2):
                moved()
        else:
            while not self.stopped.wait(self.period):
                self.transport.send(0, Kind.HEARTBEAT, True)

    def stop(self) -> None:
        """Stop the beats (before the rank stops serving: never after MPI_Finalize)."""
        self.stopped.set()
        self.join()
        if self.in_c:
            native_models.extension.heartbeat_stop(5.0)


class _Forward(logging.Handler):
    """Sends this rank's log records to the master, which writes them to the job's log with rank and host."""

    def __init__(self, transport: Transport):
        super().__init__()
        self.transport = transport
        self._lock_sends = threading.Lock()

    def emit(self, record):
        if record.name.startswith("mpimap.rank"):
            return
        with self._lock_sends:
            self.transport.send(0, Kind.LOG, LogLine(record.levelno, record.name, record.getMessage()))


class _Worker:
    """The state of one serving rank: its queue, its functions, its evaluator."""

    def __init__(self, comm, heartbeat: float):
        self.transport = Transport(comm, source=0)  # the master: never a k-rank task's peer (see Transport)
        self.beat = _Heartbeat(comm, heartbeat)
        self.functions = {}  # map_id -> (blob, its MapFunction, or the Failure of loading it)
        self.queue: deque = deque()  # Task
        self.evaluator = Evaluator()
        self.forward = _Forward(Transport(comm))
        self.stopping = False
        self.evaluated = 0
        self.nesting = nested.WorkerNesting(self)
        self.waiter = Waiter(window=5e-3, spin=5e-5)  # a chunk's successor is usually on its way: look again at once
        self.forgotten: set = set()  # maps forgotten while k-rank tasks of theirs were queued: dropped after those

    def handle(self, kind, body) -> None:
        if kind is Kind.TASK:
            if body.function is not None:
                self.functions[body.map_id] = (body.function, load_function(body.function))
            self.queue.append(body)
        elif kind is Kind.FORGET:
            self._forget(body)
        elif kind is Kind.SHARE:
            shared.accept(body)
        elif kind is Kind.UNSHARE:
            shared.release(body)
        elif kind is Kind.SUBRESULT:
            self.nesting.receive(body)
        elif kind is Kind.LEVEL:
            logging.getLogger().setLevel(body)
        elif kind is Kind.STOP:
            self.stopping = True
            self.queue = deque(t for t in self.queue if t.group)

    def _forget(self, map_id) -> None:
        """Drop a map's queued chunks and its function, but not its k-rank tasks.

        Another member of such a task may be inside it already, waiting for
        this rank in a collective call: each member runs every k-rank task it
        receives (then the function goes).
        """
        self.queue = deque(t for t in self.queue if t.map_id != map_id or t.group)
        if any(t.map_id == map_id for t in self.queue):
            self.forgotten.add(map_id)
        else:
            self.functions.pop(map_id, None)

    def serve(self) -> int:
        self.transport.send(0, Kind.HELLO, Hello(host_name(self.transport.rank), os.getpid()))
        self.beat.start()
        logging.getLogger().addHandler(self.forward)
        try:
            while not self.stopping or self.queue:  # after STOP, only k-rank tasks are left: their peers wait
                self.step()
            return self.evaluated
        finally:
            logging.getLogger().removeHandler(self.forward)
            self.evaluator.close()
            shared.release_all()
            self.transport.free_groups()
            self.beat.stop()
            self.transport.flush(timeout=5.0)

    def step(self, waiting: bool = False) -> None:
        """Handle one message, else evaluate one queued chunk, else wait a little.

        Messages are drained before any chunk is evaluated.  A task waiting for
        its nested maps (``waiting``) calls this too: it takes the chunk of the
        newest map first (nested maps are newer than their parents).
        """
        message = self.transport.poll()
        if message is not None:
            self.waiter.activity()
            self.handle(message[1], message[2])
        elif not self.queue:
            self.waiter.idle()
        else:
            queue = self.queue
            k = max(range(len(queue)), key=lambda k: queue[k].map_id) if waiting else 0
            task = queue[k]
            del queue[k]
            self.run_chunk(task)
            self.waiter.activity()

    def run_chunk(self, task: Task) -> None:
        map_id = task.map_id
        blob, function = self.functions[map_id]

        def tick():
            """While a child evaluates: take in messages; abandon the chunk if its map is forgotten."""
            while (message := self.transport.poll()) is not None:
                self.handle(message[1], message[2])
            return map_id in self.functions and not self.stopping

        t0 = time.perf_counter()
        saved = nested._enter(self.nesting, task.chunk_id, function)
        try:
            if task.group is not None:
                out = self._run_group(task, blob, function)
            else:
                out = self.evaluator.run(map_id, blob, function, task.args, tick, task.keys)
        finally:
            nested._leave(saved)
        self.nesting.chunk_done(task.chunk_id)
        if out is None:
            return
        result = Result(task.chunk_id, out.values, out.failures, out.durations, time.perf_counter() - t0, out.logs)
        try:
            self.transport.send(0, Kind.RESULT, result)
        except (Exception, SystemExit) as exc:  # a value that cannot be pickled fails its point, not the rank
            values, failures = unpicklable_values(result.values, result.failures, exc)
            self.transport.send(0, Kind.RESULT, dataclasses.replace(result, values=values, failures=failures))
        self.evaluated += len(task.args)

    def _run_group(self, task: Task, blob, function) -> Outcome:
        """Evaluate this rank's part of a k-rank task, on the communicator of its ranks."""
        try:
            comm = self.transport.group_comm(task.group)
        except Exception as exc:
            return Outcome([None], {0: Failure.from_exception(exc)}, np.zeros(1), {})
        try:
            return self.evaluator.run(task.map_id, blob, function, task.args, keys=task.keys, comm=comm)
        finally:
            if task.map_id in self.forgotten and not any(t.map_id == task.map_id for t in self.queue):
                self.forgotten.discard(task.map_id)
                self.functions.pop(task.map_id, None)


def host_name(rank: int) -> str:
    """The name of this rank's node: ``MPIMAP_HOST`` if set (``{rank}`` is replaced), else the host name.

    Failures are counted per node; where host names do not tell nodes apart
    (containers, several VMs with one name), set MPIMAP_HOST.
    """
    return os.environ.get("MPIMAP_HOST", socket.gethostname()).replace("{rank}", str(rank))


def serve(comm, heartbeat: float | None = None) -> int:
    """Serve the master (rank 0 of ``comm``) until it says STOP; return the number of points evaluated.

    ``heartbeat`` is the period of this rank's heartbeats; None means ``MPIMAP_HEARTBEAT``, else 1 s.
    """
    if heartbeat is None:
        heartbeat = heartbeat_from_environment(warn=comm.Get_rank() == 1)
    return _Worker(comm, heartbeat).serve()


def is_period(value) -> bool:
    """Whether ``value`` is a heartbeat period: a positive finite number of seconds."""
    return isinstance(value, (int, float)) and 0 < value < float("inf")


def heartbeat_from_environment(warn: bool) -> float:
    """``MPIMAP_HEARTBEAT`` in seconds; the default, with one warning line (``warn``: from one rank only), if it is
    not a positive number: a period of 0 would flood the master with heartbeats and starve the job."""
    text = os.environ.get("MPIMAP_HEARTBEAT")
    if text is None:
        return DEFAULT_HEARTBEAT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if is_period(value):
        return value
    if warn:
        print(f"mpimap: MPIMAP_HEARTBEAT={text!r} is not a positive number of seconds: using {DEFAULT_HEARTBEAT} s",
              file=sys.stderr, flush=True)
    return DEFAULT_HEARTBEAT
