"""The worker loop: receive chunks, evaluate them, send results back; heartbeats on the side."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections import deque

import numpy as np

from .failures import Failure
from .protocol import Kind
from .transport import Transport, Waiter

DEFAULT_HEARTBEAT = 1.0


def evaluate_chunk(fn, star: bool, pack: bool, args):
    """Evaluate ``fn`` on every point of ``args``.

    Returns ``(values, failures, durations)``: values in point order (``None``
    where a point failed), failures as ``{offset: Failure}``, durations as a
    float64 array of seconds per point.  With ``pack`` set, values that are all
    numbers or all arrays of one shape come back as one numpy array, which
    travels as a single buffer.
    """
    n = len(args)
    values = [None] * n
    durations = np.empty(n)
    failures = {}
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        try:
            values[i] = fn(*args[i]) if star else fn(args[i])
        except (Exception, SystemExit) as exc:
            failures[i] = Failure.from_exception(exc)
        durations[i] = clock() - t0
    if pack and not failures:
        values = _pack(values)
    return values, failures, durations


def _pack(values):
    first = values[0] if values else None
    if isinstance(first, (int, float, complex, np.number, np.bool_, np.ndarray)) and not isinstance(first, bool):
        try:
            packed = np.asarray(values)
        except ValueError:  # ragged arrays
            return values
        if packed.dtype.kind in "biufc" and packed.shape[:1] == (len(values),):
            return packed
    return values


def _load_function(blob: bytes):
    """Unpickle a map's ``(function, star, pack)``; a function that cannot be loaded becomes a Failure."""
    try:
        return pickle.loads(blob)
    except Exception as exc:
        return Failure.from_exception(exc), False, False


class _Heartbeat(threading.Thread):
    """Tells the master this rank is alive every ``period`` seconds, even while a point runs."""

    def __init__(self, transport: Transport, period: float):
        super().__init__(name="mpimap-heartbeat", daemon=True)
        self.transport = transport
        self.period = period
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.period):
            self.transport.send(0, Kind.HEARTBEAT)


def serve(comm, heartbeat: float = DEFAULT_HEARTBEAT) -> int:
    """Serve the master (rank 0 of ``comm``) until it says STOP; return the number of points evaluated."""
    transport = Transport(comm)
    transport.send(0, Kind.HELLO, (socket.gethostname(), os.getpid()))
    beat = _Heartbeat(Transport(comm), heartbeat)  # a Transport of its own: no state shared across threads
    beat.start()
    functions = {}  # map_id -> (fn, star, pack)
    queue: deque = deque()  # (chunk_id, map_id, args)
    waiter = Waiter(window=5e-3)
    evaluated = 0
    try:
        while True:
            message = transport.poll()
            if message is not None:
                waiter.activity()
                _, kind, body = message
                if kind is Kind.TASK:
                    chunk_id, map_id, function, args = body
                    if function is not None:
                        functions[map_id] = _load_function(function)
                    queue.append((chunk_id, map_id, args))
                elif kind is Kind.FORGET:
                    functions.pop(body, None)
                    queue = deque(t for t in queue if t[1] != body)
                elif kind is Kind.STOP:
                    return evaluated
                continue  # drain everything waiting before evaluating
            if not queue:
                waiter.idle()
                continue
            chunk_id, map_id, args = queue.popleft()
            fn, star, pack = functions[map_id]
            t0 = time.perf_counter()
            if isinstance(fn, Failure):  # the function could not be loaded here: every point fails with why
                values, failures, durations = [None] * len(args), dict.fromkeys(range(len(args)), fn), np.zeros(len(args))
            else:
                values, failures, durations = evaluate_chunk(fn, star, pack, args)
            transport.send(0, Kind.RESULT, (chunk_id, values, failures, durations, time.perf_counter() - t0))
            evaluated += len(args)
            waiter.activity()
    finally:
        beat.stopped.set()
        beat.join()
        transport.flush(timeout=5.0)
