"""The results file: HDF5, one row per point, streamed as results arrive, resumable after any kill.

Layout and guarantees are documented in docs/results-format.rst.  In short:
the writer keeps the file in SWMR mode, so ``h5py.File(path, "r", swmr=True)``
(or :func:`read_results`) reads every flushed row while the job runs and
after it was killed; a resume clears the "open for writing" flags that a kill
leaves behind, and evaluates only the rows still pending.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import time

import h5py
import numpy as np

from . import __version__
from .errors import MpimapError
from .inputs import checksum

FORMAT = "mpimap-results"
FORMAT_VERSION = 1
FLUSH_ROWS = 1 << 18  # buffered rows that force a flush whatever the interval
STATUS = {"pending": 0, "done": 1, "failed": 2, "timeout": 3, "crashed": 4}
STATUS_NAMES = {v: k for k, v in STATUS.items()}
STATUS_DTYPE = h5py.enum_dtype(STATUS, basetype="i1")
TEXT = h5py.string_dtype()

# Per-point columns other than the value: name -> (dtype, fill value).
COLUMNS = {
    "status": (STATUS_DTYPE, 0),
    "seconds": (np.float64, np.nan),
    "rank": (np.int32, -1),
    "host": (np.int32, -1),
    "run": (np.int16, -1),
    "attempts": (np.int16, 0),
    "verified": (np.int8, 0),
    "error": (TEXT, ""),
    "log": (TEXT, ""),
}


class ResultStore:
    """The results file of one running job; only rank 0 writes it."""

    def __init__(self, path: str, file: h5py.File, lock, run: int, flush_interval: float):
        self.path = path
        self._file = file
        self._lock = lock
        self.run = run
        self.flush_interval = flush_interval
        self._last_flush = time.monotonic()
        self._hosts = {name.decode(): i for i, name in enumerate(file["hosts"][()])}
        self.size = len(file["status"])
        self._pending: list = []  # buffered chunks, see write()
        self._pending_rows = 0
        self._layout = _existing_layout(file)  # (dtype, shape) of values, TEXT for JSON; None until known

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str, points: np.ndarray, function: str, *, fresh: bool = False,
             flush_interval: float = 1.0) -> "ResultStore":
        """Create the results file, or reopen it to resume the same job (same function and points)."""
        lock = _take_lock(path)
        try:
            digest = checksum(points)
            if os.path.exists(path) and not fresh:
                file = _reopen(path, function, digest, len(points))
            else:
                file = _create(path, points, function, digest)
            run = int(file.attrs["runs"])
            file.attrs["runs"] = run + 1
            file.attrs["state"] = "running"
            file.swmr_mode = True
        except BaseException:
            _release_lock(lock, path)
            raise
        return cls(path, file, lock, run, flush_interval)

    def todo(self, retry_failed: bool = False) -> np.ndarray:
        """Indices of the points still to evaluate: pending ones (and failed ones if asked)."""
        status = self._file["status"][()]
        wanted = status == STATUS["pending"]
        if retry_failed:
            wanted |= status >= STATUS["failed"]
        return np.flatnonzero(wanted)

    # -- writing -----------------------------------------------------------------
    def write(self, indices: np.ndarray, values, failures: dict, durations, rank: int, host: str,
              attempts: dict | None = None, logs: dict | None = None) -> None:
        """Take the results of the points ``indices`` (one chunk, in order); they reach the file at the next flush.

        Rows are buffered and written in large sorted runs: a write per chunk
        and column costs far more than the data.  A flush happens every
        ``flush_interval`` seconds, at ``FLUSH_ROWS`` buffered rows, and at close.
        """
        n = len(indices)
        status = np.full(n, STATUS["done"], dtype=np.int8)
        errors = {}
        for offset, failure in failures.items():
            status[offset] = STATUS[failure.status]
            errors[offset] = f"{failure.text}\n\n{failure.traceback}" if failure.traceback else failure.text
        if self._layout is None:
            first_good = next((i for i in range(n) if i not in failures), None)
            if first_good is not None:
                self._layout = _layout_of(values[first_good])
        column, misfits = self._value_column(values, failures, n)
        for offset, text in misfits.items():
            status[offset] = STATUS["failed"]
            errors[offset] = text
        tries = np.ones(n, np.int16)
        for offset, count in (attempts or {}).items():
            tries[offset] = count
        self._pending.append((indices, status, np.asarray(durations), np.full(n, rank, np.int32),
                              np.full(n, self._host_id(host), np.int32), tries, column,
                              {int(indices[k]): text for k, text in errors.items()},
                              {int(indices[k]): text for k, text in (logs or {}).items()}))
        self._pending_rows += n
        if self._pending_rows >= FLUSH_ROWS or time.monotonic() - self._last_flush > self.flush_interval:
            self.flush()

    def mark_verified(self, indices, same) -> None:
        """Record the outcome of re-evaluating points on another host: 1 the results agreed, 2 they did not."""
        self.flush()
        column = self._file["verified"]
        for index, ok in zip(indices, same):
            column[int(index)] = 1 if ok else 2

    def _value_column(self, values, failures, n):
        """The chunk's values as one array in the file's layout (fill where failed); misfits as ``{offset: error}``."""
        if self._layout is None:  # every point of every chunk so far failed
            return None, {}
        dtype, shape = self._layout
        if dtype is TEXT:
            column = np.array(["" if i in failures else _to_json(values[i]) for i in range(n)], dtype=object)
            return column, {}
        if isinstance(values, np.ndarray) and values.shape[1:] == shape:
            return values.astype(dtype, copy=False), {}
        column = np.full((n, *shape), np.nan if np.dtype(dtype).kind in "fc" else 0, dtype=dtype)
        misfits = {}
        for i in range(n):
            if i in failures:
                continue
            try:
                value = np.asarray(values[i], dtype=dtype)
                if value.shape != shape:
                    raise ValueError(f"shape {value.shape}")
            except (ValueError, TypeError) as exc:
                misfits[i] = (f"StoreError: result {_describe(values[i])} does not fit the stored results "
                              f"(of type {np.dtype(dtype)}, shape {shape}): {exc}")
                continue
            column[i] = value
        return column, misfits

    def flush(self) -> None:
        """Write the buffered rows, in sorted contiguous runs, and make them visible to readers."""
        if self._pending:
            if self._layout is not None and "value" not in self._file and "value_json" not in self._file:
                self._create_value_dataset()  # replaces self._file
            f = self._file
            parts = list(zip(*self._pending))
            indices = np.concatenate(parts[0])
            order = np.argsort(indices, kind="stable")
            indices = indices[order]
            columns = {name: np.concatenate(part)[order] for name, part in
                       zip(("status", "seconds", "rank", "host", "attempts"), parts[1:6])}
            if self._layout is not None:
                filler = self._fill_column
                columns["value_json" if self._layout[0] is TEXT else "value"] = np.concatenate(
                    [c if c is not None else filler(len(i)) for i, c in zip(parts[0], parts[6])])[order]
            columns["run"] = np.full(len(indices), self.run, np.int16)
            for sel, part in _runs(indices):
                for name, column in columns.items():
                    f[name][sel] = column[part]
            for name, texts in (("error", parts[7]), ("log", parts[8])):
                for chunk_texts in texts:
                    for index, text in chunk_texts.items():
                        f[name][index] = text
            self._pending.clear()
            self._pending_rows = 0
        self._file.flush()
        self._last_flush = time.monotonic()

    def _fill_column(self, n):
        dtype, shape = self._layout
        if dtype is TEXT:
            return np.full(n, "", dtype=object)
        return np.full((n, *shape), np.nan if np.dtype(dtype).kind in "fc" else 0, dtype=dtype)

    def _create_value_dataset(self) -> None:
        """Create the value dataset in the layout chosen from the first value: numeric, or JSON text."""
        dtype, shape = self._layout
        # Datasets cannot be created in SWMR mode: reopen briefly without it.
        self._file.close()
        self._file = h5py.File(self.path, "r+", libver="latest", locking=False)
        n = self.size
        if dtype is TEXT:
            self._file.create_dataset("value_json", shape=(n,), maxshape=(None,), chunks=(min(n, 4096),),
                                      dtype=TEXT, fillvalue="")
        else:
            fill = np.nan if np.dtype(dtype).kind in "fc" else 0
            self._file.create_dataset("value", shape=(n, *shape), maxshape=(None, *shape), chunks=True,
                                      dtype=dtype, fillvalue=fill)
        self._file.swmr_mode = True

    def _host_id(self, host: str) -> int:
        if host not in self._hosts:
            hosts = self._file["hosts"]
            hosts.resize((len(hosts) + 1,))
            hosts[-1] = host.encode()
            self._hosts[host] = len(hosts) - 1
        return self._hosts[host]

    def close(self, state: str) -> None:
        """Flush, record the job's ``state`` (complete, interrupted, failed) and release the file."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
        with h5py.File(self.path, "r+", libver="latest", locking=False) as f:
            f.attrs["state"] = state
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._file = None
        _release_lock(self._lock, self.path)


