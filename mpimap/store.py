"""The results file: HDF5, one row per point, streamed as results arrive, resumable after any kill.

Layout and guarantees are documented in docs/results-format.rst.  In short:
the writer keeps the file in SWMR mode, so ``h5py.File(path, "r", swmr=True)``
(or :func:`read_results`) reads every flushed row while the job runs and
after it was killed; a resume clears the "open for writing" flags that a kill
leaves behind, and evaluates only the rows still pending.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass

import h5py
import numpy as np

from . import __version__
from .errors import MpimapError
from .inputs import checksum
from .seeds import DERIVATION, DERIVATION_VERSION

FORMAT = "mpimap-results"
FORMAT_VERSION = 1
FLUSH_ROWS = 1 << 18  # buffered rows that force a flush whatever the interval
STATUS = {"pending": 0, "done": 1, "failed": 2, "timeout": 3, "crashed": 4}
STATUS_NAMES = {v: k for k, v in STATUS.items()}
STATUS_DTYPE = h5py.enum_dtype(STATUS, basetype="i1")
TEXT = h5py.string_dtype()
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

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


@dataclass(frozen=True)
class Layout:
    """How values are stored: numbers of one dtype and per-point shape in ``value``, or JSON text in ``value_json``."""

    dtype: object  # np.bool_, np.int64, np.float64, np.complex128, or TEXT
    shape: tuple = ()

    @property
    def text(self) -> bool:
        return self.dtype is TEXT

    @property
    def fill(self):
        return "" if self.text else (np.nan if np.dtype(self.dtype).kind in "fc" else 0)

    def filled(self, n: int) -> np.ndarray:
        return np.full(n, "", dtype=object) if self.text else np.full((n, *self.shape), self.fill, dtype=self.dtype)


# Numeric kinds in the order values may be promoted: a later value of a higher kind promotes the column.  New
# columns are float64 or complex128 (see _layout_of); bool and int64 columns come only from files of mpimap 0.x
# format 1, which still widen as they did.
KINDS = {"b": (0, np.bool_), "i": (1, np.int64), "u": (1, np.int64), "f": (2, np.float64), "c": (3, np.complex128)}
EXACT_INT = 2 ** 53  # integers up to this size are exact in float64


class ResultStore:
    """The results file of one running job; only rank 0 writes it.

    Rows are buffered by :meth:`write` and reach the file at :meth:`flush`,
    which a background thread runs once the oldest buffered row is
    ``flush_interval`` seconds old: a kill loses at most that much.
    """

    def __init__(self, path: str, file: h5py.File, lock, run: int, flush_interval: float):
        self.path = path
        self._file = file
        self._lock = lock
        self.run = run
        self.flush_interval = min(flush_interval, threading.TIMEOUT_MAX)  # longer waits overflow (inf: never due)
        self._hosts = {name.decode(): i for i, name in enumerate(file["hosts"][()])}
        self.size = len(file["status"])
        self._pending: list = []  # buffered chunks, see write()
        self._pending_rows = 0
        self._oldest = None  # when the oldest buffered row arrived
        self._layout = _existing_layout(file)  # None until the first good value
        self._ints_exact = _ints_exact(file, self._layout)  # every stored integer is exact as a float64
        self._retried = np.zeros(0, np.int64)  # rows of earlier runs evaluated again (--retry-failed), sorted
        self._retried_attempts = np.zeros(0, np.int16)
        self._mutex = threading.RLock()  # the file and the buffer: write() and the flusher thread
        self._wake = threading.Condition(self._mutex)
        self._closing = False
        self._flusher = None
        if flush_interval > 0:
            self._flusher = threading.Thread(target=self._flush_when_due, name="mpimap-flush", daemon=True)
            self._flusher.start()

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str, points: np.ndarray, function: str, *, fresh: bool = False,
             flush_interval: float = 1.0, seed: int | None = None) -> "ResultStore":
        """Create the results file, or reopen it to resume the same job (same function, points and seed).

        ``flush_interval`` may be ``inf``: flush only when the buffer is full and at close.
        """
        if not flush_interval >= 0:
            raise MpimapError(f"flush interval {flush_interval} is not a number of seconds >= 0 (inf: only at close)")
        lock = _take_lock(path)
        try:
            digest = checksum(points)
            if os.path.exists(path) and not fresh:
                file = _reopen(path, function, digest, len(points), seed)
            else:
                file = _create(path, points, function, digest, seed)
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
        with self._mutex:
            status = self._file["status"][()]
            wanted = status == STATUS["pending"]
            if retry_failed:
                retried = status >= STATUS["failed"]
                wanted |= retried
                self._retried = np.flatnonzero(retried)
                self._retried_attempts = self._file["attempts"][()][self._retried]
            return np.flatnonzero(wanted)

    def counts(self) -> dict:
        """How many rows have each status (pending, done, failed, timeout, crashed), as stored now."""
        with self._mutex:
            found = np.bincount(self._file["status"][()].astype(np.int64), minlength=len(STATUS))
        return {name: int(found[code]) for name, code in STATUS.items()}

    # -- writing -----------------------------------------------------------------
    def write(self, indices: np.ndarray, values, failures: dict, durations, rank: int, host: str,
              attempts: dict | None = None, logs: dict | None = None) -> dict:
        """Take the results of the points ``indices`` (one chunk, in order); they reach the file at the next flush.

        Returns the points the store itself failed (offset -> error text): values that do not fit the column.

        Rows are buffered and written in large sorted runs: a write per chunk
        and column costs far more than the data.  A flush happens once the
        oldest buffered row is ``flush_interval`` seconds old, at
        ``FLUSH_ROWS`` buffered rows, and at close.
        """
        n = len(indices)
        status = np.full(n, STATUS["done"], dtype=np.int8)
        errors = {}
        for offset, failure in failures.items():
            status[offset] = STATUS[failure.status]
            errors[offset] = f"{failure.text}\n\n{failure.traceback}" if failure.traceback else failure.text
        tries = np.ones(n, np.int16)
        for offset, count in (attempts or {}).items():
            tries[offset] = count
        with self._mutex:
            column, misfits = self._value_column(values, failures, n)
            for offset, text in misfits.items():
                status[offset] = STATUS["failed"]
                errors[offset] = text
            self._pending.append((indices, status, np.asarray(durations), np.full(n, rank, np.int32),
                                  np.full(n, self._host_id(host), np.int32), tries, column,
                                  {int(indices[k]): text for k, text in errors.items()},
                                  {int(indices[k]): text for k, text in (logs or {}).items()}))
            self._pending_rows += n
            if self._oldest is None:
                self._oldest = time.monotonic()
                self._wake.notify()
            if self._pending_rows >= FLUSH_ROWS or self.flush_interval <= 0:
                self.flush()
        return misfits

    def mark_verified(self, indices, same) -> None:
        """Record the outcome of re-evaluating points on another host: 1 the results agreed, 2 they did not."""
        with self._mutex:
            self.flush()
            column = self._file["verified"]
            for index, ok in zip(indices, same):
                column[int(index)] = 1 if ok else 2
            self._file.flush()

    def _flush_when_due(self) -> None:
        """The flusher thread: flush once the oldest buffered row is ``flush_interval`` old."""
        with self._wake:
            while not self._closing:
                due = None if self._oldest is None else self._oldest + self.flush_interval - time.monotonic()
                if due is not None and due <= 0:
                    try:
                        self.flush()
                    except Exception as exc:  # close() flushes again and raises it in the caller's thread
                        logging.getLogger("mpimap.store").warning("flushing %s failed (%s); will retry",
                                                                  self.path, exc)
                        self._wake.wait(self.flush_interval)
                    continue
                self._wake.wait(due)

    def _value_column(self, values, failures, n):
        """The chunk's values as one array in the file's layout (fill where failed); misfits as ``{offset: error}``.

        The first good value chooses the layout.  A later value of a wider
        numeric kind (bool < int < float < complex) widens it when every value
        stored so far converts exactly; a value that cannot be stored exactly
        fails its point with a ``StoreError``.
        """
        good = [i for i in range(n) if i not in failures] if failures else range(n)
        if self._layout is None:
            if not good:  # every point of every chunk so far failed
                return None, {}
            self._layout = _layout_of(values[good[0]])
        layout = self._layout
        if (not layout.text and isinstance(values, np.ndarray) and values.dtype.kind in KINDS
                and values.shape[1:] == layout.shape):
            fitted = self._fit(values[good] if failures else values)
            if fitted is not None and not failures:
                return fitted, {}
            if fitted is not None:
                column = self._layout.filled(n)
                column[good] = fitted
                return column, {}
        column = layout.filled(n)
        misfits = {}
        if layout.text:
            for i in good:
                try:
                    column[i] = _to_json(values[i])
                except MpimapError as exc:
                    misfits[i] = f"StoreError: {exc}"
            return column, misfits
        for i in good:  # one by one, so that each misfit gets its own message
            value = values[i]
            array = _as_numbers(value)
            if array is None or array.shape != self._layout.shape:
                reason = ("an integer beyond int64" if _beyond_int64(value) else "not a number") if array is None \
                    else f"shape {array.shape}"
            else:
                fitted = self._fit(array[None])
                if fitted is not None:
                    column = self._widened(column)
                    column[i] = fitted[0]
                    continue
                reason = "it cannot be converted exactly"
            misfits[i] = (f"StoreError: result {_describe(value)} does not fit the stored results (of type "
                          f"{np.dtype(self._layout.dtype)}, shape {self._layout.shape}): {reason}")
        return self._widened(column), misfits

    def _fit(self, array: np.ndarray):
        """``array`` (points along axis 0) converted exactly to the layout, widened if need be; else None."""
        kind = array.dtype.kind
        if kind in "fc" and not np.can_cast(array.dtype, KINDS[kind][1], casting="safe"):
            return None  # long double: float64 would round it
        if kind == "u":
            if array.size and array.max() > np.iinfo(np.int64).max:
                return None
            array = array.astype(np.int64)
        rank, dtype = KINDS[kind]
        current = KINDS[np.dtype(self._layout.dtype).kind][0]
        if rank > current:
            if current == 1 < rank and not self._ints_exact:
                return None
            self._widen(dtype)
        target = np.dtype(self._layout.dtype)
        if kind in "iu" and target.kind in "fc" and array.size and not _exact_in_float(array):
            return None
        if kind in "iu" and target.kind == "i" and array.size and not _exact_in_float(array):
            self._ints_exact = False
        return array.astype(target, copy=False)

    def _widen(self, dtype) -> None:
        """Widen the layout to ``dtype``: buffered values now, the file's column at the next flush."""
        self._layout = Layout(dtype, self._layout.shape)
        for k, entry in enumerate(self._pending):
            if entry[6] is not None:
                self._pending[k] = entry[:6] + (self._widened(entry[6]),) + entry[7:]

    def _widened(self, column: np.ndarray) -> np.ndarray:
        """A buffered column in the current layout (failed rows keep the fill value)."""
        if column.dtype == np.dtype(self._layout.dtype):
            return column
        return column.astype(self._layout.dtype)

    def flush(self) -> None:
        """Write the buffered rows, in sorted contiguous runs, and make them visible to readers.

        Order matters for a kill at any instant: every column but ``status``
        (values, error and log texts included) is written and flushed first;
        only then the status, so a row never says done before its data is in
        the file.  Rows of earlier runs written again (``--retry-failed``) go
        back to ``pending`` in that first step.
        """
        with self._mutex:
            if self._pending:
                self._prepare_value_dataset()
                f = self._file
                parts = list(zip(*self._pending))
                indices = np.concatenate(parts[0])
                order = np.argsort(indices, kind="stable")
                indices = indices[order]
                status = np.concatenate(parts[1])[order]
                columns = {name: np.concatenate(part)[order] for name, part in
                           zip(("seconds", "rank", "host", "attempts"), parts[2:6])}
                if self._layout is not None:
                    values = np.concatenate(
                        [c if c is not None else self._layout.filled(len(i)) for i, c in zip(parts[0], parts[6])]
                    )[order]
                    values[status != STATUS["done"]] = self._layout.fill
                    columns["value_json" if self._layout.text else "value"] = values
                columns["run"] = np.full(len(indices), self.run, np.int16)
                texts = {"error": {k: t for chunk in parts[7] for k, t in chunk.items()},
                         "log": {k: t for chunk in parts[8] for k, t in chunk.items()}}
                again = np.isin(indices, self._retried, assume_unique=True) if len(self._retried) else None
                if again is not None and again.any():
                    rows = indices[again]
                    columns["attempts"][again] += self._retried_attempts[np.searchsorted(self._retried, rows)]
                    f["status"][rows] = np.zeros(len(rows), np.int8)  # pending until the new result is complete
                    for name in texts:
                        for row in rows.tolist():
                            texts[name].setdefault(row, "")  # the old error and log go with the old result
                for sel, part in _runs(indices):
                    for name, column in columns.items():
                        f[name][sel] = column[part]
                for name, by_row in texts.items():
                    if by_row:  # one selection of every row: a write per row costs ~0.3 ms, this ~4 µs a row
                        rows = sorted(by_row)
                        f[name][np.array(rows)] = np.array([by_row[row] for row in rows], dtype=object)
                f.flush()
                for sel, part in _runs(indices):
                    f["status"][sel] = status[part]
                if again is not None and again.any():
                    keep = ~np.isin(self._retried, indices[again], assume_unique=True)
                    self._retried, self._retried_attempts = self._retried[keep], self._retried_attempts[keep]
                self._pending.clear()
                self._pending_rows = 0
                self._oldest = None
            self._file.flush()

    def _prepare_value_dataset(self) -> None:
        """Make the file's value column match the layout: create it, or widen its dtype."""
        if self._layout is None:
            return
        f = self._file
        if self._layout.text:
            if "value_json" not in f:
                with self._restructuring() as f:
                    f.create_dataset("value_json", shape=(self.size,), maxshape=(None,),
                                     chunks=(min(self.size, 4096),), dtype=TEXT, fillvalue="")
        elif "value" not in f:
            with self._restructuring() as f:
                _new_value_dataset(f, "value", self.size, self._layout)
        elif f["value"].dtype != np.dtype(self._layout.dtype):
            with self._restructuring() as f:
                _widen_value_dataset(f, self._layout)

    @contextlib.contextmanager
    def _restructuring(self):
        """Reopen the file without SWMR for a change of structure (new datasets), then return to SWMR."""
        self._file.close()
        self._file = h5py.File(self.path, "r+", libver="latest", locking=False)
        yield self._file
        self._file.flush()
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
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._flusher is not None:
            self._flusher.join()
        try:
            with self._mutex:
                if not self._file.id.valid or not self._file.swmr_mode:
                    self._recover_after_interrupt()
                self.flush()
        finally:
            self._file.close()
        with h5py.File(self.path, "r+", libver="latest", locking=False) as f:
            f.attrs["state"] = state
            f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._file = None
        _release_lock(self._lock, self.path)

    def _recover_after_interrupt(self) -> None:
        """An exception (SIGTERM) left a change of structure half done: finish it as a resume would."""
        if self._file.id.valid:
            self._file.close()
        self._file = h5py.File(self.path, "r+", libver="latest", locking=False)
        _finish_replacements(self._file)
        self._file.swmr_mode = True


