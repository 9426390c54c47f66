"""The submit side of the job manager: submit (local for real, Slurm rendered), ls, cancel, pause, the registry.

Jobs run for real on this machine (the local scheduler: a detached session running mpiexec with 2-3
ranks); every command runs as ``python -m mpimap ...`` in a subprocess, as a user would type it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TESTS, job_env
from mpimap.jobs import files
from mpimap.jobs.job import Job
from mpimap.jobs.records import JobSpec, JobStatus
from mpimap.jobs.registry import Registry
from mpimap.store import read_results

FIXTURES = os.path.join(TESTS, "fixtures", "jobs-v1")
LOCAL_TEMPLATE = os.path.join(os.path.dirname(TESTS), "jobscripts", "local.sh")
RUN_JOB = "-m mpimap run --job {{job_dir}}"


@pytest.fixture
def where(tmp_path, monkeypatch):
    """A submit directory with points 0..19 and an mpimap home of its own; kills what its jobs left running."""
    home = tmp_path / "home"
    monkeypatch.setenv("MPIMAP_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "points.npy", np.arange(20.0))
    yield tmp_path
    from mpimap.jobs.local import _processes

    sessions = _processes()
    for batch in tmp_path.glob("**/batch.json"):
        for sub in json.loads(batch.read_text())["submissions"]:
            for pid in sessions.get(int(sub["batch_id"].rpartition(":")[2]), ()):
                os.kill(pid, signal.SIGKILL)


def mpimap(where, *args, timeout=120):
    """``python -m mpimap ARGS`` in the submit directory, as a user runs it; the CompletedProcess."""
    env = job_env(MPIMAP_HOME=str(where / "home"))
    return subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=where, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc, *words):
    """The command failed with exactly one line on stderr, naming each of ``words``."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def template(where, run_line: str) -> str:
    """The local template with its mpiexec line replaced (a site's template, or a job that only sleeps)."""
    text = open(LOCAL_TEMPLATE).read()
    start = text.index("exec {{mpiexec}}")
    path = where / "site.sh"
    path.write_text(text[:start] + run_line + "\n")
    return str(path)


def sleeper(where) -> str:
    return template(where, "exec sleep 300")


def job_dir(where, name):
    return where / "mpimap-jobs" / name


def wait_state(job: Job, states, seconds=60.0) -> str:
    deadline = time.monotonic() + seconds
    while (state := job.state()) not in states and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


