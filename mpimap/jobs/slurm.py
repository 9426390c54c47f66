"""Slurm: ``sbatch --parsable`` to submit, ``squeue`` to ask, ``scancel`` to cancel."""

from __future__ import annotations

import subprocess

from .batch import COMMAND_TIMEOUT, BatchSystem, BatchView

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class Slurm(BatchSystem):
    name = "slurm"
    template = "slurm.sh"
    submit_command = ("sbatch", "--parsable")
    cancel_command = ("scancel",)
    directive_prefix = "#SBATCH"
    directives = {
        "name": "--job-name={}",
        "log": ("--output={}", "--error={}", "--open-mode=append"),  # a requeued job appends, not truncates
        "ranks": "--ntasks={}",
        "nodes": "--nodes={}",
        "ntasks_per_node": "--ntasks-per-node={}",
        "walltime": "--time={}",
        "partition": "--partition={}",
        "account": "--account={}",
        "qos": "--qos={}",
        "priority": "--nice={}",
        "mail": ("--mail-type=BEGIN,END,FAIL", "--mail-user={}"),
        "warning": "--signal=B:USR1@{}",  # to the batch shell, i.e. mpiexec: the master stops in time
    }
    fixed_directives = ("--requeue",)  # preempted or requeued by an operator: it runs again and resumes
    dependency_args = ("--dependency=afterany:{}",)
    job_id_pattern = r"^\s*(\d+)"       # --parsable prints ID or ID;CLUSTER
    env_job_id = "SLURM_JOB_ID"
    env_nodelist = "SLURM_JOB_NODELIST"
    query_format = "%i|%T|%r|%N|%L"     # id, state, reason, nodes, time left

    def directive_value(self, field, value, resources):
        if field == "priority" and value is not None:
            return -int(value)  # higher priority = lower nice (a negative nice needs an operator)
        return value

    def views(self, submissions):
        """One ``squeue`` for all the ids (``-t all``: finished jobs too, while Slurm still remembers them)."""
        batch_ids = [s.batch_id for s in submissions]
        if not batch_ids:
            return {}
        command = ["squeue", "-h", "-t", "all", "-o", self.query_format, "-j", ",".join(batch_ids)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return {i: BatchView("unknown") for i in batch_ids}
        if proc.returncode != 0:
            # One unknown id (long purged) makes squeue fail; several are filtered without complaint.
            gone = "Invalid job id" in proc.stderr
            return {i: BatchView("gone" if gone else "unknown") for i in batch_ids}
        views = {}
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) != 5:
                continue
            job_id, state, reason, nodes, left = parts
            state = state.split()[0]
            kind = "pending" if state in _PENDING else "running" if state in _RUNNING else "gone"
            views[job_id] = BatchView(kind, reason=reason if reason not in ("None", "(null)") else "",
                                      nodes=nodes, time_left=left if kind == "running" else "")
        return {i: views.get(i, BatchView("gone")) for i in batch_ids}

    def deadline_shell(self, walltime_seconds):
        """``SLURM_JOB_END_TIME`` where Slurm sets it, else the end ``squeue`` gives (a date,
        or "Unknown"/"NONE" without a time limit: then empty)."""
        end = 'e=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null); case $e in [0-9]*) date -d "$e" +%s;; esac'
        return f"${{SLURM_JOB_END_TIME:-$({end})}}"
