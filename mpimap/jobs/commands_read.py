"""Job commands that only read a job's files: status, attach, ps, results, thumbnail.

Thin shells over :mod:`.views`, :mod:`.follow`, :mod:`.thumbnail` and
:mod:`mpimap.results`: they parse arguments, bound every read of a results
file in time, and print.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import click
import numpy as np

from ..errors import MpimapError
from ..watchdog import bounded_read
from .job import Job, batch_views
from .views import StatusReport, bar, idle_summary, processes, ps_table

FORMATS = (".csv", ".npy", ".h5", ".hdf5")


def _read_results(path: str) -> dict:
    """The columns of a results file (:func:`mpimap.results.columns`), read within the store's time bound."""
    from ..results import columns
    from ..store import READ_FIX, read_results

    with bounded_read(path, READ_FIX):
        return columns(read_results(path))


def _json(value) -> None:
    click.echo(json.dumps(_plain(value), indent=1, allow_nan=False))


def _plain(value):
    """``value`` with numpy scalars and arrays as plain JSON (NaN and infinities as null, complex as [re, im])."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, complex):
        return [_plain(value.real), _plain(value.imag)]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(job, as_json):
    """Progress, rate, ETA, ranks per host, failures by kind and the batch system's view of JOB."""
    report = StatusReport.of(Job.open(job))
    if as_json:
        _json(report.to_json())
    else:
        click.echo("\n".join(report.lines()))


@click.command()
@click.argument("job")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="How often to look at the job's files.")
def attach(job, interval):
    """Follow JOB: a live progress bar and each point that fails, until it ends. Ctrl-C detaches; the job goes on.

    Exit status: 0 when the job ended done, 1 failed, 3 interrupted, 5 cancelled.
    """
    from ..store import READ_FIX
    from .follow import Follower
    from .records import EXIT_STATUS

    the_job = Job.open(job)
    follower = Follower(the_job)
    redraw = sys.stdout.isatty()
    click.echo(f"attached to job {the_job.name} ({the_job.dir.path}); Ctrl-C detaches, the job goes on")
    shown = None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C detaches, also if started with it ignored
    try:
        while True:
            with bounded_read(the_job.dir.results, READ_FIX):
                look = follower.look()
            if shown is None and follower.earlier_failures:
                click.echo(f"{follower.earlier_failures} points had failed before (mpimap results {job})")
            for failure in look.new_failures:
                click.echo(("\r\x1b[K" if redraw else "") + failure.line())
            line = _progress(look)
            if redraw:
                click.echo("\r" + line + "\x1b[K", nl=False)
            elif line != shown:
                click.echo(line)
            shown = line
            if look.final:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo(("\n" if redraw else "") + f"detached; the job goes on (mpimap attach {job})")
        sys.exit(0)
    s = look.status
    counts = f": {s.done} done, {s.failed} failed of {s.total}" if s else ""
    click.echo(("\n" if redraw else "") + f"job {the_job.name} {look.state}{counts}"
               + (f" ({s.message})" if s and s.message else ""))
    click.echo(f"results: mpimap results {job} -o FILE.csv; thumbnail: mpimap thumbnail {job} "
               f"(writes {the_job.dir.thumbnail})")
    sys.exit(EXIT_STATUS.get(look.state, 1))


def _progress(look) -> str:
    s = look.status
    if s is None:
        return f"job {look.state}: no progress reported yet"
    return f"{look.state}: " + bar(s, look.final)


@click.command()
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@click.option("--all-users", is_flag=True, help="Also jobs of other users in ./mpimap-jobs (as `ls --all-users`).")
@click.option("--json", "as_json", is_flag=True, help="Print the processes as JSON.")
def ps(jobs, all_users, as_json):
    """Every process of your running jobs (or of JOB...): host, rank, PID, state, the points it evaluates."""
    from .registry import job_paths

    rows, unreadable, found = [], [], []
    for job in [Job.open(j) for j in jobs] if jobs else [Job(p) for p in job_paths(all_users)]:
        try:
            job.spec(), job.last_run()  # readable, or named below (batch_views reads them)
            found.append(job)
        except MpimapError as exc:  # one damaged job does not hide the others
            unreadable.append(str(exc))
    views = batch_views(found)  # one query to each batch system for all jobs
    for job in found:
        try:
            rows += processes(job, views[job.dir.path])
        except MpimapError as exc:
            unreadable.append(str(exc))
    if as_json:
        _json({"processes": [r.to_json() for r in rows], "unreadable": unreadable})
    else:
        if rows:
            click.echo("\n".join(ps_table(rows)))
            click.echo("\n".join(idle_summary(rows)))
        else:
            click.echo("no running jobs")
        for text in unreadable:
            click.echo(f"mpimap: error: {text}", err=True)
    if unreadable:
        sys.exit(2)


@click.command()
@click.argument("job")
@click.option("-o", "--out", metavar="FILE.csv|.npy|.h5", help="Write every row to FILE (its extension decides "
              "the format) instead of printing a table.")
@click.option("--head", type=click.IntRange(min=0), default=20, show_default=True,
              help="Rows to print without -o (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (without -o).")
def results(job, out, head, as_json):
    """Results of JOB so far (also while it runs), in point order, with their status.

    JOB is a job's name or directory, or a results file.
    """
    from .. import results as res

    if out and os.path.splitext(out)[1].lower() not in FORMATS:
        raise MpimapError(f"-o {out}: the extension decides the format; use FILE.csv, FILE.npy or FILE.h5")
    data = _read_results(res.results_path(job))
    if out:
        extension = os.path.splitext(out)[1].lower()
        if extension == ".csv":
            click.echo(f"wrote {res.write_csv(data, out)} rows to {out}")
        else:
            click.echo((res.write_npy if extension == ".npy" else res.write_h5)(data, out))
        return
    table = res.flat(data)
    n = len(data["index"])
    shown = range(n if head == 0 else min(head, n))
    if as_json:
        _json([{name: table[name][i] for name in table} for i in shown])
        return
    counts = {name: int(np.sum(data["status"] == name)) for name in ("done", "failed", "timeout", "crashed",
                                                                         "pending")}
    click.echo(f"{n} points: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("done", "pending")))
    rows = [list(table)] + [[_cell(table[name][i], name) for name in table] for i in shown]
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if len(shown) < n:
        click.echo(f"... {n - len(shown)} more rows: mpimap results {job} -o FILE.csv (or --head 0)")


def _cell(value, name: str) -> str:
    if name == "error":
        text = str(value).split("\n", 1)[0]
        return text[:60] + ("..." if len(text) > 60 else "")
    if isinstance(value, (float, np.floating)):
        return "-" if value != value else f"{value:.6g}"
    return "-" if value is None or value == "" else str(value)


@click.command()
@click.argument("job")
@click.option("-o", "--out", metavar="FILE.png", help="Where to write the image (default: progress.png in the job's "
              "directory); its extension decides the format (png, jpg, svg, pdf, ...).")
def thumbnail(job, out):
    """A small image of JOB's progress: points done and failed over time, and a map of the points (1-D, 2-D)."""
    from ..store import READ_FIX
    from .thumbnail import image_format, read_points_and_status, render

    the_job = Job.open(job)
    out = out or the_job.dir.thumbnail
    image = image_format(out)
    with bounded_read(the_job.dir.results, READ_FIX):
        found = read_points_and_status(the_job)
    width, height = render(the_job, out, found, image)
    click.echo(f"wrote {out} ({width}x{height} pixels)")


COMMANDS = [status, attach, ps, results, thumbnail]