def test_submit_local_runs_to_done_with_results_of_a_serial_run(where):
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "sq", "--ranks", "3",
                  "--wait", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job sq (local " in proc.stdout and "job sq done" in proc.stdout
    import jobfuncs

    results = read_results(str(job_dir(where, "sq") / "results.h5"))
    assert list(results["status"]) == ["done"] * 20
    np.testing.assert_array_equal(results["value"], [jobfuncs.square(x) for x in np.arange(20.0)])  # serial run
    listing = mpimap(where, "ls", "--json")
    [row] = json.loads(listing.stdout)
    assert (row["name"], row["state"], row["done"], row["failed"], row["total"]) == ("sq", "done", 20, 0, 20)


def slow_job(where, name, monkeypatch, n=150):
    """Submit jobfuncs:record over n 2-D points, 0.1 s each, on 3 ranks; wait until its master reports."""
    np.save(where / "rows.npy", np.column_stack([np.arange(n), np.ones(n)]).astype(float))
    monkeypatch.setenv("MPIMAP_TEST_SLEEP", "0.1")
    monkeypatch.setenv("MPIMAP_TEST_LOG", str(where / f"{name}.evaluated"))
    import mpimap.jobs

    job = mpimap.jobs.submit("jobfuncs:record", str(where / "rows.npy"), name=name, ranks=3)
    deadline = time.monotonic() + 120
    while (job.status() is None or job.status().done == 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.state() == "running", open(job.dir.log).read()
    return job


def test_cancel_of_a_running_job_stops_it_through_its_control_file(where, monkeypatch):
    job = slow_job(where, "stopme", monkeypatch)
    proc = mpimap(where, "cancel", "stopme", "--grace", "60", timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "job stopme: cancelled: its results so far stay readable"
    assert job.state() == "cancelled" and job.batch_view().state == "gone"
    results = read_results(job.dir.results)
    done = results["status"] == "done"
    assert 0 < done.sum() < 150
    np.testing.assert_array_equal(results["value"][done], np.arange(150.0)[done] * 2 + 1)


def test_pause_holds_back_new_points_and_resume_finishes_the_job(where, monkeypatch):
    job = slow_job(where, "hold", monkeypatch)
    assert mpimap(where, "pause", "hold").returncode == 0
    assert wait_state(job, ("paused",), 30) == "paused"
    time.sleep(3)  # in-flight points finish and are stored
    before = job.status().done
    time.sleep(3)
    assert job.status().done == before < 150
    assert mpimap(where, "resume", "hold").returncode == 0
    assert job.wait(poll=0.5) == "done"
    results = read_results(job.dir.results)
    assert list(results["status"]) == ["done"] * 150
    np.testing.assert_array_equal(results["value"], np.arange(150.0) * 2 + 1)
    evaluated = sorted(int(line) for line in open(where / "hold.evaluated"))
    assert evaluated == list(range(150))  # none lost, none evaluated twice


def test_a_site_template_runs_detached_and_its_results_equal_a_serial_run(where):
    site = template(where, "exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run jobfuncs:square "
                           "--points {{job_dir}}/points.npy --out {{job_dir}}/results.h5")
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "site", "--ranks", "2",
                  "--template", site)
    assert proc.returncode == 0, proc.stderr
    job = Job(str(job_dir(where, "site")))
    assert job.submissions()[0].batch_id.endswith(str(int(job.submissions()[0].batch_id.rpartition(":")[2])))
    wait_state(job, ("failed", "done"), 120)  # this template's run writes no status: gone without one is failed
    results = read_results(job.dir.results)
    np.testing.assert_array_equal(results["value"], np.arange(20.0) ** 2)
    assert "job complete" in open(job.dir.log).read()  # the job's output went to job.log


def test_job_directory_is_owner_only_and_holds_the_points_copy_spec_and_script(where):
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "own",
                  "--template", sleeper(where), "--point-timeout", "30", "--retries", "2")
    assert proc.returncode == 0, proc.stderr
    d = job_dir(where, "own")
    assert os.stat(d).st_mode & 0o777 == 0o700
    for name in ("job.json", "points.npy", "batch.json"):
        assert os.stat(d / name).st_mode & 0o077 == 0, name
    np.testing.assert_array_equal(np.load(d / "points.npy"), np.arange(20.0))
    spec = Job(str(d)).spec()
    assert spec.run_options == {"point_timeout": 30.0, "retries": 2}  # only what was given; run's defaults stay run's
    assert spec.python == sys.executable and spec.scheduler == "local"
    assert str(where) in spec.environment["PYTHONPATH"].split(os.pathsep)


def test_ls_shows_running_then_cancel_ends_the_local_job(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "sleepy",
                  "--template", sleeper(where)).returncode == 0
    job = Job(str(job_dir(where, "sleepy")))
    listing = mpimap(where, "ls")
    assert listing.returncode == 0, listing.stderr
    [header, line] = listing.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "STATE"] and line.split()[:3] == ["sleepy", "running", "0/0/20"]
    proc = mpimap(where, "cancel", "sleepy", "--grace", "0")
    assert proc.returncode == 0, proc.stderr
    assert job.state() == "cancelled" and job.batch_view().state == "gone"  # the session is gone, not only asked
    [row] = json.loads(mpimap(where, "ls", "--json").stdout)
    assert (row["state"], row["done"], row["total"]) == ("cancelled", 0, 20)
    one_line_error(mpimap(where, "cancel", "sleepy"), "cancelled already")


def test_a_running_job_killed_without_a_word_is_interrupted(where, monkeypatch):
    from mpimap.jobs.local import _processes

    job = slow_job(where, "dies", monkeypatch)
    for pid in _processes()[int(job.batch_id().rpartition(":")[2])]:  # kill -9 of every process of the job
        os.kill(pid, signal.SIGKILL)
    assert wait_state(job, ("interrupted",)) == "interrupted"
    assert job.status().state == "running"  # the master's last word; the batch system's view makes it interrupted
    proc = mpimap(where, "ls")
    assert proc.stdout.splitlines()[1].split()[:2] == ["dies", "interrupted"]


def test_pause_of_a_finished_job_is_one_line_and_touches_nothing(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "fin",
                  "--template", sleeper(where)).returncode == 0
    job = Job(str(job_dir(where, "fin")))
    files.write_json(job.dir.status, JobStatus.FORMAT, JobStatus.VERSION,
                     JobStatus(state="done", updated=time.time(), total=20, done=20).to_json())
    one_line_error(mpimap(where, "pause", "fin"), "fin", "done", "running job")
    assert not os.path.exists(job.dir.control)


