"""A results-file writer to kill: run in a forked child process by test_store_faults.py.

:func:`main` resumes (or creates) a file and writes the pending rows in random
chunks (seeded), flushing once at the end or after every chunk.  With STEP > 0
the process SIGKILLs itself just before its STEP-th HDF5 call that changes the
file (a dataset write, a flush, a dataset created, deleted or renamed).
"""

from __future__ import annotations

import os
import signal

import h5py
import numpy as np

from mpimap.failures import Failure
from mpimap.store import ResultStore

N = 3000
FUNCTION = "store_writer:expected"


def expected(i: int):
    """The stored function: ints first, floats, then complex values, so the value column widens as rows arrive."""
    if i < 600:
        return i // 3
    if i < 2500:
        return i / 3
    return i / 3 + 1j


def fails(i: int) -> bool:
    return i % 53 == 7


def log_of(i: int) -> str:
    return f"log of point {i}" if i % 41 == 0 else ""


def error_of(i: int) -> str:
    return f"ValueError: point {i} failed"


def write_rows(store: ResultStore, rows: np.ndarray, rng: np.random.Generator, packed: bool = True) -> None:
    """Store ``rows`` in chunks of random size, as the CLI does (values packed in one array when all are good)."""
    start = 0
    while start < len(rows):
        chunk = rows[start:start + int(rng.integers(1, 120))]
        start += len(chunk)
        failures = {k: Failure("ValueError", f"point {int(i)} failed", "")
                    for k, i in enumerate(chunk) if fails(int(i))}
        values = [None if fails(int(i)) else expected(int(i)) for i in chunk]
        if packed and not failures and len({type(v) for v in values}) == 1:
            values = np.asarray(values)
        logs = {k: log_of(int(i)) for k, i in enumerate(chunk) if log_of(int(i))}
        store.write(chunk, values, failures, np.full(len(chunk), 0.5), 1, "node", None, logs)


def check_rows(r: dict) -> int:
    """Every row is pending, or complete and correct; return how many are complete."""
    complete = 0
    for i, status in enumerate(r["status"]):
        if status == "pending":
            continue
        complete += 1
        where = f"row {i} ({status})"
        if fails(i):
            assert status == "failed" and r["error"][i] == error_of(i), where
        else:
            assert status == "done" and r["value"][i] == expected(i) and r["error"][i] == "", where
        assert r["log"][i] == log_of(i) and r["rank"][i] == 1 and r["host"][i] == "node", where
        assert r["seconds"][i] == 0.5 and r["attempts"][i] == 1, where
    return complete


def _kill_at(step: int, listing) -> None:
    """SIGKILL this process just before its STEP-th HDF5 call that changes the file; or list them in ``listing``."""
    calls = [0]

    def hook(original, name):
        def hooked(*args, **kwargs):
            calls[0] += 1
            if listing is not None:
                listing.write(f"{calls[0]} {name} {getattr(args[0], 'name', '')}\n")
                listing.flush()
            elif calls[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return hooked

    for cls, name in ((h5py.Dataset, "__setitem__"), (h5py.File, "flush"), (h5py.Group, "create_dataset"),
                      (h5py.Group, "__delitem__"), (h5py.Group, "move")):
        setattr(cls, name, hook(getattr(cls, name), name))


def main(path: str, seed: int, step: int = 0, batch: bool = False, ready=None, listing: str | None = None,
         stop: int = N) -> None:
    """Write every pending row below ``stop``; ``batch``: in one flush at close, else a flush after every chunk.

    Run in a forked child: ``ready`` (an Event) is set once the file is open.
    """
    rng = np.random.default_rng(seed)
    store = ResultStore.open(path, np.arange(float(N)), FUNCTION, flush_interval=1e9 if batch else 0)
    if ready is not None:
        ready.set()
    if step or listing:
        _kill_at(step, open(listing, "w") if listing else None)
    rows = store.todo()
    rows = rows[rows < stop]
    write_rows(store, rows if batch else rng.permutation(rows), rng)
    store.close("complete")
