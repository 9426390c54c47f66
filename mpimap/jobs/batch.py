"""Batch systems, declared by data: how a job script asks for resources, is submitted, queried and cancelled.

A batch system is a :class:`BatchSystem` subclass that fills in class
attributes (its submit and cancel commands, its directive prefix and how each
resource renders as a directive, the pattern of the job id in the submit
output, the environment variables a running job finds its id and nodes in) and
a template in the top-level ``jobscripts/`` directory.  Adding one (PBS, SGE)
is one class and one template; :data:`SCHEDULERS` lists them by name.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import MpimapError
from ..walltime import parse_walltime
from .records import Resources, Submission

SCHEDULERS = {"slurm": "mpimap.jobs.slurm:Slurm", "local": "mpimap.jobs.local:Local"}
COMMAND_TIMEOUT = 60  # seconds for one sbatch/squeue/scancel: a hung controller must not hang a command


@dataclass(frozen=True)
class BatchView:
    """What the batch system says of one submission.

    ``state``: pending (queued), running, gone (finished, cancelled or never
    known) or unknown (the batch system could not be asked).
    """

    state: str
    reason: str = ""                    # why it is still queued (Slurm: Priority, Resources, ...)
    nodes: str = ""                     # where it runs
    time_left: str = ""                 # of its walltime


class BatchSystem:
    """One batch system; subclasses declare it by their class attributes."""

    name = ""
    template = ""                       # file name in jobscripts/
    submit_command: tuple = ()          # the script path is appended
    cancel_command: tuple = ()          # the batch id is appended
    directive_prefix = ""               # e.g. "#SBATCH"
    directives: dict = {}               # Resources field (or "name", "log") -> format of its directive, e.g. "--time={}"
    job_id_pattern = r"(\S+)"           # the batch id in the submit command's output
    env_job_id = ""                     # where a running job finds its batch id ...
    env_nodelist = ""                   # ... and its nodes
    dependency_args: tuple = ()         # inserted before the script to wait for batch job {} to end (any way)
    warning_seconds = 0                 # a warning signal this long before the walltime (0: none asked for)

    def check(self) -> None:
        """Refuse before anything is created if this batch system's commands are not here."""
        program = self.submit_command[0]
        if shutil.which(program) is None:
            raise MpimapError(f"{program} not found: the {self.name} scheduler needs it on PATH "
                              f"(load the site's module, or use --scheduler local)")

    def render_directives(self, resources: Resources, name: str, log: str) -> str:
        """The directive lines of the job script for these resources (only the ones given)."""
        values = {field: getattr(resources, field, None) for field in self.directives}
        values.update(name=name, log=log, requeue=True, warning=self.warning(resources))
        lines = []
        for field, fmt in self.directives.items():
            value = self.directive_value(field, values.get(field))
            if value is None:
                continue
            for one in fmt if isinstance(fmt, tuple) else (fmt,):
                lines.append(f"{self.directive_prefix} {one.format(value)}")
        return "\n".join(lines)

    def directive_value(self, field: str, value):
        """The value a directive carries for a resource (a subclass maps, e.g. priority onto nice)."""
        return value

    def warning(self, resources: Resources) -> int | None:
        """Seconds before the walltime the job asks to be warned (a third of a short walltime at most); None
        without a walltime or a warning."""
        if not resources.walltime or not self.warning_seconds:
            return None
        return max(1, min(self.warning_seconds, int(parse_walltime(resources.walltime) // 3)))

    def submit(self, script: str, workdir: str, log: str, after: str | None = None) -> str:
        """Submit the rendered script; return the batch id parsed from the submit command's output.

        With ``after``, the job may start only once batch job ``after`` has ended, however it ended.
        """
        depend = [arg.format(after) for arg in self.dependency_args] if after else []
        out = self._run([*self.submit_command, *depend, script], cwd=workdir)
        found = re.search(self.job_id_pattern, out)
        if found is None:
            raise MpimapError(f"{self.submit_command[0]} printed no job id ({out.strip()[:200]!r})")
        return found.group(1)

    def leader(self, batch_id: str) -> str:
        """What tells the submitted job from a later one that got the same id (local: a reused PID); '' if nothing."""
        return ""

    def cancel(self, submission: Submission) -> None:
        self._run([*self.cancel_command, submission.batch_id])

    def views(self, submissions: list[Submission]) -> dict[str, BatchView]:
        """The batch system's view of each of these submissions, by batch id, in as few queries as it can."""
        raise NotImplementedError

    def env_exports(self) -> str:
        """Shell lines that give the running job mpimap's names for its batch id and nodes."""
        return (f'export MPIMAP_BATCH_ID="${{{self.env_job_id}}}"\n'
                f'export MPIMAP_NODELIST="${{{self.env_nodelist}:-}}"')

    def _run(self, command: list[str], cwd: str | None = None) -> str:
        try:
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise MpimapError(f"{command[0]} not found: is {self.name} available on this machine?") from None
        except subprocess.TimeoutExpired:
            raise MpimapError(f"{command[0]} did not answer within {COMMAND_TIMEOUT} s; try again later") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise MpimapError(f"{' '.join(command[:2])} failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
        return proc.stdout


def scheduler(name: str) -> BatchSystem:
    """The batch system called ``name``; one line naming the known ones for any other."""
    where = SCHEDULERS.get(name)
    if where is None:
        raise MpimapError(f"unknown scheduler {name!r}: use one of {', '.join(sorted(SCHEDULERS))}")
    module, _, cls = where.partition(":")
    return getattr(importlib.import_module(module), cls)()


def jobscripts_dir() -> str:
    """Where the job script templates are: ``jobscripts/`` of a checkout, or as installed with the package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(package, "jobscripts"), os.path.join(os.path.dirname(package), "jobscripts")):
        if os.path.isdir(candidate):
            return candidate
    raise MpimapError(f"the job script templates (jobscripts/) are missing from this mpimap installation "
                      f"({package}): reinstall mpimap, or pass --template FILE")