def test_pause_and_resume_of_a_running_job_reach_its_control_file(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "steer", "-n", "3",
                  "--template", sleeper(where)).returncode == 0
    job = Job(str(job_dir(where, "steer")))
    files.write_json(job.dir.status, JobStatus.FORMAT, JobStatus.VERSION,
                     JobStatus(state="running", updated=time.time(), total=20).to_json())
    for args in (("pause", "steer"), ("resume", str(job.dir.path)), ("log", "steer", "--level", "debug",
                                                                      "--ranks", "1,2")):
        assert mpimap(where, *args).returncode == 0
    lines = [json.loads(line) for line in open(job.dir.control)]
    assert lines == [{"command": "pause"}, {"command": "resume"},
                     {"command": "loglevel", "level": "DEBUG", "ranks": [1, 2]}]


def test_log_prints_the_job_log_and_follows_it_to_the_end(where):
    site = template(where, "echo first line; sleep 2; echo second line")
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "talk",
                  "--template", site).returncode == 0
    proc = mpimap(where, "log", "talk", "-f", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["first line", "second line"]


def test_registry_deleted_ls_rebuilds_it_from_the_job_directories(where):
    for name in ("r1", "r2"):
        assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", name,
                      "--template", sleeper(where)).returncode == 0
    elsewhere = where / "other"
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "r3",
                  "--dir", str(elsewhere / "r3"), "--template", sleeper(where)).returncode == 0
    os.unlink(where / "home" / "registry.json")
    names = [row["name"] for row in json.loads(mpimap(where, "ls", "--json").stdout)]
    assert sorted(names) == ["r1", "r2"]  # ./mpimap-jobs is scanned by itself
    names = [row["name"] for row in json.loads(mpimap(where, "ls", "--json", "--scan", str(elsewhere)).stdout)]
    assert sorted(names) == ["r1", "r2", "r3"]
    assert Registry().find("r3") == str(elsewhere / "r3")


@pytest.mark.parametrize("text", ["{not json", json.dumps({"jobs": {}}), ""])
def test_a_corrupt_registry_is_one_line_saying_how_to_rebuild_and_is_left_untouched(where, text):
    (where / "home").mkdir()
    registry = where / "home" / "registry.json"
    registry.write_text(text)
    for args in (("ls",), ("cancel", "anything"), ("submit", "jobfuncs:square", "--points", "points.npy",
                                                   "--name", "x", "--template", sleeper(where))):
        line = one_line_error(mpimap(where, *args), "registry.json", "damaged", "mpimap ls --scan")
        assert "Traceback" not in line
    assert registry.read_text() == text
    assert not (where / "mpimap-jobs" / "x").exists()


def test_a_corrupt_or_newer_job_json_is_one_line_and_left_untouched(where):
    for name in ("bad", "new"):
        assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", name,
                      "--template", sleeper(where)).returncode == 0
    bad, new = job_dir(where, "bad") / "job.json", job_dir(where, "new") / "job.json"
    bad.write_text('{"format": "mpimap-job", "vers')
    body = json.loads(new.read_text())
    body["version"] = JobSpec.VERSION + 1
    new.write_text(json.dumps(body))
    before = bad.read_text(), new.read_text()
    one_line_error(mpimap(where, "cancel", str(bad.parent)), "job.json", "damaged")
    one_line_error(mpimap(where, "cancel", "new"), "job.json", "upgrade mpimap")
    proc = mpimap(where, "ls")
    assert proc.returncode != 0
    assert sorted(line.split()[2] for line in proc.stderr.strip().splitlines()) == [str(bad), str(new)]
    assert (bad.read_text(), new.read_text()) == before


def test_files_of_format_version_1_are_read_by_this_mpimap():
    job = Job(os.path.join(FIXTURES, "job"))
    spec = job.spec()
    assert (spec.name, spec.function, spec.scheduler, spec.resources.ranks, spec.resources.walltime) == \
           ("fit-20261125-2203", "jobfuncs:square", "slurm", 4, "01:00:00")
    assert spec.run_options == {"point_timeout": 60.0, "retries": 2}
    assert [(s.batch_id, s.scheduler, s.host) for s in job.submissions()] == [("4711", "slurm", "login1")]
    assert Registry(os.path.join(FIXTURES, "home")).jobs() == \
           {"fit-20261125-2203": "/home/alice/run/mpimap-jobs/fit-20261125-2203"}


