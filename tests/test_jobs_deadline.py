"""Every job script tells the master when its allocation ends (``MPIMAP_DEADLINE``, unix seconds) and names its
batch id and nodes: on this machine (local), under a real Slurm and under a real Grid Engine.

(PBS and Torque: tests/test_jobs_pbs.py runs their scripts under a PBS job's environment.)
"""

import datetime
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env
from test_jobs_slurm import wait_for

WALLTIME = 600  # seconds: --walltime 10:00

FUNCTIONS = '''
import json, os

def twice_and_tell(x):
    """2x; and what the job's environment says."""
    path = os.path.join(os.environ["TELL_DIR"], f"env-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith("MPIMAP_")}, f)
    return 2 * x
'''


def run_job(tmp_path, scheduler: str) -> tuple[list[dict], float, float]:
    """Submit a 4-point job with ``--walltime 10:00``; return what its ranks saw, and when it was submitted and done."""
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    np.save(tmp_path / "points.npy", np.arange(4.0))
    tell = tmp_path / "tell"
    tell.mkdir()
    env = job_env(MPIMAP_HOME=tmp_path / "home")

    def mpimap(*args):
        return subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)

    submitted = time.time()
    proc = mpimap("submit", "funcs.py:twice_and_tell", "--points", "points.npy", "--name", "dl", "--scheduler",
                  scheduler, "--walltime", "10:00", "--env-setup", f"export TELL_DIR={tell}")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: json.loads(mpimap("status", "dl", "--json").stdout)["state"] in ("done", "failed"), 120,
             "the job ends")
    status = json.loads(mpimap("status", "dl", "--json").stdout)
    assert status["state"] == "done", status
    return [json.loads(p.read_text()) for p in tell.iterdir()], submitted, time.time()


def test_a_local_job_with_a_walltime_knows_its_deadline(tmp_path):
    told, submitted, done = run_job(tmp_path, "local")
    assert told
    for seen in told:
        assert submitted + WALLTIME - 1 <= int(seen["MPIMAP_DEADLINE"]) <= done + WALLTIME
        assert seen["MPIMAP_BATCH_ID"].rpartition(":")[0] == seen["MPIMAP_NODELIST"]


def test_a_slurm_job_knows_the_end_slurm_gave_it(slurm, tmp_path):
    told, _, _ = run_job(tmp_path, "slurm")
    batch_id = told[0]["MPIMAP_BATCH_ID"]
    job = slurm.command("scontrol", "show", "job", batch_id).stdout
    start = job.split("StartTime=", 1)[1].split()[0]
    start = datetime.datetime.fromisoformat(start).timestamp()  # local time, as Slurm prints it
    for seen in told:
        assert int(seen["MPIMAP_DEADLINE"]) == start + WALLTIME
        assert (seen["MPIMAP_BATCH_ID"], seen["MPIMAP_NODELIST"]) == (batch_id, "localhost")


def test_a_grid_engine_job_knows_its_deadline_and_nodes(sge, tmp_path):
    told, submitted, done = run_job(tmp_path, "sge")
    for seen in told:
        assert submitted + WALLTIME - 1 <= int(seen["MPIMAP_DEADLINE"]) <= done + WALLTIME
        assert seen["MPIMAP_BATCH_ID"].isdigit() and seen["MPIMAP_NODELIST"] == "localhost"


@pytest.mark.parametrize("scheduler", ["local", "slurm", "sge", "pbs", "torque"])
def test_no_walltime_no_deadline(tmp_path, scheduler):
    """Without --walltime the script leaves MPIMAP_DEADLINE empty (Slurm still asks squeue: its partition may
    have a limit)."""
    np.save(tmp_path / "points.npy", np.arange(4.0))
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "points.npy",
                           "--scheduler", scheduler, "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=job_env(MPIMAP_HOME=tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("export MPIMAP_DEADLINE="))
    if scheduler == "slurm":
        assert "squeue" in line
    elif scheduler == "torque":
        assert line == 'export MPIMAP_DEADLINE="$(w=${PBS_WALLTIME:-}; [ -z "$w" ] || echo $(( $(date +%s) + w )))"'
    else:
        assert line == 'export MPIMAP_DEADLINE=""'
