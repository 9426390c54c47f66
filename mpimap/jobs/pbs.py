"""PBS: PBS Pro / OpenPBS (``-l select=...``, ``qstat -f -F json``) and Torque (``-l nodes=N:ppn=M``, ``qstat -f``).

Both submit with ``qsub`` (which prints ``ID.SERVER``), cancel with ``qdel``
and share one template, ``jobscripts/pbs.sh``; the classes differ in how the
ranks are asked for and how ``qstat`` answers.  PBS has no warning signal
before the walltime: the master's own deadline (``MPIMAP_DEADLINE``) stops
the job in time.  No PBS server runs where mpimap is tested: this module is
checked against recorded ``qstat`` outputs and by running the rendered script
with the environment PBS gives a job.
"""

from __future__ import annotations

import json
import math
import subprocess

from ..walltime import format_hms, parse_walltime
from .batch import COMMAND_TIMEOUT, BatchSystem, BatchView

_PENDING = set("QHWT")      # queued, held, waiting (for its start time or a dependency), in transit
_RUNNING = set("RESUB")     # running, exiting, suspended (by the server or the user), array begun
# What qstat says of an id it has no record of: "Unknown Job Id ID" (PBS Pro), "Unknown Job Id Error ID" (Torque),
# or, asked without -x, "ID Job has finished, use -x or -H to obtain historical job information" (PBS Pro).
_ENDED = ("Unknown Job Id", "Job has finished")


class Pbs(BatchSystem):
    """PBS Pro and OpenPBS."""

    name = "pbs"
    template = "pbs.sh"
    submit_command = ("qsub",)
    cancel_command = ("qdel",)
    directive_prefix = "#PBS"
    directives = {
        "name": "-N {}",
        "log": ("-j oe", "-o /dev/null"),    # the script appends to the log itself (see pbs.sh)
        "ranks": "-l {}",
        "walltime": "-l walltime={}",
        "partition": "-q {}",
        "account": "-A {}",
        "priority": "-p {}",
        "mail": ("-m abe", "-M {}"),
    }
    # bash, not the user's login shell reading the script; requeue-able (a job on a lost node runs again).
    fixed_directives = ("-S /bin/bash", "-r y")
    dependency_args = ("-W", "depend=afterany:{}")
    unsupported = ("qos",)
    impostor = (("-help",), r"^(SGE|OGS/GE|UGE|AGE|OCS|GCS) \d\S*", "sge")  # Grid Engine's qsub names itself
    priority_range = (-1024, 1023)           # higher runs sooner
    name_starts_alpha = True                 # POSIX qsub: the first character of -N is alphabetic
    job_id_pattern = r"^\s*(\d+(?:\[\d*\])?(?:\.\S+)?)\s*$"  # 1234.server, or 1234[].server for an array
    env_job_id = "PBS_JOBID"
    env_nodelist = "PBS_NODEFILE"            # a host per line, once per rank slot
    nodelist_from_file = True
    query = ("qstat", "-f", "-F", "json", "-x")  # -x: finished jobs too, while the server keeps their history
    # The same as text, asked when the JSON is invalid: PBS Pro's writer does not escape some environment values
    # (a Windows path, BASH_FUNC_* of qsub -V, -v foo=005), and one such job would blind the view of all.
    text_query = ("qstat", "-f", "-x")

    def directive_value(self, field, value, resources):
        if value is None:
            return None
        if field == "ranks":
            return self.placement(*_chunks(resources))
        if field == "walltime":
            return format_hms(parse_walltime(value))
        return super().directive_value(field, value, resources)

    def placement(self, chunks: int, per_chunk: int) -> str:
        """The ``-l`` resource request for ``chunks`` x ``per_chunk`` MPI ranks (one core each)."""
        return f"select={chunks}:ncpus={per_chunk}:mpiprocs={per_chunk}"

    def views(self, submissions):
        """One ``qstat -f`` for all the ids."""
        batch_ids = [s.batch_id for s in submissions]
        if not batch_ids:
            return {}
        proc = _ask([*self.query, *batch_ids])
        if proc is None:
            return {i: BatchView("unknown") for i in batch_ids}
        jobs = self.parse(proc.stdout)
        if jobs is None and self.text_query and (text := _ask([*self.text_query, *batch_ids])) is not None:
            proc, jobs = text, _parse_text(text.stdout)
        # An id the server does not know (ended, history purged) makes qstat exit non-zero, and still print the others.
        known = jobs is not None and (proc.returncode == 0 or any(m in proc.stderr for m in _ENDED))
        if not known:
            return {i: BatchView("unknown") for i in batch_ids}
        return {i: _view(jobs[i]) if i in jobs else BatchView("gone") for i in batch_ids}

    def parse(self, out: str) -> dict[str, dict] | None:
        """``qstat -f -F json``'s jobs by id, attributes as PBS names them (``job_state``, ``Resource_List``, ...)."""
        if not out.strip():
            return {}
        try:
            return {job_id: dict(attrs) for job_id, attrs in json.loads(out).get("Jobs", {}).items()}
        except (ValueError, AttributeError, TypeError):
            return None