def _layout_of(value):
    """How values like this one are stored: (numeric dtype, shape), or (TEXT, ()) for JSON."""
    if _is_numeric(value):
        array = np.asarray(value)
        kind = {"b": np.bool_, "i": np.int64, "u": np.int64, "f": np.float64, "c": np.complex128}[array.dtype.kind]
        return kind, array.shape
    _to_json(value)  # fails with a clear message if it cannot be stored at all
    return TEXT, ()


def _existing_layout(file):
    if "value" in file:
        return file["value"].dtype.type, file["value"].shape[1:]
    if "value_json" in file:
        return TEXT, ()
    return None


def _is_numeric(value) -> bool:
    if isinstance(value, (bool, np.bool_, int, float, complex, np.number)):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


def _describe(value) -> str:
    return f"of type {type(value).__name__}" + (f" and shape {value.shape}" if hasattr(value, "shape") else "")


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _to_json(value) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise MpimapError(f"the function returned a value {_describe(value)} that cannot be stored ({exc}): "
                          "return numbers, numeric arrays, or JSON data (dict, list, str)") from None


def _runs(indices: np.ndarray):
    """Split sorted file indices into contiguous runs: yield (file slice, slice into the chunk)."""
    n = len(indices)
    if n and indices[-1] - indices[0] == n - 1:
        yield slice(int(indices[0]), int(indices[-1]) + 1), slice(0, n)
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [n]))
    for a, b in zip(starts, stops):
        yield slice(int(indices[a]), int(indices[b - 1]) + 1), slice(int(a), int(b))