def test_slurm_dry_run_renders_directives_and_creates_nothing(where):
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "slurm",
                  "--name", "dry", "--ranks", "3", "--walltime", "1:30:00", "--partition", "debug", "--account",
                  "proj", "--qos", "long", "--priority", "-10", "--mail", "me@example.org",
                  "--env-setup", "module load mpi", "--point-timeout", "5", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    d = job_dir(where, "dry")
    for directive in ("--job-name=dry", "--ntasks=3", "--time=1:30:00", "--partition=debug", "--account=proj",
                      "--qos=long", "--nice=10", "--mail-type=BEGIN,END,FAIL", "--mail-user=me@example.org",
                      f"--output={d}/job.log", f"--error={d}/job.log", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "\nmodule load mpi\n" in script
    last = script.strip().splitlines()[-1]
    assert last.startswith("exec ") and last.endswith(f"-n 3 {sys.executable} -m mpimap run --job {d}")
    assert not (where / "mpimap-jobs").exists() and not (where / "home" / "registry.json").exists()


def test_slurm_dry_run_with_nodes_and_tasks_per_node(where):
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "slurm",
                  "--nodes", "2", "--ntasks-per-node", "3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for directive in ("--ntasks=6", "--nodes=2", "--ntasks-per-node=3"):
        assert f"#SBATCH {directive}\n" in proc.stdout
    assert " -n 6 " in proc.stdout.strip().splitlines()[-1]
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "slurm",
                          "--ranks", "5", "--nodes", "2", "--ntasks-per-node", "3", "--dry-run"), "--ranks 5")


def test_slurm_without_sbatch_is_one_line_and_creates_nothing(where):
    env_path = os.path.dirname(sys.executable)  # mpiexec and python, no sbatch
    env = job_env(MPIMAP_HOME=str(where / "home"), PATH=env_path)
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "points.npy",
                           "--scheduler", "slurm"], cwd=where, env=env, capture_output=True, text=True, timeout=120)
    one_line_error(proc, "sbatch not found")
    assert not (where / "mpimap-jobs").exists()


@pytest.mark.parametrize("args, words", [
    (("--scheduler", "lsf"), ("unknown scheduler 'lsf'", "local", "pbs", "sge", "slurm", "torque")),
    (("--points", "missing.npy"), ("missing.npy", "does not exist")),
    (("--walltime", "soon"), ("walltime 'soon'",)),
    (("--name", "../x"), ("job name",)),
], ids=["scheduler", "points", "walltime", "name"])
def test_bad_submit_input_is_one_line_and_creates_nothing(where, args, words):
    command = ["submit", "jobfuncs:square", "--points", "points.npy", *args]
    one_line_error(mpimap(where, *command), *words)
    assert not (where / "mpimap-jobs").exists() and not (where / "home" / "registry.json").exists()


def test_bad_function_is_one_line_and_creates_nothing(where):
    one_line_error(mpimap(where, "submit", "jobfuncs:nothing_here", "--points", "points.npy"), "nothing_here")
    one_line_error(mpimap(where, "submit", "no_such_module:f", "--points", "points.npy"), "no_such_module")
    assert not (where / "mpimap-jobs").exists()


def test_unknown_placeholder_in_a_template_is_one_line_naming_it_and_the_known_ones(where):
    site = template(where, "exec {{mpiexec}} -n {{ranks}} {{pyton}} -m mpimap run --job {{job_dir}}")
    line = one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--template", site),
                          "{{pyton}}", "python", "job_dir", "env_setup")
    assert "site.sh" in line
    assert not (where / "mpimap-jobs").exists()


def test_a_taken_name_is_refused_in_one_line(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "twice",
                  "--template", sleeper(where)).returncode == 0
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "twice",
                          "--template", sleeper(where), "--dir", str(where / "elsewhere")), "twice", "exists already")
    assert not (where / "elsewhere").exists()


def test_default_names_come_from_the_function_and_the_time_and_stay_unique(where):
    names = []
    for _ in range(2):
        proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--template", sleeper(where))
        assert proc.returncode == 0, proc.stderr
        names.append(proc.stdout.split()[2])
    assert names[0].startswith("square-20") and names[1] != names[0]


def test_unknown_job_name_and_non_job_directory_are_one_line(where):
    one_line_error(mpimap(where, "cancel", "nobody"), "no job named 'nobody'", "mpimap ls")
    one_line_error(mpimap(where, "log", str(where)), "not a job directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_job_directory_of_another_user_is_refused_in_one_line(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "theirs",
                  "--template", sleeper(where)).returncode == 0
    d = job_dir(where, "theirs")
    os.chown(d, 12345, 12345)
    for command in ("cancel", "pause"):
        one_line_error(mpimap(where, command, str(d)), "another user")
    assert Job(str(d)).state() == "running"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_ls_all_users_adds_the_jobs_of_others_found_in_the_scanned_directories(where):
    for name in ("mine", "theirs"):
        assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", name,
                      "--template", sleeper(where)).returncode == 0
    Registry().remove("theirs")
    os.chown(job_dir(where, "theirs"), 12345, 12345)
    assert [r["name"] for r in json.loads(mpimap(where, "ls", "--json").stdout)] == ["mine"]
    rows = json.loads(mpimap(where, "ls", "--json", "--all-users").stdout)
    assert sorted((r["name"], r["user"]) for r in rows) == [("mine", "root"), ("theirs", "12345")]
    assert "USER" in mpimap(where, "ls", "--all-users").stdout.splitlines()[0]


