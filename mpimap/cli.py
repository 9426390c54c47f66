"""The command line: ``mpimap run | show | export | info | demo | bumps``, and the job commands (``mpimap.jobs``)."""

from __future__ import annotations

import sys
from collections import Counter

import click
import numpy as np

from . import __version__
from .errors import MpimapError
from .watchdog import bounded_read


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpimap")
def cli():
    """Map a function over many points on MPI ranks; results stream into HDF5.

    Run under MPI as ``mpiexec -n N python -m mpimap COMMAND ...``: rank 0 runs
    the command, the other N-1 ranks evaluate points.
    """


@cli.command()
@click.argument("function", required=False)
@click.option("--points", "points_spec", metavar="FILE",
              help="Points, one per row: FILE.npy, FILE.csv or FILE.h5:DATASET.")
@click.option("--out", metavar="RESULTS.h5", help="Results file; an existing one of the same job is resumed.")
@click.option("--job", metavar="DIR",
              help="Run the submitted job in DIR: function, points, results file and every option from DIR/job.json.")
@click.option("--chunksize", type=click.IntRange(min=1), default=None,
              help="Points per message (default: chosen from the measured cost of a point).")
@click.option("--fresh", is_flag=True, help="Start over, replacing an existing results file.")
@click.option("--retry-failed", is_flag=True, help="On resume, evaluate failed points again too.")
@click.option("--flush-interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between flushes of the results file (what a kill can lose; inf: only at the end).")
@click.option("--progress/--no-progress", default=None, help="Show a progress line (default: on a terminal).")
@click.option("--isolation", type=click.Choice(["rank", "process", "fresh"]), default="process", show_default=True,
              help="Where points are evaluated: in the worker rank, in a supervised child process per rank, "
                   "or in a new process per point.")
@click.option("--point-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Kill an evaluation that runs longer and record the point as timed out.")
@click.option("--max-points", type=click.IntRange(min=1), default=None,
              help="Recycle a rank's evaluation process after this many points.")
@click.option("--max-memory-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Recycle a rank's evaluation process once its resident memory passes this.")
@click.option("--scratch", is_flag=True, help="Give every evaluation its own TMPDIR, removed afterwards.")
@click.option("--on-error", type=click.Choice(["record", "stop"]), default="record", show_default=True,
              help="A point that fails for good: record it and go on, or stop the job.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Further attempts for a point whose function raised.")
@click.option("--quarantine", type=click.IntRange(min=1), default=2, show_default=True,
              help="Attempts after which a point that crashed or timed out is failed for good.")
@click.option("--keep-logs", type=click.Choice(["failed", "slow", "always"]), default=None,
              help="Store the log records a point's evaluation emitted: for failed points, slow ones, or all.")