class Torque(Pbs):
    """Torque (and PBS versions without JSON output): ``-l nodes=N:ppn=M``, ``qstat -f`` as text."""

    name = "torque"
    env_walltime = "PBS_WALLTIME"            # Torque tells the job its walltime in seconds
    query = ("qstat", "-f")                  # completed jobs stay (state C) for the server's keep_completed

    def placement(self, chunks, per_chunk):
        return f"nodes={chunks}:ppn={per_chunk}"

    text_query = ()                          # its query is text already

    def parse(self, out):
        return _parse_text(out)


def _ask(command: list[str]) -> subprocess.CompletedProcess | None:
    """Run a qstat; None if it could not run."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _parse_text(out: str) -> dict[str, dict]:
    """``qstat -f``'s text (Torque, and PBS Pro without ``-F json``): ``Job Id: ID``, then ``    name = value``
    lines indented by 4 spaces; a long value goes on in lines indented deeper (a tab, or 8 spaces)."""
    jobs: dict[str, dict] = {}
    job = key = None
    for line in out.splitlines():
        if line.startswith("Job Id:"):
            job = jobs.setdefault(line.partition(":")[2].strip(), {})
            key = None
        elif job is None or not line.strip():
            continue
        elif line.startswith("    ") and not line[4].isspace() and " = " in line:
            key, _, value = line.strip().partition(" = ")
            job[key] = value
        elif key is not None and line[0].isspace():
            job[key] += line.strip()
    return jobs


def _chunks(resources) -> tuple[int, int]:
    """(chunks, ranks per chunk): the nodes and ranks per node asked for, or one rank per chunk."""
    if resources.nodes is None:
        return resources.ranks, 1
    return resources.nodes, resources.ntasks_per_node or math.ceil(resources.ranks / resources.nodes)


def _view(job: dict) -> BatchView:
    """A job's view from its ``qstat -f`` attributes (PBS Pro's JSON or Torque's text, flattened alike)."""
    state = job.get("job_state", "")
    hosts = dict.fromkeys(part.partition("/")[0] for part in job.get("exec_host", "").split("+") if part)
    nodes = ",".join(hosts)
    if state in _PENDING:
        return BatchView("pending", reason=_reason(job, state))
    if state in _RUNNING:
        return BatchView("running", reason="suspended" if state in "SU" else "", nodes=nodes, time_left=_left(job))
    return BatchView("gone")    # F (finished: PBS Pro history), C (completed: Torque), X, M (moved away)


def _reason(job: dict, state: str) -> str:
    if "depend" in job and state in "HW":
        return f"Dependency ({job['depend']})"
    if state == "H":
        return f"held ({job.get('Hold_Types', 'hold')}): qrls releases it"
    return job.get("comment", "") or ("Priority" if state == "Q" else "")


def _left(job: dict) -> str:
    """What is left of the walltime: Torque says so, PBS Pro gives the limit and the time used."""
    remaining = job.get("Walltime.Remaining", "")
    if remaining:
        try:
            return format_hms(max(0, int(remaining)))
        except ValueError:
            return ""
    limit = _resource(job, "Resource_List", "walltime")
    used = _resource(job, "resources_used", "walltime")
    if not limit:
        return ""
    try:
        return format_hms(max(0.0, _hms(limit) - (_hms(used) if used else 0.0)))
    except ValueError:
        return ""


def _resource(job: dict, group: str, name: str) -> str:
    """``Resource_List.walltime``: nested in PBS Pro's JSON, a dotted name in Torque's text."""
    nested = job.get(group)
    if isinstance(nested, dict):
        return str(nested.get(name, ""))
    return str(job.get(f"{group}.{name}", ""))


def _hms(text: str) -> float:
    """Seconds in PBS's ``[[HH:]MM:]SS``."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds
