"""Batch systems, declared by data: how a job script asks for resources, is submitted, queried and cancelled.

A batch system is a :class:`BatchSystem` subclass that fills in class
attributes (its submit and cancel commands, its directive prefix and how each
resource renders as a directive, the pattern of the job id in the submit
output, the environment variables a running job finds its id and nodes in) and
a template in the top-level ``jobscripts/`` directory.  Adding one (LSF,
HTCondor) is one class and one template; :data:`SCHEDULERS` lists them by name.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import MpimapError
from ..walltime import MIN_RESERVE, parse_walltime
from .records import Resources, Submission

SCHEDULERS = {"slurm": "mpimap.jobs.slurm:Slurm", "local": "mpimap.jobs.local:Local", "pbs": "mpimap.jobs.pbs:Pbs",
              "torque": "mpimap.jobs.pbs:Torque", "sge": "mpimap.jobs.sge:Sge"}
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


MIN_BATCH_WALLTIME = 60.0
"""Seconds: a batch job's shortest --walltime (the warning and the shutdown reserve leave nothing of a shorter one)."""


class BatchSystem:
    """One batch system; subclasses declare it by their class attributes."""

    name = ""
    template = ""                       # file name in jobscripts/
    submit_command: tuple = ()          # the script path is appended
    cancel_command: tuple = ()          # the batch id is appended
    directive_prefix = ""               # e.g. "#SBATCH"
    directives: dict = {}               # Resources field (or "name", "log") -> format of its directive, e.g. "--time={}"
    fixed_directives: tuple = ()        # directives every job script carries (e.g. requeue-able)
    dependency_args: tuple = ()         # submit arguments for "start after batch job {} has ended, however it ended"
    unsupported: tuple = ()             # Resources fields this batch system has no directive for: refused, not ignored
    priority_range: tuple = ()          # (lowest, highest) --priority this batch system takes, if it takes one
    warning_seconds = 120               # how long before the walltime the job asks for a warning signal, if it can
    name_starts_alpha = False           # the batch system refuses a job name that starts with a digit (PBS, SGE)
    # PBS and Grid Engine both call their submit command qsub: (arguments, pattern its output has if it is the
    # other one's, which scheduler that is), so that a job is never submitted to the wrong batch system.
    impostor: tuple = ()
    job_id_pattern = r"(\S+)"           # the batch id in the submit command's output
    env_job_id = ""                     # where a running job finds its batch id ...
    env_nodelist = ""                   # ... and its nodes: a variable holding them, or naming a file of them
    nodelist_from_file = False          # env_nodelist names a file with a host first on each line (PBS, SGE)
    env_walltime = ""                   # a variable holding the job's walltime in seconds, where one is set (Torque)

    def check(self) -> None:
        """Refuse before anything is created if this batch system's commands are not here."""
        program = self.submit_command[0]
        if shutil.which(program) is None:
            raise MpimapError(f"{program} not found: the {self.name} scheduler needs it on PATH "
                              f"(load the site's module, or use --scheduler local)")
        if self.impostor:
            args, pattern, other = self.impostor
            try:
                proc = subprocess.run([program, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                      stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired):
                return  # submitting will say what is wrong
            found = re.search(pattern, proc.stdout + proc.stderr, re.M)
            if found:
                raise MpimapError(f"{shutil.which(program)} is {found.group(0).strip()}, not {self.name}: "
                                  f"use --scheduler {other}, or put the {self.name} commands first on PATH")

    def check_resources(self, resources: Resources) -> None:
        """One line for a resource this batch system cannot express, before anything is created."""
        for field in self.unsupported:
            if getattr(resources, field) is not None:
                raise MpimapError(f"--{field.replace('_', '-')} means nothing to {self.name}: leave it out")
        if resources.priority is not None and self.priority_range:
            low, high = self.priority_range
            if not low <= resources.priority <= high:
                raise MpimapError(f"--priority {resources.priority}: {self.name} takes {low} to {high}")
        if resources.walltime and "walltime" in self.directives \
                and parse_walltime(resources.walltime) < MIN_BATCH_WALLTIME:
            raise MpimapError(f"--walltime {resources.walltime}: a {self.name} job needs at least 1 minute: the "
                              "warning comes up to a third of it before the end, and the master keeps "
                              f"{MIN_RESERVE:.0f} s or more of it to shut down, so a shorter one stores nothing")

    def render_directives(self, resources: Resources, name: str, log: str) -> str:
        """The directive lines of the job script for these resources (only the ones given)."""
        values = {field: getattr(resources, field, None) for field in self.directives}
        values.update(name=name, log=log, warning=self.warning(resources))
        lines = []
        for field, fmt in self.directives.items():
            formats = fmt if isinstance(fmt, tuple) else (fmt,)
            given = values.get(field)
            if given is not None and any("{}" in one for one in formats) and re.search(r"\s", str(given)):
                raise MpimapError(self._spaced(field, str(given)))
            value = self.directive_value(field, given, resources)
            if value is None:
                continue
            for one in formats:
                lines.append(f"{self.directive_prefix} {one.format(value)}")
        lines += [f"{self.directive_prefix} {one}" for one in self.fixed_directives]
        return "\n".join(lines)

    def _spaced(self, field: str, value: str) -> str:
        """Why a directive cannot carry this value: the batch system splits a directive at whitespace (and a newline
        would start a directive of its own)."""
        if field == "log":
            return (f"the job directory {os.path.dirname(value)!r} has whitespace in its path, which {self.name}'s "
                    f"job script directives cannot carry: submit from (or give --dir) a path without spaces")
        return (f"--{field.replace('_', '-')} {value!r}: whitespace in a value {self.name}'s job script directives "
                f"cannot carry: give it without spaces or newlines")

    def directive_value(self, field: str, value, resources: Resources):
        """The value a directive carries for a resource (a subclass maps, e.g. priority onto nice)."""
        if field == "name" and self.name_starts_alpha and not value[:1].isalpha():
            return f"j{value}"  # only the batch system's name for the job: mpimap knows it by its batch id
        return value

    def warning_lead(self, walltime_seconds: float) -> int:
        """Seconds before the walltime to ask for the warning: :attr:`warning_seconds`, at most a third of a short one."""
        return max(1, min(self.warning_seconds, int(walltime_seconds // 3)))

    def warning(self, resources: Resources) -> int | None:
        """The ``warning`` directive's value: :meth:`warning_lead` of the job's walltime; None without a walltime."""
        return self.warning_lead(parse_walltime(resources.walltime)) if resources.walltime else None

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

    def env_exports(self, walltime_seconds: int | None = None) -> str:
        """Shell lines that give the running job mpimap's names for its batch id, its nodes and its deadline.

        ``MPIMAP_DEADLINE`` is the allocation's end in unix seconds, empty if unknown: the master stops
        handing out points that would not finish before it.
        """
        if self.nodelist_from_file:  # one host per line, or per slot: each once, in order, comma-separated
            nodes = f"$(awk '!seen[$1]++ {{print $1}}' \"${{{self.env_nodelist}}}\" 2>/dev/null | paste -sd, -)"
        else:
            nodes = f"${{{self.env_nodelist}:-}}"
        return (f'export MPIMAP_BATCH_ID="${{{self.env_job_id}}}"\n'
                f'export MPIMAP_NODELIST="{nodes}"\n'
                f'export MPIMAP_DEADLINE="{self.deadline_shell(walltime_seconds)}"')

    def deadline_shell(self, walltime_seconds: int | None) -> str:
        """Shell text for the allocation's end in unix seconds: the script's start plus the walltime
        (:attr:`env_walltime` if the batch system sets it, else the one the job asked for), or empty."""
        if self.env_walltime:
            limit = f"${{{self.env_walltime}:-{walltime_seconds or ''}}}"
            return f"$(w={limit}; [ -z \"$w\" ] || echo $(( $(date +%s) + w )))"
        return f"$(( $(date +%s) + {walltime_seconds} ))" if walltime_seconds else ""

    def _run(self, command: list[str], cwd: str | None = None) -> str:
        try:
            proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise MpimapError(f"{command[0]} not found: is {self.name} available on this machine?") from None
        except subprocess.TimeoutExpired:
            raise MpimapError(f"{command[0]} did not answer within {COMMAND_TIMEOUT} s; try again later") from None
        if proc.returncode != 0:
            # Grid Engine ends its reason with a line "Exiting.": the reason is the line before.
            detail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line != "Exiting."]
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
