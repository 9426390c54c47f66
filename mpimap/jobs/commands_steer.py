"""Job commands that create or change a job: submit, cancel, pause, resume, log (levels), ls.

Each is a thin shell over :mod:`mpimap.jobs` (``submit``, ``Job``); every
command names a job by its name or its directory.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import click

from ..errors import MpimapError
from .job import Job, batch_views
from .records import FINAL_STATES, SKIPPED


class _WithRunOptions(click.Command):
    """A command that also takes ``mpimap run``'s own options (one definition, in cli.py).

    They are added when the command is first used, not at import: cli.py imports this module.
    """

    def get_params(self, ctx):
        if not getattr(self, "_run_options_added", False):
            from ..cli import run
            from .submit import JOB_RUN_OPTIONS

            self.params.extend(copy.copy(p) for p in run.params if p.name in JOB_RUN_OPTIONS)
            self._run_options_added = True
        return super().get_params(ctx)


@click.command(cls=_WithRunOptions)
@click.argument("function", required=False)
@click.option("--points", "points", required=True, metavar="FILE",
              help="Points, one per row: FILE.npy, FILE.csv or FILE.h5:DATASET (copied into the job).")
@click.option("--name", default=None, help="The job's name, unique among your jobs (default: FUNCTION-DATE-TIME).")
@click.option("--scheduler", default="local", show_default=True, help="slurm, pbs (PBS Pro, OpenPBS), torque, sge (Grid Engine), or local (this machine, detached).")
@click.option("--ranks", "-n", type=click.IntRange(min=2), default=None,
              help="MPI ranks in all: one master, the rest workers (default 2).")
@click.option("--nodes", type=click.IntRange(min=1), default=None, help="Nodes (with --ntasks-per-node).")
@click.option("--ntasks-per-node", type=click.IntRange(min=1), default=None, help="Ranks per node.")
@click.option("--walltime", default=None, metavar="TIME", help="MINUTES, HH:MM:SS or D-HH:MM:SS.")
@click.option("--partition", default=None)
@click.option("--account", default=None)
@click.option("--qos", default=None)
@click.option("--priority", type=int, default=None,
              help="Higher runs sooner (Slurm: --nice=-PRIORITY; raising it above 0 needs an operator).")
@click.option("--mail", default=None, metavar="ADDR", help="The batch system mails ADDR when the job begins and ends.")
@click.option("--env-setup", default="", metavar="LINES",
              help="Shell lines run before mpiexec, e.g. 'module load mpi; source venv/bin/activate'.")
@click.option("--template", default=None, metavar="FILE", help="Job script template (default: the scheduler's own).")
@click.option("--notify-command", default=None, metavar="CMD", help="Run by the master when the job starts and ends.")
@click.option("--notify-email", default=None, metavar="ADDR", help="Mail ADDR when the job starts and ends (SMTP).")
@click.option("--dir", "directory", default=None, metavar="DIR", help="The job directory (default ./mpimap-jobs/NAME).")
@click.option("--resubmit", "chain", type=click.IntRange(min=0), default=0, metavar="N",
              help="A chain: each allocation queues its continuation (at most N), which resumes where it stopped.")
@click.option("--until-done", is_flag=True,
              help="A chain without limit; it stops after two allocations in a row that store no new point.")
@click.option("--dry-run", is_flag=True, help="Print the job script; create and submit nothing.")
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit with its status (0: done).")
@click.pass_context
def submit(ctx, function, points, name, scheduler, ranks, nodes, ntasks_per_node, walltime, partition, account, qos,
           priority, mail, env_setup, template, notify_command, notify_email, directory, chain, until_done, dry_run,
           wait, **run):
    """Submit FUNCTION (MODULE:NAME or path/file.py:NAME), or the native model of --native, over the points as a
    job; print its name and batch id.

    The options of `mpimap run` are accepted and passed on to the job, except --fresh, --retry-failed and
    --progress: a new job has no results to replace or retry, and it runs detached (`mpimap attach` shows its
    progress).  To run a stopped job again with --fresh or --retry-failed: `mpimap resubmit JOB`.
    """
    from .submit import submit as submit_job

    given = {key: value for key, value in run.items()
             if ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT}
    result = submit_job(function, points, name=name, scheduler=scheduler, ranks=ranks, nodes=nodes,
                        ntasks_per_node=ntasks_per_node, walltime=walltime, partition=partition, account=account,
                        qos=qos, priority=priority, mail=mail, env_setup=env_setup, template=template,
                        notify_command=notify_command, notify_email=notify_email, directory=directory,
                        resubmit=chain, until_done=until_done, dry_run=dry_run, **given)
    if dry_run:
        click.echo(result, nl=False)
        return
    click.echo(f"submitted job {result.name} ({result.spec().scheduler} {result.batch_id()}): {result.dir.path}")
    if wait:  # follow it as `attach` does: Ctrl-C detaches, the exit status is the job's
        from .commands_read import attach

        ctx.invoke(attach, job=result.name)


@click.command(name="ls")
@click.option("--all-users", is_flag=True, help="Also jobs of other users found in the scanned directories.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of jobs.")
@click.option("--scan", multiple=True, metavar="DIR",
              help="Also look for job directories in DIR (and register yours): rebuilds a lost registry.")
def ls(all_users, as_json, scan):
    """List your jobs: name, state, points done/failed/total, batch id, started, last heard."""
    from .registry import job_paths

    rows, bad = [], []
    jobs = []
    for path in job_paths(all_users, scan):
        job = Job(path)
        try:
            job.spec(), job.last_run()  # readable, or named below (batch_views reads them)
            jobs.append(job)
        except MpimapError as exc:
            bad.append(str(exc))
    views = batch_views(jobs)
    for job in jobs:
        try:
            rows.append(_row(job, views[job.dir.path]))
        except MpimapError as exc:
            bad.append(str(exc))
    rows.sort(key=lambda r: r["submitted"])
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        _table(rows, all_users)
    for line in bad:
        click.echo(f"mpimap: error: {line}", err=True)
    if bad:
        sys.exit(2)


def _row(job: Job, view) -> dict:
    # The state first: it is final only once the master's final report is written, so the counts read after it
    # are that report's (read the other way round, a report written in between pairs "done" with older counts).
    state = job.state(view)
    spec, status = job.spec(), job.status()
    subs = job.submissions()
    run = job.last_run()[1]  # the batch job that speaks for the job now, not a continuation waiting behind it
    total = (status.total if status is not None else 0) or job.points_total()  # 0: it failed before counting
    return {
        "name": spec.name, "state": state, "done": status.done if status else 0,
        "failed": status.failed if status else 0, "total": total,
        "batch_id": run.batch_id if run else "", "scheduler": spec.scheduler,
        "allocations": sum(s.started is not None and s.state != SKIPPED for s in subs),
        "submitted": subs[-1].submitted if subs else spec.created,
        "started": status.started if status else None, "last_heard": status.updated if status else None,
        "user": _owner(job.dir.path), "dir": job.dir.path,
    }


def _owner(path: str) -> str:
    import pwd

    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _table(rows: list[dict], with_user: bool) -> None:
    if not rows:
        click.echo("no jobs (mpimap submit creates one; mpimap ls --scan DIR finds job directories)")
        return
    header = ["NAME", "STATE", "DONE/FAILED/TOTAL", "BATCH ID", "STARTED", "LAST HEARD"] + (["USER"] if with_user else [])
    table = [header]
    now = time.time()
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])) if r["started"] else "-"
        heard = _ago(now - r["last_heard"]) if r["last_heard"] else "-"
        table.append([r["name"], r["state"], f"{r['done']}/{r['failed']}/{r['total']}", r["batch_id"] or "-",
                      started, heard] + ([r["user"]] if with_user else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago" if seconds < 172800 else f"{seconds // 86400}d ago"


@click.command()
@click.argument("job")
def pause(job):
    """Stop handing out points (in-flight ones finish and are stored); `resume` starts again."""
    j = Job.open(job)
    j.pause()
    click.echo(f"pausing job {j.name}: no new points are handed out; `mpimap status {j.name}` shows it within 2 s")


@click.command()
@click.argument("job")
def resume(job):
    """Hand out points again after `pause`."""
    j = Job.open(job)
    j.resume()
    click.echo(f"resuming job {j.name}")


@click.command()
@click.argument("job")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="How long a running job has to stop by itself before its batch job is cancelled.")
def cancel(job, grace):
    """Cancel a job: a queued one leaves the queue; a running one flushes, records `cancelled` and ends."""
    j = Job.open(job)
    click.echo(f"job {j.name}: {j.cancel(grace=grace)}")


@click.command()
@click.argument("job")
@click.option("--retry-failed", is_flag=True, help="Evaluate the points that failed again too.")
@click.option("--fresh", is_flag=True, help="Start over: the stored results are replaced.")
def resubmit(job, retry_failed, fresh):
    """Run an interrupted, failed or cancelled JOB again: it goes on where it stopped (a new batch job)."""
    j = Job.open(job)
    submission = j.resubmit(retry_failed=retry_failed, fresh=fresh)
    click.echo(f"resubmitted job {j.name} ({submission.scheduler} {submission.batch_id}); "
               f"`mpimap attach {j.name}` follows it")


@click.command()
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what the job writes until it ends.")
@click.option("--level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
              default=None, help="Instead: set the running job's log level.")
@click.option("--ranks", default="all", show_default=True,
              help="With --level: all, master, workers, or worker ranks such as 2 or 1,3.")
def log(job, follow, level, ranks):
    """Print the job's log (its stdout and stderr); or, with --level, change the running job's log level."""
    j = Job.open(job)
    if level is not None:
        if ranks not in ("all", "master", "workers"):
            try:
                ranks = [int(r) for r in ranks.split(",")]
            except ValueError:
                raise MpimapError(f"--ranks {ranks!r}: use all, master, workers, or rank numbers such as 1,3") \
                    from None
        j.set_log_level(level, ranks)
        click.echo(f"sent: log level {level.upper()} for {ranks} of job {j.name}")
        return
    if not follow and not os.path.exists(j.dir.log):
        click.echo(f"job {j.name} has written nothing yet ({j.dir.log} does not exist)", err=True)
        return
    offset = 0
    while True:
        ended = not follow or j.state() in FINAL_STATES
        if os.path.exists(j.dir.log):
            with open(j.dir.log, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()
        if ended:
            return
        time.sleep(1.0)


COMMANDS: list = [submit, resubmit, ls, pause, resume, cancel, log]