def _new_value_dataset(f: h5py.File, name: str, n: int, layout: Layout) -> h5py.Dataset:
    return f.create_dataset(name, shape=(n, *layout.shape), maxshape=(None, *layout.shape), chunks=True,
                            dtype=layout.dtype, fillvalue=np.dtype(layout.dtype).type(layout.fill))


def _widen_value_dataset(f: h5py.File, layout: Layout) -> None:
    """Give ``value`` a wider dtype (a copy that replaces it)."""
    done = f["status"][()] == STATUS["done"]

    def copy(name):
        old, new = f["value"], _new_value_dataset(f, name, len(f["value"]), layout)
        step = 1 << 16
        for a in range(0, len(old), step):
            block = old[a:a + step].astype(layout.dtype)
            block[~done[a:a + step]] = layout.fill
            new[a:a + step] = block

    _replace_dataset(f, "value", copy)


def _replace_dataset(f: h5py.File, name: str, build) -> None:
    """Replace dataset ``name`` by what ``build(NAME.new)`` creates; a kill at any step leaves one of the two whole.

    The copy is complete on disk before the old dataset goes; after a kill
    :func:`_finish_replacements` drops an incomplete copy or renames a complete one.
    """
    if f"{name}.new" in f:
        del f[f"{name}.new"]
    build(f"{name}.new")
    f.flush()
    del f[name]
    f.move(f"{name}.new", name)


