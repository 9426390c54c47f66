"""A job as the commands see it: found by name or directory, read from its files, steered through its control file."""

from __future__ import annotations

import os

from ..errors import MpimapError
from . import files
from .records import JobSpec, JobStatus, Submission


class Job:
    """One job directory; every read goes to the files, so it is current and works from any machine."""

    def __init__(self, path: str):
        self.dir = files.JobDir(os.path.abspath(path))

    @classmethod
    def open(cls, name_or_dir: str) -> "Job":
        """The job with this name (in the user's registry) or in this directory; one-line error if neither."""
        if os.path.isfile(os.path.join(name_or_dir, "job.json")):
            return cls(name_or_dir)
        from .registry import Registry  # the registry knows names

        return cls(Registry().find(name_or_dir))

    @property
    def name(self) -> str:
        return self.spec().name

    def spec(self) -> JobSpec:
        return JobSpec.from_json(files.read_json(self.dir.spec, JobSpec.FORMAT, JobSpec.VERSION))

    def status(self) -> JobStatus | None:
        """The master's last report, or None before it first wrote one."""
        if not os.path.exists(self.dir.status):
            return None
        return JobStatus.from_json(files.read_json(self.dir.status, JobStatus.FORMAT, JobStatus.VERSION))

    def submissions(self) -> list[Submission]:
        if not os.path.exists(self.dir.batch):
            return []
        body = files.read_json(self.dir.batch, Submission.FORMAT, Submission.VERSION)
        return [Submission.from_json(s) for s in body["submissions"]]

    def __repr__(self):
        return f"Job({self.dir.path!r})"


def check_owner(path: str) -> None:
    """Refuse a job directory of another user: its files are theirs to change."""
    if os.stat(path).st_uid != os.getuid():
        raise MpimapError(f"{path} belongs to another user; you can read jobs of your own only")
