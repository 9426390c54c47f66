"""Submitting a job: check everything, then create its directory, render its script, submit and register it.

Nothing is created until every input has been checked (scheduler, its
commands, function, points, options, template), so bad input leaves no
half-made job behind.
"""

from __future__ import annotations

import getpass
import math
import os
import re
import shlex
import shutil
import sys
import sysconfig
import time

import numpy as np

from .. import __version__
from ..errors import MpimapError
from ..native_models import NativeFunction
from ..runner import RUN_OPTIONS, RunOptions
from ..walltime import parse_walltime
from . import files
from .batch import jobscripts_dir, scheduler as find_scheduler
from .job import Job
from .records import JobSpec, Resources
from .registry import DEFAULT_SCAN, Registry

NAME_LIMIT = 100  # characters of a job name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]*)\s*\}\}")
PLACEHOLDERS = ("directives", "name", "job_dir", "workdir", "log", "env_setup", "environment", "batch_env",
                "mpiexec", "ranks", "python", "walltime_seconds")


def submit(function, points, *, name: str | None = None, scheduler: str = "local", ranks: int | None = None,
           nodes: int | None = None, ntasks_per_node: int | None = None, walltime: str | None = None,
           partition: str | None = None, account: str | None = None, qos: str | None = None,
           priority: int | None = None, mail: str | None = None, env_setup: str = "", template: str | None = None,
           notify_command: str | None = None, notify_email: str | None = None, directory: str | None = None,
           resubmit: int = 0, until_done: bool = False, dry_run: bool = False, **run_options):
    """Submit ``function`` over the points in file ``points`` as a job; return its :class:`~mpimap.jobs.Job`.

    ``function`` is ``MODULE:NAME``, ``path/file.py:NAME``, a module-level
    function, or a native model (``mpimap.native(library, symbol,
    outputs=NY)``; or None with the run options ``native="LIBRARY:SYMBOL"`` and
    ``outputs``).  ``run_options`` are ``mpimap run``'s options by their Python
    names (``point_timeout=60``, ``retries=2``, ...).  With ``dry_run`` nothing
    is created or submitted, and the rendered job script is returned instead.
    ``resubmit`` (continuations at most) or ``until_done`` make the job a chain of
    batch jobs that resume where the previous one stopped (docs/jobs.rst, "Long campaigns").
    """
    from ..inputs import FunctionRef, function_of, load_points

    batch = find_scheduler(scheduler)
    if isinstance(function, NativeFunction):  # mpimap.native(...): the job names it by its run options
        function, run_options = None, {**run_options, **_native_options(function, run_options)}
    _check_run_options(run_options)
    fn = function_of(None if function is None else _function_spec(function), run_options.get("native"),
                     run_options.get("outputs"))
    if isinstance(fn, NativeFunction):  # the job has no Python function; the library goes by its absolute path
        run_options["native"] = f"{fn.library}:{fn.symbol}"
        python_function, label = "", fn.symbol
    else:
        python_function, label = fn.spec, fn.spec
    source = os.path.abspath(os.fspath(points))
    values = load_points(source)
    if run_options.get("init") is not None:  # checked, and stored as the function is (a file path made absolute)
        run_options["init"] = FunctionRef(run_options["init"]).spec
    _check_chain(resubmit, until_done)
    resources = _resources(ranks, nodes, ntasks_per_node, walltime, partition, account, qos, priority, mail)
    batch.check_resources(resources)
    registry = Registry()
    name = _name(name, label, registry, directory)
    job_dir = os.path.abspath(directory or os.path.join(DEFAULT_SCAN, name))
    if os.path.exists(job_dir):
        raise MpimapError(f"{job_dir} exists already: choose another --name or --dir")
    template = os.path.abspath(template or os.path.join(jobscripts_dir(), batch.template))
    workdir = os.getcwd()
    spec = JobSpec(
        name=name, function=python_function, points_source=source, run_options=dict(run_options),
        resources=resources, scheduler=batch.name, env_setup=env_setup or "", template=template,
        notify_command=notify_command, notify_email=notify_email, workdir=workdir, python=sys.executable,
        environment={"PYTHONPATH": _python_path(python_function, workdir)},
        user=getpass.getuser(), created=time.time(), mpimap_version=__version__, resubmit=resubmit,
        until_done=until_done)
    script = render(template, batch, spec, job_dir)
    if dry_run:
        return script
    batch.check()  # last: a mistake in the input is said before anything about this machine
    return _create(spec, values, script, job_dir, batch, registry)