def test_ps_without_a_job_lists_the_registered_jobs(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "quiet",
                  "--template", sleeper(where)).returncode == 0
    for args in (("ps",), ("ps", "--all-users")):
        proc = mpimap(where, *args)
        assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "no running jobs", "")  # none reports yet


def test_the_python_api_submits_and_its_job_reports_state(where):
    import mpimap.jobs

    job = mpimap.jobs.submit("jobfuncs:square", "points.npy", name="api", template=sleeper(where), retries=1)
    assert job.name == "api" and mpimap.jobs.Job.open("api").dir == job.dir
    assert job.state() == "running" and job.batch_view().state == "running"
    assert job.cancel(grace=0) == "stopped before its master started"
    with pytest.raises(Exception, match="unknown run option 'retires'"):
        mpimap.jobs.submit("jobfuncs:square", "points.npy", name="typo", retires=1)
    assert not job_dir(where, "typo").exists()


def test_a_normal_install_finds_the_job_script_templates(tmp_path):
    """``pip install .`` (not editable) puts jobscripts/ beside the code, where submit looks for it."""
    source = tmp_path / "src"
    root = os.path.dirname(TESTS)
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", "tests", "docs", "benchmarks", "build",
                                                                "*.egg-info", "__pycache__"))
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    code = "import mpimap.jobs.batch as b; print(b.__file__); print(b.jobscripts_dir())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0].startswith(str(target))
    assert out[1] == str(target / "mpimap" / "jobscripts")
    assert sorted(os.listdir(out[1])) == ["local.sh", "pbs.sh", "sge.sh", "slurm.sh"]


# Findings of the review of issue 11 (submit/steer side).

def test_a_reused_pid_of_a_dead_local_job_is_not_taken_for_the_job_and_never_signalled(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "k1",
                  "--template", sleeper(where)).returncode == 0
    job = Job.open(str(job_dir(where, "k1")))
    assert job.state() == "running"
    from mpimap.jobs.local import _processes

    for pid in _processes()[int(job.batch_id().rpartition(":")[2])]:  # kill -9 of the job's session
        os.kill(pid, signal.SIGKILL)
    assert wait_state(job, ("failed",), 30) == "failed"
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a new session leader, not the job's
    try:
        # As if the kernel gave the dead leader's PID to the stranger: the recorded id now names the stranger's session.
        body = json.loads((job_dir(where, "k1") / "batch.json").read_text())
        host = body["submissions"][-1]["batch_id"].rpartition(":")[0]
        body["submissions"][-1]["batch_id"] = f"{host}:{stranger.pid}"
        (job_dir(where, "k1") / "batch.json").write_text(json.dumps(body))
        assert job.state() == "failed"
        proc = mpimap(where, "cancel", "k1", "--grace", "1")
        one_line_error(proc, "k1", "failed already")
        assert stranger.poll() is None  # never signalled
        assert job.status() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=30)


def test_resubmit_runs_an_interrupted_job_again_and_state_follows_the_new_submission(where, monkeypatch):
    from mpimap.jobs.local import _processes

    job = slow_job(where, "again", monkeypatch, n=200)  # ~10 s: still running when resubmit is tried
    one_line_error(mpimap(where, "resubmit", "again"), "again", "running")
    for pid in _processes()[int(job.batch_id().rpartition(":")[2])]:
        os.kill(pid, signal.SIGKILL)
    assert wait_state(job, ("interrupted",)) == "interrupted"
    done_before = job.status().done
    monkeypatch.setenv("MPIMAP_TEST_SLEEP", "0.02")
    proc = mpimap(where, "resubmit", "again")
    assert proc.returncode == 0, proc.stderr
    assert "resubmitted job again" in proc.stdout
    assert len(job.submissions()) == 2
    # While the new run runs, the job is running (judged from the new submission, not the dead first one).
    assert wait_state(job, ("running", "paused", "done"), 60) in ("running", "paused", "done")
    assert wait_state(job, ("done",), 180) == "done", open(job.dir.log).read()
    results = read_results(job.dir.results)
    assert list(results["status"]) == ["done"] * 200
    np.testing.assert_array_equal(results["value"], np.arange(200.0) * 2 + 1)
    evaluated = open(where / "again.evaluated").read().split()
    assert len(evaluated) < 200 + done_before + 10  # it went on where it stopped: done points were not run again
    one_line_error(mpimap(where, "resubmit", "again"), "again", "done")  # nothing left to run


