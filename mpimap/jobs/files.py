"""The job directory: where each file of a job lives, and how versioned JSON files are written and read.

Every JSON file of a job carries ``format`` (what it is) and ``version``; a
reader accepts every version up to its own (older ones are upgraded on read)
and refuses a newer one with one line asking to upgrade mpimap.  Writers
replace a file atomically (write beside it, then rename), so a reader on any
machine sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass

from ..errors import MpimapError


class DamagedFile(MpimapError):
    """A job file that is not what it should be (not JSON, or untagged): a caller may say how to recover."""


def write_json(path: str, kind: str, version: int, body: dict) -> None:
    """Replace ``path`` atomically with ``body`` tagged as ``kind`` at ``version`` (owner-only)."""
    data = json.dumps({"format": kind, "version": version, **body}, indent=1, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: str, kind: str, version: int, upgrades: dict | None = None) -> dict:
    """Read a file written by :func:`write_json`; one-line MpimapError if it is missing, damaged or too new.

    ``upgrades`` maps an older version to a function turning its body into the
    next version's, applied in turn up to ``version``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place must not block the reader
        with open(fd, "rb") as f:  # bytes: json.loads says "damaged" for bad UTF-8 too
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MpimapError(f"{path} is not a regular file (a pipe or device?); restore the job's file")
            text = f.read()
    except FileNotFoundError:
        raise MpimapError(f"{path} does not exist") from None
    except OSError as exc:
        raise MpimapError(f"cannot read {path}: {exc.strerror}") from None
    try:
        body = json.loads(text)
        found, have = body.pop("format"), body.pop("version")
        if not isinstance(have, int):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedFile(f"{path} is damaged (not a {kind} file); restore it from a copy, "
                          f"or remove it if the job does not matter") from None
    if found != kind:
        raise MpimapError(f"{path} is a {found!r} file, not {kind!r}")
    if have > version:
        raise MpimapError(f"{path} was written by a newer mpimap ({kind} format {have}; this one reads up to "
                          f"{version}): upgrade mpimap (pip install -U mpimap-hpc)")
    while have < version:
        step = (upgrades or {}).get(have)
        if step is None:
            raise MpimapError(f"{path}: {kind} format {have} is not readable by this mpimap")
        body, have = step(body), have + 1
    return body


@dataclass(frozen=True)
class JobDir:
    """The files of one job, by role (``mpimap submit`` creates the directory, owner-only)."""

    path: str

    @property
    def spec(self) -> str:
        """What to run and how: :class:`~mpimap.jobs.records.JobSpec` (JSON)."""
        return os.path.join(self.path, "job.json")

    @property
    def script(self) -> str:
        """The rendered batch script."""
        return os.path.join(self.path, "job.sh")

    @property
    def points(self) -> str:
        """The points, copied at submit time (``.npy``), so later edits of the source do not change the job."""
        return os.path.join(self.path, "points.npy")

    @property
    def results(self) -> str:
        return os.path.join(self.path, "results.h5")

    @property
    def control(self) -> str:
        """Commands to the running master, one JSON line each (pause, resume, cancel, loglevel)."""
        return os.path.join(self.path, "control")

    @property
    def status(self) -> str:
        """What the running master last reported: :class:`~mpimap.jobs.records.JobStatus` (JSON, every ~2 s)."""
        return os.path.join(self.path, "status.json")

    @property
    def batch(self) -> str:
        """Every submission of the job to its batch system: :class:`~mpimap.jobs.records.Submission` list."""
        return os.path.join(self.path, "batch.json")

    @property
    def log(self) -> str:
        """The job's stdout and stderr."""
        return os.path.join(self.path, "job.log")

    @property
    def thumbnail(self) -> str:
        return os.path.join(self.path, "progress.png")
