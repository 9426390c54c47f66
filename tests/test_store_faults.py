"""Fault injection: the writer of a results file is killed with a real SIGKILL at many points of a flush.

After every kill the file must read, every row must be pending or complete and
correct, and a resume must finish it into a file equal to an uninterrupted run.
The writer is a forked child process (tests/store_writer.py), so a kill costs milliseconds.
"""

import multiprocessing
import random
import shutil
import signal
import time

import numpy as np
import pytest

import store_writer as w
from mpimap.errors import MpimapError
from mpimap.store import ResultStore, read_results

FORK = multiprocessing.get_context("fork")


def _writer(*args, **kwargs):
    child = FORK.Process(target=w.main, args=args, kwargs=kwargs)
    child.start()
    return child


def _read_after_kill(path):
    """The rows as a reader sees them after the kill; a kill while the writer changed the file's structure (not in
    SWMR mode) leaves it unreadable until a resume opens it, as the error says."""
    try:
        return read_results(str(path))
    except MpimapError as exc:
        assert "running it again repairs the file" in str(exc)
    ResultStore.open(str(path), np.arange(float(w.N)), w.FUNCTION).close("interrupted")
    return read_results(str(path))


def _finish(path, seed, stop=w.N):
    """Resume and write every row below ``stop``: those rows must then equal an uninterrupted run."""
    store = ResultStore.open(str(path), np.arange(float(w.N)), w.FUNCTION)
    todo = store.todo()
    w.write_rows(store, todo[todo < stop], np.random.default_rng(seed))
    store.close("complete")
    r = read_results(str(path))
    assert w.check_rows(r) == stop and set(r["status"][stop:]) <= {"pending"}
    assert r["value"].dtype == (np.complex128 if stop > 2500 else np.float64)


# (rows stored first, rows the killed flush writes): floats only, or integers first so that the flush widens the
# value column to float, then to complex
SCENARIOS = {"floats": ((600, 1600), (1600, 2500)), "widening": ((0, 600), (600, w.N))}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_kill_at_any_step_of_a_flush_leaves_every_row_pending_or_complete(tmp_path, scenario):
    (first, stored), (_, stop) = SCENARIOS[scenario]
    base = tmp_path / "base.h5"
    store = ResultStore.open(str(base), np.arange(float(w.N)), w.FUNCTION)
    w.write_rows(store, np.arange(first, stored), np.random.default_rng(0))
    store.close("interrupted")
    shutil.copy(base, tmp_path / "list.h5")
    listing = tmp_path / "calls.txt"
    child = _writer(str(tmp_path / "list.h5"), 1, 0, True, listing=str(listing), stop=stop)
    child.join(60)
    calls = [line.split() for line in listing.read_text().splitlines()]
    # every call but the error/log texts, and a sample of those
    texts = [int(c[0]) for c in calls if c[2:] in (["/error"], ["/log"])]
    steps = sorted({int(c[0]) for c in calls if c[2:] not in (["/error"], ["/log"])}
                   | set(random.Random(10).sample(texts, min(4, len(texts)))) | {texts[0], texts[-1]})
    assert len(steps) >= 15
    for step in steps:
        path = tmp_path / f"k{step}.h5"
        shutil.copy(base, path)
        child = _writer(str(path), 1, step, True, stop=stop)
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, step
        kept = w.check_rows(_read_after_kill(path))  # nothing half-written
        assert kept >= stored - first, step  # nothing stored before was lost
        _finish(path, 2, stop)


def test_random_kill_9_of_a_writer_then_resume_gives_the_serial_result(tmp_path):
    path = tmp_path / "r.h5"
    rng = random.Random(2026)
    kills = 0
    while kills < 40:
        ready = FORK.Event()
        child = _writer(str(path), kills, 0, False, ready)
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.2))
        child.kill()  # SIGKILL, wherever the writer is (often inside a flush: it flushes after every chunk)
        child.join(60)
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL
        kills += 1
        w.check_rows(_read_after_kill(path))
    assert kills >= 20
    _finish(path, 99)
