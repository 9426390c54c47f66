"""Shared helpers: launching real ``mpiexec`` jobs from pytest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpimap.launch import find_mpiexec

TESTS = os.path.dirname(os.path.abspath(__file__))
collect_ignore = ["inside_mpi"]  # run under mpiexec by test_inside_mpi.py


def job_env(**extra) -> dict:
    """The environment of a test job: the tests folder importable (for jobfuncs), no output buffering."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mpiexec(ranks: int, *args: str, cwd=None, timeout: float = 120, env=None, check=True):
    """Run ``mpiexec -n ranks python ARGS`` and return the CompletedProcess (output as text)."""
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, *args]
    proc = subprocess.run(command, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


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
