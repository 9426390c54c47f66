"""The user's registry of jobs: name -> job directory, so a job is found by its name from anywhere.

It lives in ``$MPIMAP_HOME/registry.json`` (default ``~/.mpimap``, owner-only)
and is only an index: every job directory describes itself (``job.json``), so a
lost registry is rebuilt by scanning the directories jobs live in.  Changes are
made under an exclusive ``flock`` and written atomically, so two submits at once
never lose an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from ..errors import MpimapError
from . import files
from .records import JobSpec

DEFAULT_SCAN = "mpimap-jobs"  # where submit puts jobs by default, relative to the submit directory


def home() -> str:
    """``$MPIMAP_HOME``, or ``~/.mpimap``: the user's mpimap files (registry, config)."""
    return os.environ.get("MPIMAP_HOME") or os.path.join(os.path.expanduser("~"), ".mpimap")


class Registry:
    """Names of the user's jobs and where their directories are."""

    FORMAT = "mpimap-registry"          # registry.json: {"jobs": {NAME: JOBDIR, ...}}
    VERSION = 1

    def __init__(self, directory: str | None = None):
        self.home = os.path.abspath(directory or home())
        self.path = os.path.join(self.home, "registry.json")

    def check_home(self) -> None:
        """Create the home (owner-only) now, or say in one line why it cannot be."""
        with self._locked():
            pass

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def jobs(self) -> dict[str, str]:
        """Every registered name and its job directory (empty when there is no registry yet)."""
        if not self.exists():
            return {}
        try:
            body = files.read_json(self.path, self.FORMAT, self.VERSION)
            jobs = body["jobs"]
            if not isinstance(jobs, dict) or not all(isinstance(path, str) for path in jobs.values()):
                raise KeyError
        except (files.DamagedFile, KeyError):
            raise MpimapError(f"the job registry {self.path} is damaged: move it away (mv {self.path} "
                              f"{self.path}.bad) and run `mpimap ls --scan DIR` for the directories that hold "
                              "your jobs to rebuild it") from None
        return jobs

    def find(self, name: str) -> str:
        """The directory of the job called ``name``; one-line error for an unknown name."""
        path = self.jobs().get(name)
        if path is None:
            raise MpimapError(f"no job named {name!r}: `mpimap ls` lists your jobs (a job directory works too)")
        return path

    def add(self, name: str, path: str) -> None:
        """Register a new job; refuse a name still in use by an existing job directory."""
        with self._locked():
            jobs = self.jobs()
            taken = jobs.get(name)
            if taken is not None and os.path.isfile(os.path.join(taken, "job.json")) \
                    and os.path.abspath(taken) != os.path.abspath(path):
                raise MpimapError(f"a job named {name!r} exists already ({taken}): choose another --name")
            jobs[name] = os.path.abspath(path)
            self._write(jobs)

    def remove(self, name: str) -> None:
        with self._locked():
            jobs = self.jobs()
            if jobs.pop(name, None) is not None:
                self._write(jobs)

    def taken(self, name: str) -> str | None:
        """The directory of an existing job called ``name``, or None when the name is free."""
        path = self.jobs().get(name)
        return path if path is not None and os.path.isfile(os.path.join(path, "job.json")) else None

    def rebuild(self, directories: list[str]) -> dict[str, str]:
        """Register every job directory found in ``directories`` (each scanned one level deep); return the jobs.

        Entries already registered stay; a directory whose job.json cannot be read is skipped.
        """
        with self._locked():
            jobs = self.jobs()
            for path in scan_dirs(directories):
                if os.stat(path).st_uid != os.getuid():
                    continue
                try:
                    name = files.read_json(os.path.join(path, "job.json"), JobSpec.FORMAT, JobSpec.VERSION)["name"]
                except (MpimapError, KeyError):
                    continue
                jobs.setdefault(name, path)
            self._write(jobs)
        return jobs

    @contextlib.contextmanager
    def _locked(self):
        """Hold the registry's lock file (``registry.lock``) exclusively, creating the home owner-only."""
        try:
            os.makedirs(self.home, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.home, "registry.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise MpimapError(f"mpimap's home {self.home} (MPIMAP_HOME) is not a usable directory "
                              f"({exc.strerror}): set MPIMAP_HOME to a directory of yours") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, jobs: dict[str, str]) -> None:
        files.write_json(self.path, self.FORMAT, self.VERSION, {"jobs": dict(sorted(jobs.items()))})


def scan_dirs(directories: list[str]) -> list[str]:
    """The job directories (those holding a job.json) directly inside each of ``directories``, of any owner."""
    found = []
    for directory in directories:
        if os.path.isdir(directory):
            for entry in sorted(os.listdir(directory)):
                path = os.path.abspath(os.path.join(directory, entry))
                if os.path.isfile(os.path.join(path, "job.json")):
                    found.append(path)
    return found


def job_paths(all_users: bool = False, scan=()) -> list[str]:
    """The directories of your registered jobs (the registry rebuilt from ``./mpimap-jobs`` and ``scan`` if lost,
    and ``scan`` registered); with ``all_users`` also other users' jobs found in those directories."""
    registry = Registry()
    if not registry.exists():
        registry.rebuild([DEFAULT_SCAN, *scan])
    elif scan:
        registry.rebuild(list(scan))
    paths = [p for p in registry.jobs().values() if os.path.isdir(p)]
    if all_users:
        paths += [p for p in scan_dirs([DEFAULT_SCAN, *scan]) if os.stat(p).st_uid != os.getuid()]
    return paths
