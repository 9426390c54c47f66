"""The only module that calls MPI: sending and receiving protocol messages, and waiting.

Sends are non-blocking (``Isend``; never synchronous), receives are matched
probes from any source, so no rank ever blocks on one particular peer, and the
:class:`Waiter` keeps a waiting rank from burning a core.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from dataclasses import dataclass

from mpi4py import MPI

from .protocol import Kind, decode, encode, oob_count

GROUP_TAG = 13  # the tag of MPI_Comm_create_group for k-rank tasks' communicators


class Transport:
    """Protocol messages over one communicator.

    ``source``: the one rank whose messages :meth:`poll` takes (a worker hears
    only the master), or any.  A worker must not take messages from its peers:
    Open MPI's ``MPI_Comm_create_group`` exchanges point-to-point messages with
    the user's tag on the parent communicator, and a member still polling with
    ``MPI_ANY_SOURCE`` would take a peer's one and leave both in the call for ever.
    """

    def __init__(self, comm, source: int = MPI.ANY_SOURCE):
        self.comm = comm
        self.source = source
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._sending: deque = deque()  # (requests, buffers kept alive until sent)
        self._status = MPI.Status()
        self._groups: dict = {}  # tuple of ranks -> the communicator of a k-rank task over them

    def send(self, dest: int, kind: Kind, obj=None) -> None:
        body, oob = encode(obj)
        requests = [self.comm.Isend([body, MPI.BYTE], dest, kind)]
        requests += [self.comm.Isend([buf, MPI.BYTE], dest, Kind.OOB) for buf in oob]
        self._sending.append((requests, body, oob))
        self._reap()

    def _reap(self) -> None:
        while self._sending and MPI.Request.Testall(self._sending[0][0]):
            self._sending.popleft()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (politely) until every send has left; False if ``timeout`` passed first."""
        waiter = Waiter(window=0.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._reap()
            if not self._sending:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            waiter.idle()

    def group_comm(self, ranks: tuple):
        """The communicator of the ranks ``ranks`` (this one among them), created on their first task together.

        ``MPI_Comm_create_group`` is collective over those ranks only, so the
        other ranks (and the master) go on serving.  Its tag cannot collide with
        the protocol's messages (MPI keeps it apart from point-to-point tags).
        Cached per rank set: every member of a set took part in the same tasks,
        so all of them find it in their cache, or none does.
        """
        comm = self._groups.get(ranks)
        if comm is None:
            group = self.comm.Get_group().Incl(list(ranks))
            try:
                comm = self.comm.Create_group(group, GROUP_TAG)
            finally:
                group.Free()
            self._groups[ranks] = comm
        return comm

    def free_groups(self) -> None:
        """Free the communicators of k-rank tasks (when serving ends).

        In one order on every rank (by rank set): were a library's free to wait
        for the other members, no two ranks could wait for each other.
        """
        for ranks in sorted(self._groups):
            self._groups.pop(ranks).Free()

    def poll(self):
        """Return the next message as ``(source, kind, obj)``, or None if none is waiting."""
        status = self._status
        msg = self.comm.Improbe(self.source, MPI.ANY_TAG, status)
        if msg is None:
            if self._sending:
                self._reap()
            return None
        source, tag = status.Get_source(), status.Get_tag()
        body = bytearray(status.Get_count(MPI.BYTE))
        msg.Recv([body, MPI.BYTE])
        buffers = []
        for _ in range(oob_count(body)):
            # Non-overtaking order: the buffers are the next OOB messages from this source.
            part = self.comm.Mprobe(source, Kind.OOB, status)
            buf = bytearray(status.Get_count(MPI.BYTE))
            part.Recv([buf, MPI.BYTE])
            buffers.append(buf)
        return source, Kind(tag), decode(body, buffers)


@dataclass(frozen=True)
class NativeSend:
    """What C code needs to send on a communicator without Python (the native heartbeat, c_ext/heartbeat.c)."""

    isend: int  # the addresses of MPI_Isend, MPI_Test and MPI_Request_free in the libmpi mpi4py loaded
    test: int
    request_free: int
    handle_size: int  # bytes of an MPI handle: an int's (MPICH) or a pointer's (Open MPI)
    comm: int  # the handles of the communicator and of MPI_BYTE
    byte: int


def native_send(comm) -> NativeSend:
    """The MPI functions and handles for sending on ``comm`` from C that does not link against MPI."""
    sizes = {MPI._sizeof(kind) for kind in (MPI.Comm, MPI.Datatype, MPI.Request)}
    if len(sizes) != 1:
        raise ValueError(f"MPI handles of different sizes {sorted(sizes)}")
    library = ctypes.CDLL(MPI.__file__)  # its symbols are looked up in mpi4py's module and the libmpi it needs

    def address(name):
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value

    return NativeSend(address("MPI_Isend"), address("MPI_Test"), address("MPI_Request_free"), sizes.pop(),
                      MPI._handleof(comm), MPI._handleof(MPI.BYTE))


class Waiter:
    """Polls without sleeping while messages flow, backs off to sleeps when none do.

    For ``spin`` seconds after the last activity the caller polls again at once
    (the reply to a message just sent is often microseconds away, and on a
    loaded machine a ``sched_yield`` can cost a whole time slice); then it may
    spin (``sched_yield``, which hands the core to a busy neighbour) for
    ``window`` seconds; after that it sleeps,
    starting at ``first_sleep`` and doubling up to ``cap``.  With ``hot_window``
    set the window adapts: ``hot_window`` while messages arrive less than
    ``hot_gap`` apart on average, ``window`` otherwise.  ``time.sleep`` costs
    ~80 µs on the machines we measured, so it must stay off the hot path.
    Figures behind the defaults: docs/design.rst.
    """

    def __init__(self, window: float = 5e-3, *, cap: float = 1e-3, first_sleep: float = 1e-5,
                 hot_window: float | None = None, hot_gap: float = 5e-5, spin: float = 0.0, sleep=time.sleep):
        self.spin = spin
        self.nap = sleep  # sleep(seconds); the master's ends early when another thread gives it a command
        self.cold_window = window
        self.hot_window = hot_window
        self.hot_gap = hot_gap
        self.cap = cap
        self.first_sleep = first_sleep
        self.window = window
        self.sleep = first_sleep
        self.last = time.perf_counter()
        self.gap = 1.0  # moving average of the gaps between activities

    def activity(self) -> None:
        now = time.perf_counter()
        if self.hot_window is not None:
            self.gap += (now - self.last - self.gap) / 16
            self.window = self.hot_window if self.gap < self.hot_gap else self.cold_window
        self.last = now
        self.sleep = self.first_sleep

    def idle(self) -> None:
        quiet = time.perf_counter() - self.last
        if quiet < self.spin:
            return
        if quiet < self.window:
            os.sched_yield()
        else:
            self.nap(self.sleep)
            self.sleep = min(self.sleep * 2, self.cap)
