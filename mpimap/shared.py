"""Worker state: the pool's initializer, and large objects shared once with every worker (``pool.share``).

A shared object is pickled once (protocol 5, its large buffers out of band)
into one file per host in shared memory (``/dev/shm``): the master writes it
for its own host, and a rank of another host that received the bytes writes it
there.  Every process that reads :attr:`Shared.value` maps that file read-only,
so numpy arrays are views on one copy per node.

A file stays alive while a process holds a shared ``flock`` on it (the process
that wrote it, and every mapping of it).  One left behind by a process killed
with ``-9`` holds no lock: :func:`sweep` removes such files at the next start.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import mmap
import os
import pickle
import socket
import struct
import tempfile
import time
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass

from .failures import Failure
from .protocol import record

try:  # optional: shares objects plain pickle cannot (lambdas, classes of __main__)
    import cloudpickle
except ImportError:
    cloudpickle = None

_MAGIC = b"MPIMAPS1"
_HEADER = struct.Struct("<8sQQ")  # magic, offset of the pickle, its length; then the buffers' (offset, length) pairs
_PAIR = struct.Struct("<QQ")
_ALIGN = 64  # buffers start on cache-line (and numpy-friendly) boundaries
_CHUNK = 1 << 30  # bytes per write
_TMP_GRACE = 60.0  # seconds: a half-written file younger than this may still be on its way


def _directory() -> str:
    """Where shared files live: /dev/shm (memory) where it exists, else the temporary directory (the page cache)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


PREFIX = f"mpimap-{os.getuid()}-"
_counter = itertools.count()
_values: dict[str, object] = {}  # name -> the object, in every process that has read (or published) it
_written: dict[str, int] = {}  # name -> the locked descriptor of a file this worker wrote for its host
_live: dict[str, "Published"] = {}  # name -> what this process published and has not released (see _at_exit)
_swept = False


class Shared:
    """A handle on an object sent once to every worker by :meth:`Pool.share`: pass it with the points, read
    :attr:`value` in the function.  It pickles as its name (a few dozen bytes); it is immutable."""

    __slots__ = ("name", "__weakref__")

    def __init__(self, name: str):
        self.name = name

    @property
    def value(self):
        """The shared object: on a worker, a read-only view of the host's copy (numpy arrays are not copied)."""
        try:
            return _values[self.name]
        except KeyError:
            pass
        value = _values[self.name] = _load(self.name)
        return value

    def __reduce__(self):
        return Shared, (self.name,)

    # A copy is the handle itself: on the master, the handle object's life is what keeps the shared object alive.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __eq__(self, other):
        return isinstance(other, Shared) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return f"Shared({self.name!r})"


@dataclass
class Published:
    """The master's side of a shared object: its host's file (kept alive by ``fd``'s lock) and the file's bytes,
    which ranks of other hosts receive."""

    name: str
    fd: int
    data: memoryview

    def release(self) -> None:
        """Remove the host's file; processes that map it keep their mapping until they let go of it."""
        _live.pop(self.name, None)
        _values.pop(self.name, None)
        _unlink(self.name)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@record
class ShareMessage:
    """SHARE: a shared object's file name, and its bytes for a rank on another host than the master (else None)."""

    name: str
    data: object


def publish(obj) -> tuple[Shared, Published]:
    """Pickle ``obj`` into its file on this host; return its handle and what the master keeps of it."""
    sweep()
    buffers: list = []
    try:
        body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception:
        if cloudpickle is None:
            raise
        buffers = []
        body = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    name = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{next(_counter)}"
    offset = _aligned(_HEADER.size + _PAIR.size * len(raws))
    layout, parts = [], []
    for raw in [memoryview(body), *raws]:
        layout.append((offset, raw.nbytes))
        parts.append((offset, raw))
        offset = _aligned(offset + raw.nbytes)
    header = _HEADER.pack(_MAGIC, *layout[0]) + b"".join(_PAIR.pack(*pair) for pair in layout[1:])
    fd = _write(name, offset, [(0, memoryview(header)), *parts])
    _values[name] = obj
    published = _live[name] = Published(name, fd, memoryview(mmap.mmap(fd, offset, access=mmap.ACCESS_READ)))
    return Shared(name), published


@atexit.register
def _at_exit() -> None:
    """A process that exits with shares never released (a pool never shut down) removes their files."""
    for published in list(_live.values()):
        published.release()


# A forked child (an evaluation process, or a program's own child) starts with none of its parent's shares: its
# exit must leave the parent's files alone, and remove those it publishes itself.
os.register_at_fork(after_in_child=_live.clear)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _path(name: str) -> str:
    return os.path.join(_directory(), name)


