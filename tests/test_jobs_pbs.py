"""PBS (PBS Pro/OpenPBS: ``--scheduler pbs``; Torque: ``--scheduler torque``) without a PBS server.

No PBS server is packaged here, so nothing in this file ran against a real one.  What is tested instead:
- the rendered job scripts run for real (``bash job.sh``, real mpiexec) under the environment a PBS
  server gives a job (PBS_JOBID, PBS_NODEFILE, PBS_O_WORKDIR, PBS_JOBNAME, PBS_WALLTIME on Torque...),
  started in $HOME with a bare PATH as PBS starts them, and complete the job;
- ``qsub``/``qstat``/``qdel`` as the classes call them, against recorded outputs (tests/fixtures/pbs/,
  whose README says where each comes from), replayed by fake commands first on PATH: ``mpimap submit``,
  ``status`` and ``cancel`` go through the classes as they would on a cluster.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env
from mpimap.jobs.batch import BatchView, scheduler
from mpimap.jobs.records import Submission
from mpimap.store import read_results

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pbs")
FLAVOR = {"pbs": "pbspro", "torque": "torque"}
JOB_ID = {"pbs": "4711.pbs01", "torque": "5678.torque01.example.org"}
DEPENDENT_ID = {"pbs": "4712.pbs01", "torque": "5679.torque01.example.org"}


@pytest.fixture
def fake_pbs(tmp_path, monkeypatch):
    """Fake qsub/qstat/qdel first on PATH; returns a function that sets the flavor and the stage they replay."""
    bin_dir, state = tmp_path / "fake-bin", tmp_path / "fake-state"
    bin_dir.mkdir()
    state.mkdir()
    for command in ("qsub", "qstat", "qdel"):
        os.symlink(os.path.join(FIXTURES, "fake", "pbs_commands.py"), bin_dir / command)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PBS_DIR", str(state))

    def set_stage(name: str, stage: str) -> None:
        (state / "flavor").write_text(FLAVOR[name])
        (state / "stage").write_text(stage)

    set_stage.state = state
    return set_stage


def view(name: str, batch_id: str) -> BatchView:
    return scheduler(name).views([Submission(batch_id=batch_id, scheduler=name, submitted=0.0)])[batch_id]


@pytest.mark.parametrize("name, stage, expected", [
    ("pbs", "queued", BatchView("pending", reason="Not Running: Insufficient amount of resource: ncpus (R: 2 A: 0 T: 64)")),
    ("pbs", "held", BatchView("pending", reason="held (u): qrls releases it")),
    ("pbs", "running", BatchView("running", nodes="node03,node04", time_left="00:47:30")),
    ("pbs", "finished", BatchView("gone")),
    ("pbs", "unknown", BatchView("gone")),
    ("torque", "queued", BatchView("pending", reason="Priority")),
    ("torque", "held", BatchView("pending", reason="held (u): qrls releases it")),
    ("torque", "running", BatchView("running", time_left="00:47:30",
                                    nodes="node03.cluster.example.org,node04.cluster.example.org,node05.cluster.example.org")),
    ("torque", "finished", BatchView("gone")),
    ("torque", "unknown", BatchView("gone")),
])
def test_qstat_outputs_read_as_the_batch_view(fake_pbs, name, stage, expected):
    fake_pbs(name, stage)
    assert view(name, JOB_ID[name]) == expected


@pytest.mark.parametrize("name", ["pbs", "torque"])
def test_a_job_held_by_a_dependency_says_so_and_several_ids_take_one_qstat(fake_pbs, name):
    fake_pbs(name, "held")
    batch = scheduler(name)
    ids = [JOB_ID[name], DEPENDENT_ID[name], "999." + JOB_ID[name].partition(".")[2]]
    views = batch.views([Submission(batch_id=i, scheduler=name, submitted=0.0) for i in ids])
    assert views[DEPENDENT_ID[name]] == BatchView("pending", reason=f"Dependency (afterany:{JOB_ID[name]}@"
                                                                     f"{JOB_ID[name].partition('.')[2]})")
    assert views[JOB_ID[name]].reason == "held (u): qrls releases it"
    assert views[ids[2]] == BatchView("gone")  # unknown to the server: the others are still read


def test_the_wrong_flavor_cannot_be_asked_and_says_unknown(fake_pbs):
    """Torque's ``qstat -f`` against a PBS Pro server's fake (which wants ``-F json``) fails: unknown, not gone."""
    fake_pbs("pbs", "running")
    assert view("torque", JOB_ID["pbs"]) == BatchView("unknown")
    fake_pbs("torque", "running")
    assert view("pbs", JOB_ID["torque"]) == BatchView("unknown")


@pytest.mark.parametrize("name, select", [("pbs", "select=2:ncpus=1:mpiprocs=1"), ("torque", "nodes=2:ppn=1")])
def test_submit_status_and_cancel_go_through_the_class(fake_pbs, tmp_path, name, select):
    user = _User(tmp_path)
    fake_pbs(name, "queued")
    out = user("submit", "jobfuncs:square", "--points", "points.npy", "--name", "scan", "--scheduler", name,
               "--walltime", "1:00:00", "--priority", "10", "--mail", "me@example.org").stdout
    assert f"submitted job scan ({name} {JOB_ID[name]})" in out
    script = (tmp_path / "mpimap-jobs" / "scan" / "job.sh").read_text()
    for line in (f"#PBS -l {select}", "#PBS -l walltime=01:00:00", "#PBS -p 10", "#PBS -m abe",
                 "#PBS -M me@example.org", "#PBS -N scan", "#PBS -j oe", "#PBS -r y", "#PBS -S /bin/bash"):
        assert line in script.splitlines(), line
    submitted = [json.loads(line) for line in (fake_pbs.state / "qsub.log").read_text().splitlines()]
    assert submitted == [[str(tmp_path / "mpimap-jobs" / "scan" / "job.sh")]]

    status = user.json("status", "scan")
    assert status["state"] == "queued" and status["batch"]["state"] == "pending"
    fake_pbs(name, "held")
    assert user.json("status", "scan")["batch"]["reason"] == "held (u): qrls releases it"
    fake_pbs(name, "running")
    row = [r for r in user.json("ls") if r["name"] == "scan"][0]
    assert (row["state"], row["batch_id"]) == ("running", JOB_ID[name])

    user("cancel", "scan", "--grace", "1")
    assert json.loads((fake_pbs.state / "qdel.log").read_text()) == [JOB_ID[name]]
    assert [r for r in user.json("ls") if r["name"] == "scan"][0]["state"] == "cancelled"


@pytest.mark.parametrize("name", ["pbs", "torque"])
def test_bad_resources_for_pbs_are_one_line_and_create_nothing(fake_pbs, tmp_path, name):
    user = _User(tmp_path)
    fake_pbs(name, "queued")
    for option, message in ((("--qos", "high"), f"--qos means nothing to {name}: leave it out"),
                            (("--priority", "2000"), f"--priority 2000: {name} takes -1024 to 1023")):
        proc = user("submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", name, *option, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "mpimap-jobs").exists() and not (fake_pbs.state / "qsub.log").exists()


FUNCTIONS = '''
import json, os

def twice_and_tell(x):
    """2x; and what the job's environment says, once per rank."""
    path = os.path.join(os.environ["TELL_DIR"], f"env-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith(("MPIMAP_", "PBS_"))}, f)
    return 2 * x
'''


@pytest.mark.parametrize("name", ["pbs", "torque"])
def test_the_rendered_script_runs_the_job_under_a_pbs_environment(fake_pbs, tmp_path, name):
    """The script PBS would run: started by bash in $HOME with a bare PATH and PBS's variables; it completes the job
    with a real mpiexec (which finds its host in PBS_NODEFILE), appends to job.log, and exports mpimap's names for
    the batch id, the nodes and the deadline (Torque: from PBS_WALLTIME; PBS Pro: from the walltime asked)."""
    user = _User(tmp_path)
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    tell = tmp_path / "tell"
    tell.mkdir()
    fake_pbs(name, "queued")
    user("submit", "funcs.py:twice_and_tell", "--points", "points.npy", "--name", "scan", "--scheduler", name,
         "--ranks", "2", "--walltime", "30:00", "--env-setup", f"export TELL_DIR={tell}")
    job_dir = tmp_path / "mpimap-jobs" / "scan"
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "PBS_JOBID": JOB_ID[name],
           "PBS_JOBNAME": "scan", "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path),
           "PBS_O_HOME": str(home), "PBS_O_HOST": socket.gethostname(), "PBS_O_QUEUE": "workq", "PBS_QUEUE": "workq",
           "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_NODENUM": "0", "PBS_TASKNUM": "1", "PBS_VNODENUM": "0",
           "PBS_O_SHELL": "/bin/bash", "ENVIRONMENT": "BATCH", "MPIMAP_HOME": str(user.home)}
    if name == "torque":
        env.update(PBS_WALLTIME="600", PBS_NUM_NODES="1", PBS_NUM_PPN="2", PBS_NP="2", PBS_SERVER="torque01")
    else:
        env.update(PBS_NCPUS="2", NCPUS="2", OMP_NUM_THREADS="1", PBS_JOBDIR=str(home))
    env.update({k: v for k, v in job_env().items() if k.startswith(("OMPI_", "PRTE_"))})  # Open MPI, as root
    started = time.time()
    proc = subprocess.run(["bash", str(job_dir / "job.sh")], cwd=home, env=env, capture_output=True, text=True,
                          timeout=180)
    log = (job_dir / "job.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}\njob.log:\n{log}"
    assert proc.stdout == proc.stderr == ""  # everything went to job.log
    assert "8 of 8" in log

    assert user.json("status", "scan")["state"] == "done"
    r = read_results(str(job_dir / "results.h5"))
    assert np.array_equal(r["value"], 2 * np.arange(8.0)) and set(r["status"]) == {"done"}
    told = [json.loads(p.read_text()) for p in tell.iterdir()]
    assert told
    for seen in told:
        assert seen["MPIMAP_BATCH_ID"] == JOB_ID[name] and seen["MPIMAP_NODELIST"] == "localhost"
        limit = 600 if name == "torque" else 1800
        assert started + limit - 1 <= int(seen["MPIMAP_DEADLINE"]) <= time.time() + limit


class _User:
    """``mpimap`` commands from one directory, with their own ``$MPIMAP_HOME``, on the fake PBS's PATH."""

    def __init__(self, tmp_path):
        self.cwd, self.home = tmp_path, tmp_path / "mpimap-home"
        np.save(tmp_path / "points.npy", np.arange(8.0))

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=self.cwd, timeout=60,
                              env=job_env(MPIMAP_HOME=self.home), capture_output=True, text=True)
        if check and proc.returncode != 0:
            pytest.fail(f"mpimap {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)


def test_pbs_commands_are_not_taken_for_grid_engine(fake_pbs, tmp_path):
    """Both call their submit command qsub: with PBS's first on PATH, ``--scheduler sge`` submits nothing."""
    user = _User(tmp_path)
    for name, which in (("pbs", "pbs_version = 20.0.1"), ("torque", "Version: 6.1.3")):
        fake_pbs(name, "queued")
        proc = user("submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "sge", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert f"qsub is {which}, not sge: use --scheduler pbs or torque" in lines[0]
    assert not (tmp_path / "mpimap-jobs").exists() and not (fake_pbs.state / "qsub.log").exists()


BROKEN_JSON_QSTAT = r'''#!/bin/sh
# PBS Pro's qstat with a Variable_List value its JSON writer does not escape (openpbs#2541, #1255): invalid JSON.
case "$*" in
"-f -F json -x 77.pbs01 78.pbs01")
    printf '%s\n' '{"Jobs":{"77.pbs01":{"job_state":"R","exec_host":"n1/0*2","Resource_List":{"walltime":"01:00:00"},' \
        '"resources_used":{"walltime":"00:10:00"},"Variable_List":{"PBS_O_PATH":"C:\path"}},' \
        '"78.pbs01":{"job_state":"Q","comment":"Not Running: Insufficient amount of resource: ncpus"}}}' ;;
"-f -x 77.pbs01 78.pbs01")
    printf '%s\n' 'Job Id: 77.pbs01' '    job_state = R' '    exec_host = n1/0*2' \
        '    Resource_List.walltime = 01:00:00' '    resources_used.walltime = 00:10:00' \
        '    Variable_List = PBS_O_PATH=C:\path' '' 'Job Id: 78.pbs01' '    job_state = Q' \
        '    comment = Not Running: Insufficient amount of resource: ncpus' ;;
*) echo "qstat: unexpected arguments $*" >&2; exit 2 ;;
esac
'''


def test_a_job_pbs_writes_invalid_json_for_does_not_blind_the_view_of_every_job(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qstat").write_text(BROKEN_JSON_QSTAT)
    (bin_dir / "qstat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ids = ["77.pbs01", "78.pbs01"]
    views = scheduler("pbs").views([Submission(batch_id=i, scheduler="pbs", submitted=0.0) for i in ids])
    assert views == {"77.pbs01": BatchView("running", nodes="n1", time_left="00:50:00"),
                     "78.pbs01": BatchView("pending", reason="Not Running: Insufficient amount of resource: ncpus")}