def _finish_replacements(f: h5py.File) -> None:
    """Complete or drop what a kill interrupted in :func:`_replace_dataset` (the file open without SWMR)."""
    for key in [k for k in f if k.endswith(".new")]:
        if key[:-4] in f:
            del f[key]
        else:
            f.move(key, key[:-4])


def _repair_texts(f: h5py.File) -> None:
    """Rebuild a text column some of whose rows a kill left unreadable (they are pending; see _read_texts).

    HDF5 cannot overwrite such a row (it would free the old text first), so
    the column is replaced by a readable copy.
    """
    pending = f["status"][()] == STATUS["pending"]
    for name in ("error", "log", "value_json"):
        if name in f:
            texts, lost = _read_texts(f[name], pending)
            if lost:
                _replace_dataset(f, name, lambda new: f.create_dataset(
                    new, data=texts.astype(object), maxshape=(None,), chunks=f[name].chunks, dtype=TEXT, fillvalue=""))


def _exact_in_float(array: np.ndarray) -> bool:
    return bool(((array >= -EXACT_INT) & (array <= EXACT_INT)).all())


def _ints_exact(file, layout) -> bool:
    """Whether every integer already stored converts exactly to float64 (only an int64 column can hold others)."""
    if layout is None or layout.text or np.dtype(layout.dtype).kind != "i":
        return True
    done = file["status"][()] == STATUS["done"]
    return _exact_in_float(file["value"][()][done])


def _layout_of(value) -> Layout:
    """How values like this one are stored: float64 or complex128 of its shape, or JSON text.

    Every real number is stored as float64 from the first value on, so that
    the column never widens from int to float under a reader's feet; a first
    value with integers that float64 cannot hold exactly (beyond 2**53) makes
    the column JSON, which keeps them exact.
    """
    array = _as_numbers(value) if _is_numeric(value) else None
    if array is not None and not (array.dtype.kind in "biu" and array.size and not _exact_in_float(array)):
        return Layout(np.complex128 if array.dtype.kind == "c" else np.float64, array.shape)
    _to_json(value)  # fails with a clear message if it cannot be stored at all
    return Layout(TEXT)


def _existing_layout(file):
    if "value" in file:
        return Layout(file["value"].dtype.type, file["value"].shape[1:])
    if "value_json" in file:
        return Layout(TEXT)
    return None


def _beyond_int64(value) -> bool:
    return isinstance(value, int) and not -2 ** 63 <= value < 2 ** 64


def _as_numbers(value):
    """``value`` as a numeric array (numbers, numeric arrays, lists of numbers), or None (also for a Python int
    beyond 64 bits, which numpy holds only as an object)."""
    if _is_numeric(value):
        return None if _beyond_int64(value) else np.asarray(value)
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:
            return None
        return array if array.dtype.kind in KINDS else None
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


def _create(path: str, points: np.ndarray, function: str, digest: str, seed: int | None) -> h5py.File:
    tmp = f"{path}.new"
    try:
        file = h5py.File(tmp, "w", libver="latest", locking=False)
    except OSError as exc:
        raise MpimapError(f"cannot create results file {path}: {exc}") from None
    n = len(points)
    file.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, mpimap_version=__version__,
                      function=function, points_checksum=digest, runs=0, state="created",
                      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), created_on=socket.gethostname())
    if seed is not None:  # as decimal text: a seed may have more bits than any HDF5 integer (numpy's own have 128)
        file.attrs.update(seed=str(seed), rng_derivation=DERIVATION, rng_derivation_version=DERIVATION_VERSION)
    file.create_dataset("points", data=points)
    for name, (dtype, fill) in COLUMNS.items():
        file.create_dataset(name, shape=(n,), maxshape=(None,), chunks=(min(n, 16384),), dtype=dtype,
                            fillvalue=fill)
    file.create_dataset("hosts", shape=(0,), maxshape=(None,), chunks=(64,), dtype="S255")
    file.close()
    os.replace(tmp, path)  # an existing file is replaced only once the new one is complete
    return h5py.File(path, "r+", libver="latest", locking=False)


def _reopen(path: str, function: str, digest: str, n: int, seed: int | None) -> h5py.File:
    _check_header(path, RESUME_FIX)
    if not os.access(path, os.W_OK):  # (root may write anyway: HDF5's own error below says so then)
        raise _unwritable(path)
    try:
        file = h5py.File(path, "r+", libver="latest", locking=False)
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise _cannot_reopen(path, exc) from None
        try:
            clear_write_flags(path)  # left behind by a killed writer; our lock proves none is alive
            file = h5py.File(path, "r+", libver="latest", locking=False)
        except OSError as exc2:
            raise _cannot_reopen(path, exc2) from None
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
        _check_datasets(file, path, RESUME_FIX)
        if attrs["points_checksum"] != digest or len(file["status"]) != n:
            raise MpimapError(f"{path} was computed for different points; use another --out, or --fresh to start over")
        _check_seed(path, attrs, seed)
        _finish_replacements(file)
        _repair_texts(file)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        file.close()
        raise _damaged(path, exc, RESUME_FIX) from None
    except BaseException:
        file.close()
        raise
    return file


