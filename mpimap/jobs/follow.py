"""Following a job from its files (``mpimap attach``): progress, and each point that fails, as it happens.

Only reads: the status file for progress and state, the results file (with
the store's reader) for the points that failed since the last look.  So it
works from any machine that sees the job directory, and leaving it changes
nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MpimapError
from ..results import FAILED
from .job import Job
from .records import FINAL_STATES, JobStatus
from .views import reported

UNREADABLE_LOOKS = 10  # consecutive failed reads of the results file before following gives up
BATCH_EVERY = 10.0  # seconds between questions to the batch system (squeue): the status file is read every look


@dataclass
class FailedPoint:
    index: int
    status: str         # failed, timeout or crashed
    error: str          # the first line of the error
    rank: int
    host: str

    def line(self) -> str:
        where = f" on {self.host} rank {self.rank}" if self.host else ""
        return f"point {self.index} {self.status}{where}: {self.error}"


@dataclass
class Look:
    """What one look at the job's files found."""

    state: str
    status: JobStatus | None
    new_failures: list = field(default_factory=list)   # FailedPoint, in point order

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class Follower:
    """Looks at a job again and again; each look reports the failures not reported before.

    Failures present at the first look are counted (``earlier_failures``), not listed.
    """

    def __init__(self, job: Job):
        self.job = job
        self.earlier_failures: int | None = None
        self._reported: set = set()
        self._signature = None       # (mtime, size) of the results file at the last read
        self._unreadable = 0
        self._view = None
        self._asked = 0.0

    def look(self) -> Look:
        status = reported(self.job)
        if self._view is None or time.monotonic() - self._asked > BATCH_EVERY:
            self._view, self._asked = self.job.batch_view(), time.monotonic()
        return Look(self.job.state(self._view), status, self._new_failures())

    def _new_failures(self) -> list:
        from ..store import read_results

        path = self.job.dir.results
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self.earlier_failures is None:
                self.earlier_failures = 0
            return []
        signature = (st.st_mtime_ns, st.st_size)
        if signature == self._signature:
            return []
        try:
            data = read_results(path)
        except MpimapError:
            # read from another machine while the job restructures the file: look again next time
            self._unreadable += 1
            if self._unreadable >= UNREADABLE_LOOKS:
                raise
            return []
        self._unreadable = 0
        self._signature = signature
        failed = np.flatnonzero(np.isin(data["status"], FAILED))
        new = [int(i) for i in failed if int(i) not in self._reported]
        self._reported.update(new)
        if self.earlier_failures is None:
            self.earlier_failures = len(new)
            return []
        return [FailedPoint(i, data["status"][i], data["error"][i].split("\n", 1)[0], int(data["rank"][i]),
                            data["host"][i]) for i in new]
