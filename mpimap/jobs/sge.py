"""Grid Engine (Son of Grid Engine, Univa/Altair GE, Open Cluster Scheduler): ``qsub -terse``, ``qstat -xml``, ``qdel``.

The ranks are slots of a parallel environment (``-pe mpi N``; a site whose PE
has another name sets ``MPIMAP_SGE_PE`` when it submits).  The walltime is
``h_rt``, with ``s_rt`` :meth:`~BatchSystem.warning_lead` seconds earlier: at
``s_rt`` Grid Engine sends SIGUSR1 to the job's process group: ``mpiexec``,
which passes it to the ranks (MPICH runs them in sessions of their own, out of
that group), and rank 0 stops on it.  ``qdel`` of a running job is a SIGKILL:
``mpimap cancel`` stops it cleanly.  Once ``s_rt`` has fired, Grid Engine holds
``h_rt``'s SIGKILL back until at least 90 s later, so a short job may overrun
its ``h_rt`` by up to that much; the master's own deadline does not.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

from ..walltime import format_hms, parse_walltime
from .batch import COMMAND_TIMEOUT, BatchSystem, BatchView

DEFAULT_PE = "mpi"


class Sge(BatchSystem):
    name = "sge"
    template = "sge.sh"
    submit_command = ("qsub", "-terse")      # -terse: the job id alone
    cancel_command = ("qdel",)
    directive_prefix = "#$"
    directives = {
        "name": "-N {}",
        "log": ("-o {}", "-j y"),            # Grid Engine appends to an existing output file
        "ranks": "-pe {}",
        "walltime": "-l {}",
        "partition": "-q {}",
        "account": "-A {}",
        "priority": "-p {}",
        "mail": ("-m bea", "-M {}"),
    }
    # bash whatever the queue's shell_start_mode; requeue-able (a job on a lost host runs again).
    fixed_directives = ("-S /bin/bash", "-r y")
    dependency_args = ("-hold_jid", "{}")     # "after any end" (there is no afterok in Grid Engine)
    unsupported = ("qos",)
    impostor = (("--version",), r"^pbs_version = \S+|^[Vv]ersion: \S+", "pbs or torque")  # PBS Pro's, Torque's
    priority_range = (-1023, 1024)           # higher runs sooner; above 0 only for operators and managers
    name_starts_alpha = True
    job_id_pattern = r"^\s*(\d+)"            # an array job prints ID.FIRST-LAST:STEP
    env_job_id = "JOB_ID"
    env_nodelist = "PE_HOSTFILE"             # "HOST SLOTS QUEUE PROCESSORS" per line
    nodelist_from_file = True

    def directive_value(self, field, value, resources):
        if value is None:
            return None
        if field == "ranks":
            return f"{os.environ.get('MPIMAP_SGE_PE') or DEFAULT_PE} {value}"
        if field == "walltime":
            seconds = parse_walltime(value)
            return f"h_rt={format_hms(seconds)},s_rt={format_hms(seconds - self.warning_lead(seconds))}"
        return super().directive_value(field, value, resources)

    def views(self, submissions):
        """One ``qstat -xml`` for every job, and one ``qstat -j`` for the queued ones among ours (why they wait)."""
        batch_ids = [s.batch_id for s in submissions]
        if not batch_ids:
            return {}
        out = _query(["qstat", "-xml", "-u", "*"])
        try:
            root = ET.fromstring(out) if out is not None else None
        except ET.ParseError:
            root = None
        if root is None:
            return {i: BatchView("unknown") for i in batch_ids}
        views, held = {}, set()
        for job in root.iter("job_list"):
            job_id, state = job.findtext("JB_job_number", ""), job.findtext("state", "")
            if job_id in batch_ids and job_id not in views:
                views[job_id] = _view(state, job.findtext("queue_name") or "")
                if "h" in state:
                    held.add(job_id)
        waiting = [i for i, v in views.items() if v.state == "pending" and not v.reason]
        if waiting:
            for job_id, reason in _reasons(waiting, held).items():
                views[job_id] = BatchView("pending", reason=reason)
        return {i: views.get(i, BatchView("gone")) for i in batch_ids}


def _query(command: list[str]) -> str | None:
    """The output of a qstat, or None if Grid Engine could not be asked."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _view(state: str, queue: str) -> BatchView:
    """A job's view from its ``qstat`` state letters (qw, hqw, r, t, s, Eqw, Rr, dr, ...) and queue instance."""
    host = queue.partition("@")[2]
    if "E" in state:
        return BatchView("pending", reason="error state: see `qstat -j`; `qmod -cj` clears it")
    if any(letter in state for letter in "rtsST"):
        suspended = any(letter in state for letter in "sST")
        return BatchView("running", reason="suspended" if suspended else "", nodes=host)
    if "q" in state or "w" in state:
        return BatchView("pending")
    return BatchView("running", nodes=host)  # "d": being deleted, its processes not yet ended


def _scheduling_info(text: str, limit: int = 300) -> str:
    """The scheduler's reasons, one line each, joined: a disabled queue instance (another queue, mostly) last, as it
    seldom is what holds the job back; cut at ``limit`` characters."""
    lines = list(dict.fromkeys(line for line in text.splitlines() if line))
    lines.sort(key=lambda line: "because it is disabled" in line)  # stable: the scheduler's order otherwise
    joined = "; ".join(lines)
    return joined if len(joined) <= limit else joined[:limit - 4].rstrip() + " ..."


def _reasons(batch_ids: list[str], held: set[str]) -> dict[str, str]:
    """Why each of these queued jobs waits, from ``qstat -j``: another job (-hold_jid), a hold (``held``: their
    state has an "h"), or what the scheduler says."""
    out = _query(["qstat", "-j", ",".join(batch_ids)]) or ""
    reasons = {}
    for block in out.split("=" * 20):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1].isspace() and key is not None:  # a value's next line (scheduling info has one per reason)
                fields[key].append(line.strip())
                continue
            name, sep, value = line.partition(":")
            key = name.strip() if sep and name.strip() not in fields else None
            if key is not None:
                fields[key] = [value.strip()]
        fields = {name: "\n".join(lines) for name, lines in fields.items()}
        job_id = fields.get("job_number")
        if job_id is None:
            continue
        info = _scheduling_info(fields.get("scheduling info", ""))
        if fields.get("jid_predecessor_list"):
            reasons[job_id] = f"Dependency (after job {fields['jid_predecessor_list']})"
        elif job_id in held:
            reasons[job_id] = f"held (qrls {job_id} releases it)"
        else:
            reasons[job_id] = info or "Priority"
    return reasons