def _check_seed(path: str, attrs, seed: int | None) -> None:
    """A resume draws the same random streams as the runs before it, or is refused (one line)."""
    stored = attrs.get("seed")
    if stored != (None if seed is None else str(seed)):
        was = f"with --seed {stored}" if stored is not None else "without --seed"
        raise MpimapError(f"{path} was computed {was}: resume it {was}, or use another --out, or --fresh to start over")
    if stored is not None and int(attrs.get("rng_derivation_version", 0)) != DERIVATION_VERSION:
        raise MpimapError(f"{path} was computed with random streams derived by version "
                          f"{attrs.get('rng_derivation_version')} ({attrs.get('rng_derivation')}), this mpimap derives "
                          f"version {DERIVATION_VERSION}: resume it with the mpimap that started it, or --fresh")


def _unwritable(path: str) -> MpimapError:
    return MpimapError(f"cannot resume {path}: no permission to write it; fix its permissions "
                       f"(chmod u+w {path}) or choose another --out (its results are kept)")


def _cannot_reopen(path: str, exc: OSError) -> MpimapError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in str(exc) \
            or "Read-only file system" in str(exc):
        return _unwritable(path)
    return MpimapError(f"cannot reopen {path} to resume: {exc}; use another --out, or --fresh to start over")


# flock errors that mean "this file system does not do flock" (Lustre without -o flock, some NFS setups)
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def _take_lock(path: str):
    """Hold ``PATH.lock`` while writing, so two jobs never write one file (released by the kernel on any kill).

    The lock file is removed at release, so a lock taken on a file that was
    removed (or replaced) meanwhile is not the lock: check and take it again.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise MpimapError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise MpimapError(f"cannot write {path}: it is a directory; give a file name such as results.h5")
    while True:
        try:
            lock = open(f"{path}.lock", "a+")
        except OSError as exc:
            raise MpimapError(f"cannot write {path}: {exc.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in NO_FLOCK:
                logging.getLogger("mpimap.store").warning(
                    "the file system of %s does not support flock (%s): nothing stops a second job from writing "
                    "it at the same time; run one job at a time on it", path, exc.strerror)
                break
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MpimapError(f"{path} is being written by another running job ({owner}); "
                                  "wait for it or use another --out") from None
            raise MpimapError(f"cannot lock {path}.lock: {exc.strerror}") from None
        try:
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(f"{path}.lock")):
                break
        except FileNotFoundError:
            pass
        lock.close()  # the previous holder removed this file after we opened it
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def _release_lock(lock, path: str) -> None:
    """Remove ``PATH.lock`` while still holding it (a job that opened it meanwhile sees it is gone), then unlock."""
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
        if block[:8] != HDF5_SIGNATURE or block[8] not in (2, 3) or block[9] != 8:
            raise MpimapError(f"{path}: unexpected HDF5 superblock; cannot clear its write flags")
        eoa = struct.unpack_from("<Q", block, 28)[0]
        block[11] = 0
        struct.pack_into("<Q", block, 28, max(eoa, os.path.getsize(path)))
        struct.pack_into("<I", block, 44, _lookup3(bytes(block[:44])))
        f.seek(0)
        f.write(block)


# A SWMR reader retries a metadata block whose checksum fails, sleeping 2**k ns before attempt k: HDF5's default
# of 100 attempts makes a damaged file hang for ever.  26 attempts wait 67 ms in all, ample for a writer mid-flush.
READ_ATTEMPTS = 26


@functools.lru_cache(maxsize=1)
def _hdf5_library():
    """The HDF5 library h5py is using (for the one call h5py does not wrap), or None if it cannot be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libhdf5" in line and "libhdf5_hl" not in line}
        library = ctypes.CDLL(paths.pop())
        library.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
        return library
    except (OSError, KeyError, AttributeError, IndexError):
        return None