@click.option("--slow-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="What --keep-logs slow means.")
@click.option("--debug-rerun", is_flag=True,
              help="Evaluate a point whose function raised once more with DEBUG logging; store that log.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="WARNING", show_default=True, help="Level of the job's log (stderr), for every rank.")
@click.option("--verify", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="FRACTION",
              help="Evaluate this fraction of good points once more on another host and report mismatches.")
@click.option("--host-failures", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retire a host once this many points failed there and succeeded elsewhere (0: never).")
@click.option("--stall-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Warn when a live rank returns nothing for this long.")
@click.option("--rank-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              metavar="SECONDS", help="Declare a silent worker rank lost after this long; its points run elsewhere.")
@click.option("--ranks-per-task", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Run each point on K worker ranks at once, the function using mpimap.task_comm() "
                   "(needs --isolation rank).")
@click.option("--walltime", default=None, metavar="TIME",
              help="Time this run may take (MINUTES, HH:MM:SS, D-HH:MM:SS): no point is handed out that would not "
                   "finish in time, then it stops (exit 3). MPIMAP_DEADLINE (unix seconds) too; the earlier wins.")
@click.option("--seed", type=click.IntRange(min=0), default=None, metavar="N",
              help="Give row i the random stream mpimap.point_rng(N, i), which the function gets from mpimap.rng(): "
                   "the same numbers whatever the ranks, chunks, retries or resumes.")
@click.option("--native", default=None, metavar="LIBRARY:SYMBOL",
              help="Evaluate a native model instead of FUNCTION: SYMBOL in the shared library LIBRARY, of C signature "
                   "int f(const double *x, int64_t nx, double *y, int64_t ny, void *ctx) (needs --outputs).")
@click.option("--outputs", type=int, default=None, metavar="NY",
              help="With --native: the doubles the model writes per point (each point's value; 1: one number).")
@click.option("--init", default=None, metavar="MODULE:FUNCTION",
              help="Run FUNCTION() once in every process that evaluates points, before its first point (and again "
                   "in each new evaluation process); if it raises, the points there fail with its error.")
def run(function, points_spec, out, job, **options):
    """Evaluate FUNCTION (MODULE:NAME or path/file.py:NAME), or the native model of --native, on every point;
    store results in RESULTS.h5.

    Exit status: 0 done, 2 bad input, 3 interrupted (SIGTERM, Ctrl-C, SIGUSR1, walltime; run again to resume),
    4 worker ranks lost, 5 cancelled through the control file.
    """
    from . import runner

    named = (("FUNCTION", function), ("--points", points_spec), ("--out", out))
    if job is not None:
        context = click.get_current_context()
        given = [name for name, value in named if value is not None]
        given += ["--" + name.replace("_", "-") for name in options
                  if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise MpimapError(f"--job takes the function, points, results file and every option from DIR/job.json: "
                              f"leave out {', '.join(given)}")
        outcome = runner.run_job(job)
    else:
        missing = [name for name, value in named if value is None and not (name == "FUNCTION" and options["native"])]
        if missing:
            raise MpimapError(f"missing {', '.join(missing)}: give FUNCTION (or --native LIBRARY:SYMBOL --outputs NY) "
                              "--points FILE --out RESULTS.h5, or --job DIR")
        outcome = runner.run(function, points_spec, out, runner.RunOptions(**options))
    click.echo(outcome.summary)
    if outcome.exit_status:
        sys.exit(outcome.exit_status)


@cli.command()
@click.argument("results")
@click.argument("level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
@click.option("--ranks", default="all", show_default=True,
              help="all, master, workers, or worker ranks such as 2 or 1,3.")
def loglevel(results, level, ranks):
    """Change the log level of a running job's master and/or worker ranks."""
    from .control import results_control, send

    if ranks not in ("all", "master", "workers"):
        try:
            ranks = [int(r) for r in ranks.split(",")]
        except ValueError:
            raise MpimapError(f"--ranks {ranks!r}: use all, master, workers, or rank numbers such as 1,3") from None
    send(results_control(results), {"command": "loglevel", "level": level.upper(), "ranks": ranks})
    click.echo(f"sent: log level {level.upper()} for {ranks} of the job writing {results}")


@cli.command()
@click.argument("results")
@click.option("--errors", "show_errors", is_flag=True, help="List every failed point with its error.")
def show(results, show_errors):
    """Summarise a results file, also while its job runs."""
    r = _read(results)
    attrs = r["attrs"]
    status = Counter(r["status"])
    n = len(r["status"])
    click.echo(f"{results}: {attrs['function']} over {n} points, job {attrs['state']} "
               f"(format {attrs['format_version']}, mpimap {attrs['mpimap_version']}, {attrs['runs']} run(s))")
    if "seed" in attrs:
        click.echo(f"  seed {attrs['seed']}: row i's random stream is mpimap.point_rng({attrs['seed']}, i)")
    click.echo("  " + ", ".join(f"{name} {status.get(name, 0)}" for name in ("done", "failed", "pending"))
               + "".join(f", {name} {status[name]}" for name in ("timeout", "crashed") if status.get(name)))
    done = r["status"] == "done"
    if done.any():
        seconds = r["seconds"][done]
        click.echo(f"  seconds per point: mean {seconds.mean():.3g}, max {seconds.max():.3g}")
    bad = np.isin(r["status"], ["failed", "timeout", "crashed"])
    errors = Counter(e.split("\n", 1)[0] for e in r["error"][bad])
    if show_errors:
        for i in np.flatnonzero(bad):
            click.echo(f"  point {i}: {r['error'][i].split(chr(10), 1)[0]}")
    else:
        for text, count in errors.most_common(5):
            click.echo(f"  error x{count}: {text[:100]}")


@cli.command()
@click.argument("results")
@click.option("--csv", "csv_path", required=True, metavar="FILE.csv", help="Where to write the table.")
def export(results, csv_path):
    """Write a results file as CSV: index, status, points, values, seconds, rank, host, error."""
    from .results import columns, write_csv

    rows = write_csv(columns(_read(results)), csv_path)
    click.echo(f"wrote {rows} rows to {csv_path}")


def _read(results: str) -> dict:
    """read_results, bounded in time: a damaged file can make HDF5 loop for ever."""
    from .store import READ_FIX, read_results

    with bounded_read(results, READ_FIX):
        return read_results(results)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
def info(as_json):
    """Say which versions of mpimap, Python, MPI, numpy, h5py and HDF5 run here, and whether the C extension is in
    use (MPIMAP_NO_EXTENSION=1 turns it off)."""
    import json

    from .info import installation

    found = installation()
    click.echo(json.dumps(found.to_json(), indent=1) if as_json else "\n".join(found.lines()))


@cli.command()
@click.option("--ranks", "-n", type=click.IntRange(min=1), default=3, show_default=True,
              help="MPI ranks (one master, the rest workers).")
@click.option("--points", "npoints", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--out", default="demo-results.h5", show_default=True)
def demo(ranks, npoints, out):
    """Fit a damped oscillator on a parameter grid with mpiexec from the mpich wheel."""
    from .demo import run_demo

    sys.exit(run_demo(ranks, npoints, out))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("bumps_args", nargs=-1, type=click.UNPROCESSED)
def bumps(bumps_args):
    """Run the bumps command (MODEL.py and bumps' options follow) with its fits on the worker ranks."""
    from .bumps import main as bumps_main

    bumps_main(list(bumps_args))


def _add_job_commands() -> None:
    """The job commands (submit, ls, status, ...) live with the jobs package: they only add argument handling."""
    from .jobs import commands_read, commands_steer

    for command in (*commands_steer.COMMANDS, *commands_read.COMMANDS):
        cli.add_command(command)


_add_job_commands()


def main(argv=None) -> int:
    """Run the CLI; bad input becomes one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="mpimap", standalone_mode=False)
    except MpimapError as exc:
        click.echo(f"mpimap: error: {exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:  # a bad option value, a missing argument: one line, as for every bad input
        command = exc.ctx.command_path if exc.ctx is not None else "mpimap"
        click.echo(f"mpimap: error: {exc.format_message()} (see {command} --help)", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    return 0
