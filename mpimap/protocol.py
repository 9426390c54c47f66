"""The wire protocol between the master and the workers: message kinds, their bodies and their encoding.

Every message is one MPI message whose tag is its :class:`Kind` (never a task
or chunk id: MPI_TAG_UB may be as low as 32767).  The body is a pickle
(protocol 5).  Buffers of ``OOB_THRESHOLD`` bytes or more (numpy arrays) are
not copied into the pickle: they follow as separate messages tagged
``Kind.OOB``, and the body's first four bytes say how many follow.

Message bodies, by kind (the records are defined below; adding a field is one change here):

==========  ==================  ======================================================
kind        direction           body
==========  ==================  ======================================================
HELLO       worker -> master    :class:`Hello`, once when the worker starts serving
TASK        master -> worker    :class:`Task`: one chunk of a map; the first chunk of a
                                map to a rank carries the pickled :class:`MapFunction`;
                                a k-rank task goes to each of its ranks (``group``)
RESULT      worker -> master    :class:`Result`: a chunk's values, failures and timings
HEARTBEAT   worker -> master    ``True``, every heartbeat period; ``False`` from the native
                                heartbeat when the rank's Python side has not moved since
                                its last beat (a C call holding the GIL)
FORGET      master -> worker    ``map_id``: drop its queued chunks and its function
STOP        master -> worker    ``None``: leave the serve loop
LOG         worker -> master    :class:`LogLine`: a log record of the rank (or of its
                                evaluation process), for the job's log
LEVEL       master -> worker    ``levelno``: the rank's new log level
SHARE       master -> worker    :class:`~mpimap.shared.ShareMessage`: an object of ``pool.share``
                                (its bytes as one raw buffer for a rank on another host)
UNSHARE     master -> worker    the shared object's name: drop it, remove its file
SUBMAP      worker -> master    :class:`SubMap`: a map asked for by a task running on the worker
                                (``mpimap.current_pool()``), scheduled like any other map
SUBRESULT   master -> worker    :class:`SubResult`: a chunk of a nested map's results, or its end
SUBCANCEL   worker -> master    ``sub_id``: the task dropped one of its nested maps
OOB         either              a raw buffer belonging to the preceding message
==========  ==================  ======================================================
"""

from __future__ import annotations

import copyreg
import operator
import pickle
import zlib
from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np

from .failures import Failure

OOB_THRESHOLD = 64 * 1024
_COUNT_BYTES = 4


class Kind(IntEnum):
    HELLO = 1
    TASK = 2
    RESULT = 3
    HEARTBEAT = 4
    FORGET = 5
    STOP = 6
    OOB = 7
    LOG = 8
    LEVEL = 9
    SHARE = 10
    UNSHARE = 11
    SUBMAP = 12
    SUBRESULT = 13
    SUBCANCEL = 14


def record(cls):
    """A frozen, slotted dataclass that pickles as its class and its field values: the cheapest form on the wire."""
    cls = dataclass(frozen=True, slots=True)(cls)
    if "__reduce__" not in vars(cls):
        values = operator.attrgetter(*(f.name for f in fields(cls)))
        cls.__reduce__ = lambda self: (cls, values(self))
    _register(cls)
    return cls


def _register(obj) -> None:
    """Give ``obj`` a copyreg extension code: it pickles in a few bytes, with no lookup of its name."""
    key = (obj.__module__, obj.__qualname__)
    if key not in copyreg._extension_registry:  # the code comes from the name: the same in every process
        copyreg.add_extension(*key, 0x40000000 | zlib.crc32(".".join(key).encode()) & 0x3FFFFFFF)


@record
class MapFunction:
    """What a worker needs to evaluate a map's points; pickled once per map, it travels with a rank's first chunk."""

    fn: object
    star: bool  # call fn(*point), not fn(point)
    pack: bool  # return a chunk's values as one numpy array when they are all numbers (or arrays of one shape)
    isolation: object  # an isolation.Isolation: where and under which limits the points run
    logs: object  # a pointlogs.PointLogs: which points keep their captured log
    seed: object = None  # the map's seed (an int), or None: see mpimap.seeds
    init: object = None  # a shared.Init: the pool's initializer, run once per process before its first point


@record
class Task:
    """One chunk of a map for a worker (TASK).

    ``args`` travel apart (see :func:`_apart`): points that fail to unpickle
    on the worker (a ``__setstate__`` that raises) arrive as
    :class:`UnloadableArgs` and fail their chunk, not the rank.
    """

    chunk_id: int
    map_id: int
    function: bytes | None  # the pickled MapFunction, with the first chunk of a map to a rank; else None
    args: object  # the chunk's points: a list, range or numpy array (UnloadableArgs if they failed to unpickle)
    keys: object = None  # the stream index of each point (a range, list or int array) in a map with a seed; else None
    group: tuple | None = None  # a k-rank task (one point): the pool ranks that run it together, lowest first

    def __reduce__(self):
        if _always_loads(self.args):
            return Task, (self.chunk_id, self.map_id, self.function, self.args, self.keys, self.group)
        return _task, (self.chunk_id, self.map_id, self.function, self.keys, self.group, len(self.args),
                       *_apart(self.args))


@record
class UnloadableArgs:
    """A chunk's points that could not be unpickled on the worker: every point fails with ``failure``."""

    failure: Failure
    size: int

    def __len__(self):
        return self.size


def _task(chunk_id, map_id, function, keys, group, size, inner, *buffers) -> Task:
    args = _load_apart(inner, buffers)
    if isinstance(args, Failure):
        args = UnloadableArgs(args, size)
    return Task(chunk_id, map_id, function, args, keys, group)