def _bounded_read_access():
    """File access properties for a SWMR reader whose reads of a damaged file fail at once instead of hanging."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, True)
    library = _hdf5_library()
    if library is not None:  # else (no /proc) HDF5's default: the header checks still catch a truncated file
        library.H5Pset_metadata_read_attempts(fapl.id, READ_ATTEMPTS)
    return fapl


READ_FIX = "if it was copied or truncated, use the original"
RESUME_FIX = "use another --out, or --fresh to start over"


def _damaged(path: str, why, fix: str = READ_FIX) -> MpimapError:
    return MpimapError(f"{path} is damaged or not an mpimap results file ({why}); {fix}")


def _check_header(path: str, fix: str = READ_FIX) -> None:
    """Refuse at once what is not a whole HDF5 file: HDF5 itself can take for ever to find out (see READ_ATTEMPTS)."""
    if os.path.isdir(path):
        raise MpimapError(f"{path} is a directory, not a results file")
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block for ever
        raise MpimapError(f"{path} is not a regular file (a pipe or device?), not a results file; "
                          "give the results file's path")
    try:
        with open(path, "rb") as f:
            block = f.read(48)
    except OSError as exc:
        raise MpimapError(f"cannot read results file {path}: {exc.strerror}") from None
    if len(block) < 48 or block[:8] != HDF5_SIGNATURE:
        raise _damaged(path, "no HDF5 signature" if block else "the file is empty", fix)
    allocated = struct.unpack_from("<Q", block, 28)[0] if block[8] in (2, 3) else 0  # end of the file's data
    if os.path.getsize(path) < allocated:  # (a SWMR writer never lets the file lag behind it: checked)
        raise _damaged(path, f"truncated: {os.path.getsize(path)} bytes of {allocated}", fix)


def _check_datasets(f: h5py.File, path: str, fix: str = READ_FIX) -> None:
    missing = [name for name in ("points", "hosts", *COLUMNS) if name not in f]
    if missing:
        raise _damaged(path, f"datasets missing: {', '.join(missing)}", fix)


def open_for_reading(path: str) -> h5py.File:
    """Open a results file for reading, whether its job is running, finished or was killed.

    Every read of a damaged file (truncated, overwritten, not HDF5) fails
    quickly with an OSError or RuntimeError: catch them with :func:`_damaged`.
    """
    if not os.path.exists(path):
        raise MpimapError(f"results file {path} does not exist")
    _check_header(path)
    try:
        file_id = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                                fapl=_bounded_read_access())
        return h5py.File(file_id)
    except (OSError, RuntimeError) as exc:
        if "not already open for SWMR writing" in str(exc):
            raise MpimapError(f"{path} is being changed by its job, or was left so by a killed job: try again in a "
                              "moment; if its job was killed, running it again repairs the file "
                              "(or h5clear -s --increment FILE)") from None
        raise _damaged(path, exc) from None


REREAD_ATTEMPTS = 20  # reads of a file its running job is changing, 0.25 s apart


def read_results(path: str) -> dict:
    """Every column of a results file as numpy arrays, plus its attributes under ``"attrs"``.

    ``status`` comes back as strings (pending, done, failed), ``host`` as host
    names, and JSON-encoded values decoded.  While the running job changes the
    file's structure (the value column appears or widens) a read fails or
    sees the old column: read again, then say so if it still does.
    """
    for attempt in range(REREAD_ATTEMPTS):
        try:
            with open_for_reading(path) as f:
                try:
                    out, layout = _read_columns(f, path), _value_layout(f)
                except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
                    raise _damaged(path, exc) from None
            if layout == _layout_now(path):  # else the value column changed while we read it
                return out
        except MpimapError:
            if not _being_written(path):
                raise
        time.sleep(0.25)
    raise MpimapError(f"{path} is being rewritten by the running job; try again in a moment")


def _value_layout(f: h5py.File):
    """What identifies the value column of an open file: its name and dtype."""
    return ("value", f["value"].dtype) if "value" in f else ("value_json" in f,)


def _layout_now(path: str):
    """The value column as a reader opening the file now sees it (None if it cannot be opened now)."""
    try:
        with open_for_reading(path) as f:
            return _value_layout(f)
    except (MpimapError, OSError, RuntimeError):
        return None


def _being_written(path: str) -> bool:
    """Whether a live job holds the ``flock`` of ``PATH.lock`` (read from /proc/locks: taking it would race)."""
    try:
        st = os.stat(f"{path}.lock")
        with open("/proc/locks") as locks:
            entries = [line.split() for line in locks]
    except OSError:
        return False
    me = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(len(e) > 5 and e[1] == "FLOCK" and e[5] == me for e in entries)


def _read_columns(f: h5py.File, path: str) -> dict:
    """Every column of an open results file, checked to be of our format."""
    if f.attrs.get("format") != FORMAT:
        raise MpimapError(f"{path} is not an mpimap results file")
    _check_datasets(f, path)
    numeric = [name for name, (dtype, _) in COLUMNS.items() if dtype is not TEXT] + ["points", "value"]
    out = {name: f[name][()] for name in numeric if name in f}
    out["attrs"] = dict(f.attrs)
    hosts = [h.decode() for h in f["hosts"][()]]
    out["host"] = np.array([hosts[i] if i >= 0 else "" for i in out["host"]], dtype=object)
    pending = out["status"] == STATUS["pending"]
    out["status"] = np.array([STATUS_NAMES[s] for s in out["status"]], dtype=object)
    for name in ("error", "log"):
        out[name] = _read_texts(f[name], pending)[0]
    if "value_json" in f:
        out["value"] = np.array([json.loads(v) if v else None for v in _read_texts(f["value_json"], pending)[0]],
                                dtype=object)
    return out


def _read_texts(dataset: h5py.Dataset, pending: np.ndarray):
    """A text column as str objects, and how many of its rows were unreadable.

    HDF5 keeps texts in a heap that reaches the disk later than the rows
    pointing at it, so a kill can leave a row's text unreadable; the flush
    order makes such rows pending, and they read as "".  Anywhere else it
    means the file is damaged.
    """
    out = np.empty(len(dataset), dtype=object)
    lost = 0
    step = 1 << 14
    for a in range(0, len(out), step):
        try:
            out[a:a + step] = dataset.asstr()[a:a + step]
            continue
        except (OSError, RuntimeError):
            pass
        for i in range(a, min(a + step, len(out))):
            try:
                out[i] = dataset.asstr()[i]
            except (OSError, RuntimeError):
                if not pending[i]:
                    raise
                out[i] = ""
                lost += 1
    return out, lost