def _create(spec: JobSpec, points: np.ndarray, script: str, job_dir: str, batch, registry: Registry) -> Job:
    """Make the job directory (owner-only), fill it, submit the script and register the job."""
    registry.check_home()
    old_umask = os.umask(0o077)
    try:
        os.makedirs(os.path.dirname(job_dir), 0o777 & ~old_umask, exist_ok=True)  # ./mpimap-jobs: as the umask says
        os.mkdir(job_dir, 0o700)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and os.path.lexists(job_dir):
            raise MpimapError(f"{job_dir} exists already: choose another --name or --dir") from None
        raise MpimapError(f"cannot create the job directory {job_dir} ({exc.strerror}): give another --dir") from None
    finally:
        os.umask(old_umask)
    job = Job(job_dir)
    registered = False
    try:
        old_umask = os.umask(0o077)
        try:
            np.save(job.dir.points, points, allow_pickle=False)
            files.write_json(job.dir.spec, JobSpec.FORMAT, JobSpec.VERSION, spec.to_json())
            with open(job.dir.script, "w") as f:
                f.write(script)
            os.chmod(job.dir.script, 0o700)
            registry.add(spec.name, job_dir)
            registered = True
            job.submit_script(batch)
        finally:
            os.umask(old_umask)
    except BaseException:
        # Not submitted: nothing of value is in the directory yet, and a half-made job would only confuse `ls`.
        if registered:
            registry.remove(spec.name)
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job


def render(template: str, batch, spec: JobSpec, job_dir: str) -> str:
    """The job script: ``template`` with every ``{{placeholder}}`` filled; one line naming an unknown one."""
    from ..launch import find_mpiexec

    try:
        with open(template, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise MpimapError(f"cannot read template {template}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MpimapError(f"template {template} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    log = os.path.join(job_dir, "job.log")
    walltime = spec.resources.walltime
    seconds = math.ceil(parse_walltime(walltime)) if walltime is not None else None
    values = {
        "directives": batch.render_directives(spec.resources, spec.name, log),
        "name": spec.name,
        "job_dir": shlex.quote(job_dir),
        "workdir": shlex.quote(spec.workdir),
        "log": shlex.quote(log),
        "env_setup": spec.env_setup,
        "environment": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in spec.environment.items()),
        "batch_env": batch.env_exports(seconds),
        "mpiexec": shlex.quote(find_mpiexec()),
        "ranks": str(spec.resources.ranks),
        "python": shlex.quote(spec.python),
        "walltime_seconds": "" if seconds is None else str(seconds),
    }
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if unknown:
        raise MpimapError(f"{template}: unknown placeholder {{{{{unknown[0]}}}}}; known: "
                          + ", ".join(PLACEHOLDERS))
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _function_spec(function) -> str:
    """``MODULE:NAME`` for a function given by name or as a module-level function object."""
    if isinstance(function, str):
        return function
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not callable(function) or module is None or "<" in qualname:
        raise MpimapError(f"{function!r} cannot be named for the job: give a module-level function or 'MODULE:NAME'")
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            raise MpimapError(f"{qualname} is defined interactively: put it in a module and give 'MODULE:NAME'")
        return f"{os.path.abspath(main_file)}:{qualname}"
    return f"{module}:{qualname}"


def _native_options(fn: NativeFunction, run_options: dict) -> dict:
    """The run options ``native`` and ``outputs`` that name ``fn`` for a job (a library's function, no context)."""
    if fn.library is None or fn.context is not None:
        raise MpimapError(f"{fn!r} cannot be named for a job (a numba cfunc or a context): give "
                          "mpimap.native('path/lib.so', 'symbol', outputs=NY) without context")
    if "native" in run_options or "outputs" in run_options:
        raise MpimapError("give the native model either as the function or as native= and outputs=, not both")
    return {"native": f"{fn.library}:{fn.symbol}", "outputs": fn.outputs}


def _python_path(function: str, workdir: str) -> str:
    """PYTHONPATH for the job: the submit directory, where the function's module was found, the caller's own.

    The module may have been importable here through ``sys.path`` alone (a
    script's directory, a test runner's); the job gets that directory too.
    """
    paths = [workdir]
    module = function.rpartition(":")[0]
    top = sys.modules.get(module.split(".")[0]) if not module.endswith(".py") else None
    where = getattr(top, "__file__", None)
    if where:
        root = os.path.dirname(os.path.abspath(where))
        if os.path.basename(where) == "__init__.py":
            root = os.path.dirname(root)
        installed = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
        if os.path.realpath(root) not in installed:
            paths.append(root)
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(paths))


