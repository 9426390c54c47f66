"""A job's results as a user wants them: :func:`load` in Python, and the CSV, ``.npy`` and ``.h5`` copies.

Everything reads the results file with the store's reader, so it works while
the job runs (rows not evaluated yet are ``pending``) and after it ended.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

import numpy as np

from .errors import MpimapError

FAILED = ("failed", "timeout", "crashed")
"""Statuses of a point that failed for good (its error column says why)."""


def results_path(source: str) -> str:
    """The results file of a job (its name or directory), or ``source`` itself if it is a results file."""
    if os.path.isfile(source) or (source.endswith(".h5") and not os.path.isdir(source)):
        return source
    from .jobs.job import Job

    job = Job.open(source)
    if not os.path.exists(job.dir.results):
        raise MpimapError(f"job {source} has no results yet: it has not started "
                          f"(mpimap status {source} tells why)")
    return job.dir.results


def columns(store: dict) -> dict:
    """What :func:`load` returns, from the store's :func:`~mpimap.store.read_results`: one array per column.

    ``index``, ``status`` (pending, done, failed, timeout, crashed), ``points``,
    ``values`` (NaN, or None for JSON values, where a point is not done),
    ``seconds``, ``rank``, ``host``, ``error``; and ``attrs`` (the file's).
    """
    status = store["status"]
    n = len(status)
    values = store.get("value")
    if values is None:  # no point is done yet: the file has no value column
        values = np.full(n, np.nan)
    elif values.dtype == object:
        values = one_per_row(values)
    else:
        values = values.astype(np.result_type(values.dtype, np.float64))  # room for NaN (old int/bool files)
        values[status != "done"] = np.nan
    return {"index": np.arange(n), "status": status, "points": store["points"], "values": values,
            "seconds": store["seconds"], "rank": store["rank"], "host": store["host"], "error": store["error"],
            "attrs": store["attrs"]}


def one_per_row(values: np.ndarray) -> np.ndarray:
    """JSON values as a 1-D array holding each point's value as decoded (a list stays a list).

    numpy turns lists of one length into the rows of a matrix, which it does
    only once no row is ``None``: so only when every point is done.
    """
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def read(source: str) -> dict:
    """:func:`columns` of a job's (or a results file's) results, read now."""
    from .store import read_results

    return columns(read_results(results_path(source)))


def load(source: str, as_frame: bool | None = None):
    """The results of a job, by name or directory, or of a results file; also while the job runs.

    Returns a pandas DataFrame (one row per point, in point order, columns as
    ``mpimap results -o FILE.csv`` writes them) when pandas is installed, else
    a dict of numpy arrays (see :func:`columns`).  ``as_frame=True`` insists on
    pandas, ``False`` always gives the dict.
    """
    data = read(source)
    if as_frame is False:
        return data
    try:
        import pandas
    except ImportError:
        if as_frame:
            raise MpimapError("as_frame=True needs pandas: pip install mpimap-hpc[pandas]") from None
        return data
    table = flat(data)
    frame = pandas.DataFrame({name: column for name, column in table.items() if name != "index"},
                             index=pandas.Index(table["index"], name="index"))
    frame.attrs.update({k: v.item() if isinstance(v, np.generic) else v for k, v in data["attrs"].items()})
    return frame


def flat(data: dict) -> dict:
    """The columns of :func:`columns` one value per row, named as in the CSV: index, status, x0.., value or y0.., ..."""
    points = data["points"].reshape(len(data["points"]), -1)
    values = data["values"]
    out = {"index": data["index"], "status": data["status"]}
    out.update({f"x{j}": points[:, j] for j in range(points.shape[1])})
    if values.dtype == object:
        out["value"] = values
    else:
        out.update({f"y{j}": column for j, column in enumerate(values.reshape(len(values), -1).T)})
    out.update(seconds=data["seconds"], rank=data["rank"], host=data["host"], error=data["error"])
    return out


def write_csv(data: dict, path: str) -> int:
    """Write :func:`columns` as CSV, one row per point (a value only where the point is done); the row count."""
    table = flat(data)
    try:
        f = open(path, "w", newline="")
    except OSError as exc:
        raise MpimapError(f"cannot write {path}: {exc.strerror}; choose another file") from None
    value_names = [name for name in table if name == "value" or name.startswith("y")]
    with f:
        writer = csv.writer(f)
        writer.writerow(list(table))
        for i, status in enumerate(table["status"]):
            row = [table[name][i] for name in table]
            for j, name in enumerate(table):
                if name in value_names and status != "done":
                    row[j] = ""
                elif name == "value":
                    row[j] = json.dumps(row[j])
                elif name == "error":
                    row[j] = row[j].split("\n", 1)[0]
            writer.writerow(row)
    return len(table["index"])


def write_npy(data: dict, path: str) -> str:
    """Save the values array as ``.npy``; returns a line saying what rows not done hold."""
    values = numbers(data)
    write_atomically(path, lambda tmp: np.save(tmp, values))
    status = data["status"]
    pending, failed = int(np.sum(status == "pending")), int(np.isin(status, FAILED).sum())
    note = f"; {pending} pending and {failed} failed rows hold NaN" if pending or failed else ""
    return f"wrote values {values.shape} to {path} in point order{note}"


def numbers(data: dict) -> np.ndarray:
    """The values as one numeric array, NaN where a point is not done; JSON values too if they are numbers of one
    shape (lists of numbers), else a one-line error."""
    values, done = data["values"], data["status"] == "done"
    if values.dtype != object:
        return values
    try:
        stored = np.asarray(list(values[done]))
    except ValueError:  # lists of different lengths
        stored = None
    if stored is None or stored.dtype.kind not in "biufc":
        raise MpimapError("the values are not numbers of one shape (JSON data): write them with -o FILE.csv or "
                          "-o FILE.h5")
    if done.all():
        return stored  # as stored: integers too large for a float stay exact
    out = np.full((len(values), *stored.shape[1:]), np.nan, dtype=np.result_type(stored.dtype, np.float64))
    out[done] = stored
    return out


def write_h5(data: dict, path: str) -> str:
    """A plain HDF5 copy (any h5py reads it, no mpimap needed): one dataset per column of :func:`columns`."""
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            text = h5py.string_dtype()
            for name in ("index", "points", "seconds", "rank"):
                f[name] = data[name]
            for name in ("status", "host", "error"):
                f.create_dataset(name, data=data[name].astype(str).astype(object), dtype=text)
            if data["values"].dtype == object:  # JSON values: as JSON text, "" where not done
                f.create_dataset("values_json", dtype=text, data=np.array(
                    ["" if v is None else json.dumps(v) for v in data["values"]], dtype=object))
            else:
                f["values"] = data["values"]
            for key, value in data["attrs"].items():
                f.attrs[key] = value

    write_atomically(path, write)
    values = "values_json" if data["values"].dtype == object else "values"
    return f"wrote {len(data['index'])} rows to {path} (datasets: index, status, points, {values}, seconds, rank, " \
           f"host, error)"


def write_atomically(path: str, write) -> None:
    """Write a file beside ``path`` with ``write(tmp)`` and rename it over ``path``: never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    except OSError as exc:
        raise MpimapError(f"cannot write {path}: {exc.strerror}; choose another file") from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
