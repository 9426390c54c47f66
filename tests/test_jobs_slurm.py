"""Jobs under a real Slurm (a single-node cluster on localhost, started by the ``slurm`` fixture): real sbatch, squeue, scancel."""

import os
import subprocess
import sys

import numpy as np

from conftest import job_env
from mpimap.launch import find_mpiexec
from mpimap.store import read_results


def test_a_hand_written_batch_script_runs_mpimap_under_slurm(slurm, tmp_path):
    """The plain way, before the job manager: sbatch a script that runs ``mpiexec -n 2 python -m mpimap run``."""
    points = np.column_stack([np.arange(60.0), np.linspace(-1, 1, 60)])
    np.save(tmp_path / "points.npy", points)
    out = tmp_path / "results.h5"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --output={tmp_path}/job.log
exec {find_mpiexec()} -n 2 {sys.executable} -m mpimap run jobfuncs:poly --points {tmp_path}/points.npy --out {out}
""")
    # sbatch hands the job this environment (SLURM_CONF, PYTHONPATH for jobfuncs); --wait returns its exit code.
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(script)], env=job_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert proc.returncode == 0, f"sbatch: {proc.stderr}\njob.log:\n{log}"
    batch_id = proc.stdout.strip().split(";")[0]
    assert "60 of 60" in log

    from jobfuncs import poly

    r = read_results(str(out))
    assert np.array_equal(r["value"], np.array([poly(p) for p in points]))
    assert set(r["status"]) == {"done"}
    assert set(r["rank"]) == {1}
    job = slurm.command("scontrol", "show", "job", batch_id).stdout
    assert "JobState=COMPLETED" in job and "NodeList=localhost" in job
    assert slurm.command("squeue", "-h", "-j", batch_id, check=False).stdout.strip() == ""