def test_resubmit_with_retry_failed_evaluates_the_failed_points_again(where):
    proc = mpimap(where, "submit", "jobfuncs:fail_on_multiples_of_7", "--points", "points.npy", "--name", "f7",
                  "--wait", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = Job.open(str(job_dir(where, "f7")))
    assert (job.state(), job.status().failed) == ("done", 3)
    one_line_error(mpimap(where, "resubmit", "f7"), "f7", "done", "--retry-failed")
    proc = mpimap(where, "resubmit", "f7", "--retry-failed")
    assert proc.returncode == 0, proc.stderr
    assert len(job.submissions()) == 2
    assert wait_state(job, ("done",), 180) == "done"
    assert job.current_status() is not None and job.status().batch_id == job.batch_id()
    spec = json.loads((job_dir(where, "f7") / "job.json").read_text())
    assert spec["run_options"].get("retry_failed") is True
    assert job.status().failed == 3  # the three were evaluated again (and failed again), not skipped
    results = read_results(job.dir.results)
    failed = np.arange(20) % 7 == 0
    assert list(results["attempts"][failed]) == [2, 2, 2]  # the failed ones were evaluated again in the second run
    assert set(results["run"][failed]) == {1} and set(results["run"][~failed]) == {0}  # the done ones were not


def test_a_fresh_resubmission_starts_over_once_and_a_restart_of_it_resumes(where, monkeypatch):
    np.save(where / "rows.npy", np.column_stack([np.arange(6), np.ones(6)]).astype(float))
    log = where / "fresh.evaluated"
    monkeypatch.setenv("MPIMAP_TEST_LOG", str(log))
    proc = mpimap(where, "submit", "jobfuncs:record", "--points", "rows.npy", "--name", "fr", "--wait", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = mpimap(where, "resubmit", "fr", "--fresh")
    assert proc.returncode == 0, proc.stderr
    job = Job.open(str(job_dir(where, "fr")))
    assert wait_state(job, ("done",), 180) == "done"
    assert len(log.read_text().split()) == 12  # every point twice: the resubmission started over
    assert "fresh" not in json.loads((job_dir(where, "fr") / "job.json").read_text())["run_options"]
    # A requeue or restart of that same batch job (its script run again) resumes: nothing is evaluated again.
    subprocess.run(["bash", str(job.dir.script)], cwd=where, capture_output=True, timeout=180)
    assert len(log.read_text().split()) == 12
    assert list(read_results(job.dir.results)["status"]) == ["done"] * 6


def test_cancel_whose_master_stopped_but_whose_processes_linger_says_so(where, monkeypatch):
    np.save(where / "rows.npy", np.column_stack([np.arange(4), np.ones(4)]).astype(float))
    monkeypatch.setenv("MPIMAP_TEST_SLEEP", "120")
    monkeypatch.setenv("MPIMAP_TEST_LOG", str(where / "linger.evaluated"))
    from mpimap.jobs import submit

    job = submit("jobfuncs:record", str(where / "rows.npy"), name="linger", ranks=3, isolation="rank")
    deadline = time.monotonic() + 120
    while not (where / "linger.evaluated").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    while job.status() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc = mpimap(where, "cancel", "linger", "--grace", "5", timeout=180)
    assert proc.returncode == 0, proc.stderr
    if job.batch_view().state == "gone" and "did not" not in proc.stdout:
        pytest.skip("the job ended within the grace on its own")
    assert "the master stopped (cancelled) but its processes did not end within 5 s" in proc.stdout, proc.stdout
    assert "did not answer" not in proc.stdout
    assert job.state() == "cancelled" and job.batch_view().state == "gone"
    assert job.status().message == "" or "did not stop" not in job.status().message


def test_cancel_of_a_master_that_does_not_answer_says_so(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "mute",
                  "--template", sleeper(where)).returncode == 0
    job = Job.open(str(job_dir(where, "mute")))
    files.write_json(job.dir.status, JobStatus.FORMAT, JobStatus.VERSION,
                     JobStatus(state="running", updated=time.time(), total=20).to_json())  # a master that never reads
    proc = mpimap(where, "cancel", "mute", "--grace", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "the master did not answer within 2 s" in proc.stdout, proc.stdout
    assert job.state() == "cancelled" and job.batch_view().state == "gone"


def test_points_that_are_a_fifo_are_one_line_and_never_hang(where):
    os.mkfifo(where / "fifo.npy")
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "fifo.npy", "--name", "b4", timeout=60),
                   "fifo.npy", "not a regular file")
    assert not (where / "mpimap-jobs").exists()
    proc = subprocess.run([sys.executable, "-m", "mpimap", "run", "jobfuncs:square", "--points", "fifo.npy",
                           "--out", "out.h5"], cwd=where, env=job_env(), capture_output=True, text=True, timeout=60)
    one_line_error(proc, "fifo.npy", "not a regular file")


@pytest.mark.parametrize("home", ["points.npy/h", "/proc/mh", "points.npy"], ids=["under-a-file", "proc", "a-file"])
def test_a_bad_mpimap_home_is_one_line_for_every_command(where, home):
    env = job_env(MPIMAP_HOME=home if home.startswith("/") else str(where / home))
    for args in (["ls"], ["status", "x"], ["submit", "jobfuncs:square", "--points", "points.npy", "--name", "h1"]):
        proc = subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=where, env=env, capture_output=True,
                              text=True, timeout=60)
        one_line_error(proc, "MPIMAP_HOME")
    assert not (where / "mpimap-jobs").exists()