@record
class Result:
    """A chunk's results (RESULT): values in point order (None where a point failed), failures by offset.

    ``values`` travel apart (see :func:`_apart`): values that fail to unpickle
    on the master (a class it cannot import) fail their chunk's points, not
    the master.
    """

    chunk_id: int
    values: object  # a list, or one numpy array when the map packs its values
    failures: dict  # offset within the chunk -> failures.Failure
    durations: object  # float64 array of seconds per point
    seconds: float  # the whole chunk's time on the worker
    logs: dict  # offset -> captured log text, where kept

    def __reduce__(self):
        # Durations go as a raw float64 buffer (pickling a small ndarray costs ~5 µs, the buffer well under 1), a
        # few as a list of floats (cheaper still).
        durations = self.durations
        durations = durations.tolist() if len(durations) <= _FEW else \
            pickle.PickleBuffer(np.ascontiguousarray(durations, dtype=np.float64))
        values = self.values if _always_loads(self.values) else _apart(self.values)
        return _result, (self.chunk_id, self.failures, durations, self.seconds, self.logs, values)


def _result(chunk_id, failures, durations, seconds, logs, values) -> Result:
    durations = np.array(durations) if type(durations) is list else np.frombuffer(durations, dtype=np.float64)
    if type(values) is tuple:  # (pickle, *buffers) from _apart
        values = _load_apart(values[0], values[1:])
        if isinstance(values, Failure):
            failures = {**dict.fromkeys(range(len(durations)), values), **failures}
            values = [None] * len(durations)
    return Result(chunk_id, values, failures, durations, seconds, logs)


# Built-in scalars: immutable, small, not weak-referable, and they always unpickle.
SCALARS = frozenset((int, float, complex, bool, str, bytes, type(None)))
_FEW = 8  # a list up to this long is checked item by item (cheaper than a pickle of its own)


def _always_loads(obj) -> bool:
    """A range, a numpy array without Python objects, or a short list of built-in scalars: nothing in it can fail
    to unpickle, so it need not travel apart."""
    kind = type(obj)
    return kind is range or (kind is np.ndarray and not obj.dtype.hasobject) or \
        (kind is list and len(obj) <= _FEW and SCALARS.issuperset(map(type, obj)))


def _apart(obj) -> tuple:
    """``obj`` as a pickle of its own, followed by its large buffers (they still travel out of band).

    Loading it apart (:func:`_load_apart`) catches what its loading raises, so
    one unloadable point costs its chunk, never the message and the process
    that receives it.
    """
    buffers = []
    return (pickle.dumps(obj, protocol=5, buffer_callback=buffers.append), *buffers)


def _load_apart(inner, buffers):
    """The object pickled by :func:`_apart`, or the Failure of loading it."""
    try:
        return pickle.loads(inner, buffers=buffers)
    except (Exception, SystemExit) as exc:  # a __setstate__ may even call sys.exit
        return Failure.from_exception(exc)


_register(_task)
_register(_result)


@record
class SubMap:
    """A nested map (SUBMAP): a task on a worker maps ``function`` over ``args`` on the whole pool.

    ``sub_id`` names it on its rank; ``parent`` is the chunk whose task asked
    for it (its map is the parent map: cancelling that cancels this one).
    ``args`` travel apart like a :class:`Task`'s: points the master cannot
    unpickle arrive as :class:`UnloadableArgs` and fail the nested map alone.
    """

    sub_id: int
    parent: int  # chunk_id of the task that asked for it
    function: bytes  # the pickled MapFunction
    args: object
    ordered: bool
    chunksize: int | None
    priority: int  # added to the parent map's priority + 1: inner work drains first
    policy: object  # a maps.Policy
    seeded: bool = False  # the function has a seed: point i draws from stream i

    def __reduce__(self):
        rest = (self.ordered, self.chunksize, self.priority, self.policy, self.seeded)
        return _submap, (self.sub_id, self.parent, self.function, rest, len(self.args), *_apart(self.args))


def _submap(sub_id, parent, function, rest, size, inner, *buffers) -> SubMap:
    args = _load_apart(inner, buffers)
    if isinstance(args, Failure):
        args = UnloadableArgs(args, size)
    return SubMap(sub_id, parent, function, args, *rest)


_register(_submap)


@record
class SubResult:
    """Results of a nested map for the worker that asked for it (SUBRESULT): one chunk, or the map's end.

    ``chunk`` is a ``maps.ChunkResult`` (None in the last message); the last
    message says ``end`` and, if the map did not complete, why (``cancelled``,
    or the :class:`~mpimap.failures.Failure` in ``error``).
    """

    sub_id: int
    chunk: object = None
    end: bool = False
    cancelled: bool = False
    error: object = None  # a Failure, or None


@record
class Hello:
    """A worker's introduction (HELLO)."""

    host: str
    pid: int


@record
class LogLine:
    """A log record of a worker rank or of its evaluation process (LOG), already filtered by the rank's level."""

    levelno: int
    name: str
    text: str


def encode(obj) -> tuple[bytes, list]:
    """Pickle ``obj``; return the body and the large buffers that travel on their own."""
    oob = []

    def keep_small_inline(buf):
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True
        oob.append(raw)
        return False

    body = pickle.dumps(obj, protocol=5, buffer_callback=keep_small_inline)
    return len(oob).to_bytes(_COUNT_BYTES, "little") + body, oob


def oob_count(body) -> int:
    """How many out-of-band buffers follow a message with this body."""
    return int.from_bytes(body[:_COUNT_BYTES], "little")


def decode(body, buffers):
    return pickle.loads(memoryview(body)[_COUNT_BYTES:], buffers=buffers)
