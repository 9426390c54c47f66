"""The running master's report, ``status.json``: written by a thread on rank 0 every ~2 s and at every change of state.

Readers (``mpimap status``, ``attach``, ``ls``, ``ps``, the thumbnail) only
read the file, from any machine that shares the file system; it is replaced
atomically, so they see one whole report or the one before.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from . import files
from .records import FINAL_STATES, JobStatus, RankRow

log = logging.getLogger("mpimap.status")
INTERVAL = 2.0  # seconds between reports while nothing changes
RATE_WINDOW = 60.0  # seconds of history the rate is measured over
HISTORY_LIMIT = 300  # samples of [time, done, failed] kept; older ones are thinned to every other one
EVALUATING_LIMIT = 1000  # point indices listed per rank (a chunk of cheap points can hold tens of thousands)
FAILURE_KINDS = {"failed": "raised", "timeout": "timeout", "crashed": "crashed"}  # store status -> kind


def batch_id() -> str:
    """The batch system's id of this job: Slurm's, or the one the local scheduler sets."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("MPIMAP_BATCH_ID", "")


@dataclass
class Tally:
    """The job's points by outcome as the results file sees them: earlier runs included."""

    total: int
    done: int = 0
    failed: int = 0
    failures: Counter = field(default_factory=Counter)  # kind (raised, timeout, crashed) -> count

    @classmethod
    def from_counts(cls, counts: dict, *, retry_failed: bool) -> "Tally":
        """From the store's rows by status (``ResultStore.counts()``); with ``retry_failed`` the failed rows are
        to be evaluated again, so they count as pending."""
        failures = Counter() if retry_failed else Counter(
            {kind: counts[status] for status, kind in FAILURE_KINDS.items() if counts.get(status)})
        return cls(sum(counts.values()), counts["done"], sum(failures.values()), failures)

    def add(self, evaluated: int, failure_statuses) -> None:
        """Count ``evaluated`` points just stored, of which the failed ones had these store statuses."""
        kinds = [FAILURE_KINDS.get(status, status) for status in failure_statuses]
        self.failures.update(kinds)
        self.failed += len(kinds)
        self.done += evaluated - len(kinds)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def rank_rows(rows: list[dict], rows_of) -> list[RankRow]:
    """``Pool.status()`` rows as :class:`RankRow` records; ``rows_of(start, stop)`` maps a chunk's map positions
    to results-file rows (a resumed job evaluates only some rows)."""
    out = []
    for row in rows:
        state = ("lost" if row["lost"] else "retired" if row["retired"] else
                 "busy" if row["in_flight"] else "idle")
        evaluating: list = []
        for chunk in row["chunks"]:
            evaluating.extend(int(i) for i in rows_of(chunk.start, chunk.stop))
        out.append(RankRow(row["rank"], row["host"] or "", row["pid"] or 0, state, row["in_flight"],
                           row["points_done"], round(row["last_heard"], 3), sorted(set(evaluating))[:EVALUATING_LIMIT],
                           round(row["frozen"], 1)))
    return out


class StatusWriter(threading.Thread):
    """Writes ``status.json`` every ``interval`` seconds and at once on :meth:`set_state` and :meth:`finish`.

    ``tally`` is read as it changes (ints, read whole); ``ranks()`` gives the
    rank rows now (it may raise once the pool is gone: the last rows are kept);
    ``control_offset()`` how far the control file has been read.
    """

    def __init__(self, path: str, tally: Tally, ranks=lambda: [], *, interval: float = INTERVAL,
                 control_offset=lambda: None):
        super().__init__(name="mpimap-status", daemon=True)
        self.path = path
        self.tally = tally
        self.ranks = ranks
        self.control_offset = control_offset  # how far the master has read the control file (the next run goes on)
        self.interval = interval
        self.state = "running"
        self.message = ""
        self.started = time.time()
        self.ended: float | None = None
        self.history: list = []
        self._recent: deque = deque()  # (time, points finished) over the last RATE_WINDOW seconds
        self._rows: list = []
        self._lock = threading.Lock()  # one writer at a time: the thread, and a change of state from another
        self._stopped = threading.Event()

    def run(self):
        while not self._stopped.wait(self.interval):
            self.write()

    def set_state(self, state: str, message: str = "") -> None:
        """A change of state (running, paused): reported at once."""
        self.state, self.message = state, message
        self.write()

    def finish(self, state: str, message: str = "") -> None:
        """The job ended (done, failed, cancelled, interrupted): stop the thread and write the final report."""
        assert state in FINAL_STATES, state
        self._stopped.set()
        if self.is_alive():
            self.join()
        self.ended = time.time()
        self.set_state(state, message)

    def write(self) -> None:
        """Write a report now; a failure is logged (the job goes on, the next report may succeed)."""
        with self._lock:
            try:
                files.write_json(self.path, JobStatus.FORMAT, JobStatus.VERSION, self.report().to_json())
            except Exception as exc:
                log.warning("cannot write %s: %s", self.path, exc)

    def keep_ranks(self) -> None:
        """Take the ranks' rows now: the final report shows the rows taken last before the pool went away."""
        try:
            self._rows = self.ranks()
        except Exception:  # the pool is shut down: keep what it last said
            pass

    def report(self) -> JobStatus:
        now = time.time()
        t = self.tally
        done, failed, failures = t.done, t.failed, dict(t.failures)
        finished = done + failed
        self._recent.append((now, finished))
        while len(self._recent) > 2 and self._recent[1][0] < now - RATE_WINDOW:
            self._recent.popleft()
        then, before = self._recent[0]
        rate = (finished - before) / (now - then) if now - then > 1e-3 else 0.0
        pending = t.total - finished
        self.history.append([round(now, 3), done, failed])
        if len(self.history) > HISTORY_LIMIT:
            self.history = self.history[:-1:2] + self.history[-1:]  # thin: every other sample, and the newest
        self.keep_ranks()
        return JobStatus(
            state=self.state, updated=now, total=t.total, done=done, failed=failed, pending=pending,
            started=self.started, ended=self.ended, host=socket.gethostname(), pid=os.getpid(), batch_id=batch_id(),
            rate=rate, eta_seconds=pending / rate if rate > 0 and self.state == "running" else None,
            ranks=[row.to_json() for row in self._rows], failures=failures, history=list(self.history),
            message=self.message, control_offset=self.control_offset())