@pytest.mark.parametrize("directory", ["points.npy/sub", "/proc/b13"], ids=["under-a-file", "proc"])
def test_a_bad_job_directory_is_one_line_and_creates_nothing(where, directory):
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "d1",
                          "--dir", directory), "--dir")
    assert not (where / "home" / "registry.json").exists() or "d1" not in (where / "home" / "registry.json").read_text()


def test_a_template_that_is_not_utf8_is_one_line(where):
    (where / "tpl3.sh").write_bytes(b"\xff\xfe{{name}}\n")
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--template", "tpl3.sh",
                          "--dry-run"), "tpl3.sh", "UTF-8")


def test_a_job_named_like_a_directory_in_the_cwd_is_found_by_its_name(where):
    (where / "adir").mkdir()
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "adir",
                  "--template", sleeper(where)).returncode == 0
    proc = mpimap(where, "cancel", "adir", "--grace", "1")
    assert proc.returncode == 0, proc.stderr
    assert Job.open(str(job_dir(where, "adir"))).state() == "cancelled"
    line = one_line_error(mpimap(where, "log", str(where / "adir") + "/"), "adir")
    assert "no job.json" in line


def test_ctrl_c_during_submit_wait_detaches_and_the_job_goes_on(where):
    proc = subprocess.Popen([sys.executable, "-m", "mpimap", "submit", "jobfuncs:square", "--points", "points.npy",
                             "--name", "cw", "--template", sleeper(where), "--wait"], cwd=where,
                            env=job_env(MPIMAP_HOME=str(where / "home")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("submitted job cw"), first
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "detached; the job goes on (mpimap attach cw)" in out
    assert "Aborted" not in err
    assert Job.open(str(job_dir(where, "cw"))).state() == "running"


def test_log_level_for_ranks_beyond_the_job_is_one_line(where):
    assert mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "lv", "-n", "3",
                  "--template", sleeper(where)).returncode == 0
    one_line_error(mpimap(where, "log", "lv", "--level", "DEBUG", "--ranks", "99"), "99", "1", "2")
    assert not (job_dir(where, "lv") / "control").exists()


def test_a_garbage_npy_and_a_too_long_name_say_what_is_wrong(where):
    (where / "garbage.npy").write_bytes(b"this is not numpy at all" * 10)
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "garbage.npy"), "not a valid .npy file")
    one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "x" * 101),
                   "100 characters")