def _create(path: str, points: np.ndarray, function: str, digest: str) -> h5py.File:
    tmp = f"{path}.new"
    try:
        file = h5py.File(tmp, "w", libver="latest", locking=False)
    except OSError as exc:
        raise MpimapError(f"cannot create results file {path}: {exc}") from None
    n = len(points)
    file.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, mpimap_version=__version__,
                      function=function, points_checksum=digest, runs=0, state="created",
                      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), created_on=socket.gethostname())
    file.create_dataset("points", data=points)
    for name, (dtype, fill) in COLUMNS.items():
        file.create_dataset(name, shape=(n,), maxshape=(None,), chunks=(min(n, 16384),), dtype=dtype,
                            fillvalue=fill)
    file.create_dataset("hosts", shape=(0,), maxshape=(None,), chunks=(64,), dtype="S255")
    file.close()
    os.replace(tmp, path)  # an existing file is replaced only once the new one is complete
    return h5py.File(path, "r+", libver="latest", locking=False)


def _reopen(path: str, function: str, digest: str, n: int) -> h5py.File:
    try:
        file = h5py.File(path, "r+", libver="latest", locking=False)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise MpimapError(f"cannot reopen {path} to resume: {exc}; use --fresh to start over") from None
        clear_write_flags(path)  # left behind by a killed writer; our lock proves none is alive
        try:
            file = h5py.File(path, "r+", libver="latest", locking=False)
        except OSError as exc2:
            raise MpimapError(f"cannot reopen {path} to resume: {exc2}; use --fresh to start over") from None
    try:
        attrs = file.attrs
        if attrs.get("format") != FORMAT:
            raise MpimapError(f"{path} is not an mpimap results file; choose another --out, or --fresh to overwrite")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise MpimapError(f"{path} was written by a newer mpimap (format {attrs['format_version']}); "
                              "upgrade mpimap to resume it")
        if attrs["function"] != function:
            raise MpimapError(f"{path} holds results of {attrs['function']}, not {function}; "
                              "use another --out, or --fresh to start over")
        if attrs["points_checksum"] != digest or len(file["status"]) != n:
            raise MpimapError(f"{path} was computed for different points; use another --out, or --fresh to start over")
    except BaseException:
        file.close()
        raise
    return file