def _write(name: str, size: int, parts) -> int:
    """Create the file ``name`` of ``size`` bytes from ``parts`` (offset, buffer) and put it in place atomically
    (never over a file of that name: FileExistsError); return its descriptor, which holds a shared lock on it.

    The file is locked from its creation: :func:`sweep` never takes a file
    being written.  ``pwrite`` rather than a mapping: half the time on tmpfs.
    """
    path = _path(name)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.ftruncate(fd, size)
        for offset, buffer in parts:
            view = memoryview(buffer).cast("B")
            done = 0
            while done < view.nbytes:  # one write moves at most ~2 GiB
                done += os.pwrite(fd, view[done:done + _CHUNK], offset + done)
        os.link(tmp, path)  # FileExistsError if another process of this host put it there first: it stays
    except BaseException:
        os.close(fd)
        raise
    finally:
        _unlink_path(tmp)
    return fd


def _load(name: str):
    """Map this host's file of ``name`` read-only and unpickle it: its buffers are views on the mapping."""
    try:
        fd = os.open(_path(name), os.O_RDONLY)
    except FileNotFoundError:
        raise RuntimeError(f"shared object {name} is not available on this host: it was released (the handle "
                           "was garbage-collected on the master, or the pool shut down) or never reached this "
                           "rank") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # held by the mapping (which keeps a duplicate of fd) for as long as it lives
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    view = memoryview(mapping)
    magic, body_at, body_len = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise RuntimeError(f"shared object {name}: its file {_path(name)} is damaged")
    count = (body_at - _HEADER.size) // _PAIR.size
    pairs = [_PAIR.unpack_from(view, _HEADER.size + k * _PAIR.size) for k in range(count)]
    # Buffer pairs are written right after the header; zero pairs past the last buffer only pad to alignment.
    buffers = [view[at:at + n] for at, n in pairs if at]
    return pickle.loads(view[body_at:body_at + body_len], buffers=buffers)


def accept(message: ShareMessage) -> None:
    """On a worker (SHARE): if the bytes came with it (another host than the master's), write the host's file
    (once per host: a rank that finds it there already keeps that one)."""
    if message.data is None or message.name in _written or os.path.exists(_path(message.name)):
        return
    sweep()
    data = memoryview(message.data)
    try:
        _written[message.name] = _write(message.name, data.nbytes, [(0, data)])
    except FileExistsError:  # another rank of this host (or the master) wrote it
        pass


def release(name: str) -> None:
    """On a worker (UNSHARE): drop the object; remove the host's file if this rank wrote it."""
    _values.pop(name, None)
    fd = _written.pop(name, None)
    if fd is not None:
        _unlink(name)
        os.close(fd)


def release_all() -> None:
    """A worker that stops serving removes the files it wrote."""
    for name in list(_written):
        release(name)


def drop_released() -> None:
    """In an evaluation process (which gets no UNSHARE): let go of objects whose file was removed."""
    for name in [n for n in _values if not os.path.exists(_path(n))]:
        del _values[name]


def sweep() -> None:
    """Remove this user's shared files that no live process holds (their writer was killed); once per process."""
    global _swept
    if _swept:
        return
    _swept = True
    directory = _directory()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if ".tmp" in name and time.time() - os.stat(path).st_mtime < _TMP_GRACE:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live process holds it
        else:
            _unlink_path(path)
        finally:
            os.close(fd)


def _unlink(name: str) -> None:
    _unlink_path(_path(name))


def _unlink_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the initializer -------------------------------------------------------------------------------------------
class InitializerError(BrokenExecutor):
    """The pool's initializer raised in the process that was to evaluate a point: that map's points there fail
    with this error (its ``__cause__`` is the initializer's exception), as ``BrokenProcessPool`` says it."""


@record
class Init:
    """A pool's initializer, travelling with each map's function: it runs once per process per ``key``."""

    key: str
    fn: object
    args: tuple


_initialized: dict[str, Failure | None] = {}  # key -> None once run, or the Failure it raised


def new_init(initializer, initargs) -> Init | None:
    """The record of a pool's initializer (None without one); its key is unique to the pool."""
    if initializer is None:
        return None
    if not callable(initializer):
        raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
    return Init(f"{socket.gethostname()}-{os.getpid()}-{next(_counter)}", initializer, tuple(initargs))


def initialize(init: Init | None) -> Failure | None:
    """Run the pool's initializer in this process if it has not run here yet; the Failure it gave, if it raised."""
    if init is None:
        return None
    if init.key not in _initialized:
        try:
            init.fn(*init.args)
            _initialized[init.key] = None
        except (Exception, SystemExit) as exc:
            name = getattr(init.fn, "__qualname__", repr(init.fn))
            error = InitializerError(f"the pool's initializer {name} raised {type(exc).__name__}: {exc}; "
                                     "this process evaluates none of the pool's points")
            error.__cause__ = exc
            _initialized[init.key] = Failure.from_exception(error)
    return _initialized[init.key]


def forget_initialized() -> None:
    """In a new evaluation process: initializers run again there, as in any new process."""
    _initialized.clear()