def test_a_job_run_again_by_hand_is_judged_by_its_new_run_not_the_dead_submission(where, monkeypatch):
    from mpimap.jobs.local import _processes

    job = slow_job(where, "byhand", monkeypatch, n=60)
    for pid in _processes()[int(job.batch_id().rpartition(":")[2])]:
        os.kill(pid, signal.SIGKILL)
    assert wait_state(job, ("interrupted",)) == "interrupted"
    monkeypatch.setenv("MPIMAP_TEST_SLEEP", "0.5")
    first = job.status().started
    run = subprocess.Popen(["bash", job.dir.script], cwd=where, env=job_env(MPIMAP_HOME=str(where / "home")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (job.status().started == first or job.status().state != "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.state() == "running"  # not interrupted: the new run's status names its own batch id
        assert mpimap(where, "pause", "byhand").returncode == 0
        assert wait_state(job, ("paused",), 30) == "paused"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)


def test_a_registry_entry_that_is_not_a_path_is_one_line_for_status_and_ls(where):
    (where / "home").mkdir()
    (where / "home" / "registry.json").write_text(json.dumps({"format": "mpimap-registry", "version": 1,
                                                              "jobs": {"j2": 5}}))
    one_line_error(mpimap(where, "status", "j2"), "registry", "damaged")
    one_line_error(mpimap(where, "ls"), "registry", "damaged")


def test_one_damaged_status_file_does_not_hide_the_other_jobs(where):
    for name in ("good", "hurt"):
        proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", name, "--wait",
                      timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (job_dir(where, "hurt") / "status.json").write_text("garbage")
    proc = mpimap(where, "ls", "--json")
    one_line_error(proc, "hurt", "status.json", "damaged")
    assert [row["name"] for row in json.loads(proc.stdout)] == ["good"]
    proc = mpimap(where, "ps", "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [unreadable] = json.loads(proc.stdout)["unreadable"]
    assert "hurt" in unreadable and "damaged" in unreadable


def test_resubmit_waits_until_the_previous_run_has_ended(where):
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", "slowend",
                  "--notify-command", "sleep 60")
    assert proc.returncode == 0, proc.stderr
    job = Job.open(str(job_dir(where, "slowend")))
    assert wait_state(job, ("done",), 120) == "done"
    if job.batch_view().state == "running":  # the end notice holds the processes for up to 10 s
        one_line_error(mpimap(where, "resubmit", "slowend", "--fresh"), "slowend", "has not ended yet")
    deadline = time.monotonic() + 60
    while job.batch_view().state != "gone" and time.monotonic() < deadline:
        time.sleep(0.5)
    proc = mpimap(where, "resubmit", "slowend", "--fresh")
    assert proc.returncode == 0, proc.stderr
    assert wait_state(job, ("done",), 120) == "done"


@pytest.mark.parametrize("damage", ["missing field", "not an object"])
def test_a_damaged_submission_in_batch_json_is_one_line_and_ls_lists_the_others(where, damage):
    for name in ("good", "hurt"):
        proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--name", name, "--wait",
                      timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    batch = job_dir(where, "hurt") / "batch.json"
    original = batch.read_text()
    body = json.loads(original)
    if damage == "missing field":
        del body["submissions"][0]["submitted"]
    else:
        body["submissions"][0] = "x"
    batch.write_text(json.dumps(body))
    try:
        one_line_error(mpimap(where, "status", "hurt"), "batch.json", "damaged", "restore it")
        proc = mpimap(where, "ls", "--json")
        one_line_error(proc, "hurt", "batch.json", "damaged")
        assert [row["name"] for row in json.loads(proc.stdout)] == ["good"]
    finally:
        batch.write_text(original)  # the fixture's cleanup reads it


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs", "torque"])
def test_a_walltime_under_a_minute_is_refused_for_a_batch_scheduler(where, scheduler):
    for walltime in ("0:01", "0:10", "0:59"):
        one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", scheduler,
                              "--walltime", walltime, "--resubmit", "2", "--dry-run"),
                       f"--walltime {walltime}", "at least 1 minute", "shut down")
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", scheduler,
                  "--walltime", "1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "00:00:00" not in proc.stdout
    assert not (where / "mpimap-jobs").exists()


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs", "torque"])
@pytest.mark.parametrize("option, value", [("--partition", "q1\n#$ -l foo=1"), ("--account", "my acct"),
                                           ("--qos", "hi\tlo"), ("--mail", "a@b.c -l h_vmem=1G")])
def test_a_resource_value_with_whitespace_is_one_line_and_creates_nothing(where, scheduler, option, value):
    if option == "--qos" and scheduler in ("sge", "pbs", "torque"):
        pytest.skip("--qos means nothing there (refused on its own)")
    for dry in (("--dry-run",), ()):
        one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", scheduler,
                              option, value, *dry), option, "whitespace")
    assert not (where / "mpimap-jobs").exists() and not (where / "home" / "registry.json").exists()


@pytest.mark.parametrize("scheduler", ["slurm", "sge"])
def test_a_job_directory_with_a_space_is_refused_where_directives_cannot_carry_it(where, scheduler):
    spaced = where / "sp ace"
    spaced.mkdir()
    for dry in (("--dry-run",), ()):
        one_line_error(mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", scheduler,
                              "--dir", str(spaced / "job"), *dry), "sp ace", "whitespace", "without spaces")
    assert not (spaced / "job").exists() and not (where / "home" / "registry.json").exists()
    proc = mpimap(where, "submit", "jobfuncs:square", "--points", "points.npy", "--scheduler", "pbs",
                  "--dir", str(spaced / "job"), "--dry-run")
    assert proc.returncode == 0, proc.stderr  # PBS's log directive is /dev/null: the script appends to the quoted log