def _take_lock(path: str):
    """Hold ``PATH.lock`` while writing, so two jobs never write one file (released by the kernel on any kill)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MpimapError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise MpimapError(f"cannot write {path}: it is a directory; give a file name such as results.h5")
    try:
        lock = open(f"{path}.lock", "a+")
    except OSError as exc:
        raise MpimapError(f"cannot write {path}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise MpimapError(f"{path} is being written by another running job ({owner}); "
                          "wait for it or use another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def _release_lock(lock, path: str) -> None:
    try:
        os.unlink(f"{path}.lock")
    except OSError:
        pass
    lock.close()


# -- recovery after a kill ----------------------------------------------------------------------------------------
def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: the checksum of HDF5 metadata blocks."""
    mask = 0xFFFFFFFF

    def rot(x, k):
        return ((x << k) | (x >> (32 - k))) & mask

    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & mask
    i = 0
    while length - i > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & mask
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & mask
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        i += 12
    if length == i:
        return c
    tail = data[i:] + bytes(12 - (length - i))
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


def clear_write_flags(path: str) -> None:
    """Do what ``h5clear -s --increment`` does, for a file whose writer was killed.

    A SWMR writer sets "file open for writing" flags in the superblock (version
    3); after a kill they stay set and HDF5 refuses to reopen the file.  Clear
    them, make the end-of-allocation cover the whole file (as ``--increment``
    does), and re-checksum the superblock.  Only call this when no process is
    writing the file.
    """
    with open(path, "r+b") as f:
        block = bytearray(f.read(48))
        if block[:8] != b"\x89HDF\r\n\x1a\n" or block[8] not in (2, 3) or block[9] != 8:
            raise MpimapError(f"{path}: unexpected HDF5 superblock; cannot clear its write flags")
        eoa = struct.unpack_from("<Q", block, 28)[0]
        block[11] = 0
        struct.pack_into("<Q", block, 28, max(eoa, os.path.getsize(path)))
        struct.pack_into("<I", block, 44, _lookup3(bytes(block[:44])))
        f.seek(0)
        f.write(block)


def open_for_reading(path: str) -> h5py.File:
    """Open a results file for reading, whether its job is running, finished or was killed."""
    try:
        return h5py.File(path, "r", swmr=True, locking=False)
    except FileNotFoundError:
        raise MpimapError(f"results file {path} does not exist") from None
    except OSError as exc:
        raise MpimapError(f"cannot read results file {path}: {exc}") from None


def read_results(path: str) -> dict:
    """Every column of a results file as numpy arrays, plus its attributes under ``"attrs"``.

    ``status`` comes back as strings (pending, done, failed), ``host`` as host
    names, and JSON-encoded values decoded.
    """
    with open_for_reading(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise MpimapError(f"{path} is not an mpimap results file")
        out = {name: f[name][()] for name in f if name not in ("hosts", "value_json")}
        out["attrs"] = dict(f.attrs)
        hosts = [h.decode() for h in f["hosts"][()]]
        out["host"] = np.array([hosts[i] if i >= 0 else "" for i in out["host"]], dtype=object)
        out["status"] = np.array([STATUS_NAMES[s] for s in out["status"]], dtype=object)
        for name in ("error", "log"):
            out[name] = np.array([e.decode() if isinstance(e, bytes) else e for e in out[name]], dtype=object)
        if "value_json" in f:
            out["value"] = np.array([json.loads(v) if v else None for v in f["value_json"].asstr()[()]],
                                    dtype=object)
    return out