def _check_run_options(options: dict) -> None:
    """Unknown names and bad values of run options: one line, before anything is created."""
    unknown = sorted(set(options) - set(JOB_RUN_OPTIONS))
    if unknown:
        raise MpimapError(f"unknown run option {unknown[0]!r}; known: {', '.join(JOB_RUN_OPTIONS)}")
    problem = RunOptions(**options).problem()
    if problem:
        raise MpimapError(problem)


# `run`'s options a job takes from its spec; not fresh, retry_failed or progress, which mean nothing to a new job
# that runs detached, nor walltime: a job's is its allocation's (submit --walltime), which its script tells the run.
JOB_RUN_OPTIONS = tuple(name for name in RUN_OPTIONS
                        if name not in ("fresh", "retry_failed", "progress", "walltime"))


def _check_chain(resubmit, until_done) -> None:
    if not isinstance(resubmit, int) or isinstance(resubmit, bool) or resubmit < 0:
        raise MpimapError(f"resubmit {resubmit!r}: give how many continuations the job may queue, 0 or more")
    if resubmit and until_done:
        raise MpimapError("--resubmit and --until-done: give one (--until-done has no limit)")


def _resources(ranks, nodes, ntasks_per_node, walltime, partition, account, qos, priority, mail) -> Resources:
    if nodes is not None and ntasks_per_node is not None:
        if ranks is not None and ranks != nodes * ntasks_per_node:
            raise MpimapError(f"--ranks {ranks} differs from --nodes {nodes} x --ntasks-per-node {ntasks_per_node}: "
                              "give one or the other")
        ranks = nodes * ntasks_per_node
    ranks = 2 if ranks is None else ranks
    if not isinstance(ranks, int) or ranks < 2:
        raise MpimapError(f"ranks {ranks!r}: a job needs at least 2 ranks (one master, one worker)")
    if walltime is not None:
        parse_walltime(str(walltime))  # one line for a walltime no batch system would take
    return Resources(ranks=ranks, nodes=nodes, ntasks_per_node=ntasks_per_node,
                     walltime=None if walltime is None else str(walltime), partition=partition, account=account,
                     qos=qos, priority=priority, mail=mail)


def _name(name: str | None, function: str, registry: Registry, directory: str | None) -> str:
    """The given name if free, or one derived from the function and the time (``f-20261125-2203``)."""
    if name is not None:
        if len(name) > NAME_LIMIT:
            raise MpimapError(f"job name {name[:20]}... is {len(name)} characters long: the limit is {NAME_LIMIT} characters")
        if not _NAME.match(name):
            raise MpimapError(f"job name {name!r}: use letters, digits, '.', '_' and '-' (not first)")
        taken = registry.taken(name)
        if taken is not None:
            raise MpimapError(f"a job named {name!r} exists already ({taken}): choose another --name")
        return name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", function.rpartition(":")[2].rpartition(".")[2]) or "job"
    base = f"{base}-{time.strftime('%Y%m%d-%H%M')}"
    candidate, n = base, 1
    while registry.taken(candidate) or (directory is None and os.path.exists(os.path.join(DEFAULT_SCAN, candidate))):
        n += 1
        candidate = f"{base}-{n}"
    return candidate
