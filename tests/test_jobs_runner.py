"""The master side of a submitted job: ``mpimap run --job DIR`` with its status file, control file and notifications.

Each test makes a job directory the way ``mpimap submit`` does (job.json through the records and
files API, the points copied to points.npy) and runs it under a real ``mpiexec``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env, kill_job, launch, mpimap_cli, without_launcher_report
from mpimap.control import Watcher, send
from mpimap.jobs import files
from mpimap.jobs.job import Job
from mpimap.jobs.records import JobSpec, Resources
from mpimap.jobs.status import HISTORY_LIMIT, StatusWriter, Tally
from mpimap.store import read_results


def make_job(tmp_path, function: str, points, name="t", **spec) -> files.JobDir:
    """A job directory as submit leaves it: job.json and points.npy."""
    path = tmp_path / name
    path.mkdir(mode=0o700)
    job = files.JobDir(str(path))
    np.save(job.points, points)
    spec.setdefault("run_options", {})
    record = JobSpec(name=name, function=function, points_source="points.npy", resources=Resources(ranks=3),
                     scheduler="local", **spec)
    files.write_json(job.spec, JobSpec.FORMAT, JobSpec.VERSION, record.to_json())
    return job


def start(job: files.JobDir, ranks=3, **env) -> subprocess.Popen:
    """``mpiexec -n ranks python -m mpimap run --job DIR`` in the background, in a session of its own."""
    return launch(ranks, "-m", "mpimap", "run", "--job", job.path, cwd=os.path.dirname(job.path), env=job_env(**env),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def jobs():
    """Background jobs a test started; whatever is left of them is killed at the end."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_job(proc)
            proc.communicate(timeout=30)


def wait_status(job: files.JobDir, ready, timeout=60.0, proc=None):
    """The first status.json for which ``ready(status)`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if os.path.exists(job.status):
            status = Job(job.path).status()
            if ready(status):
                return status
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"status never became ready; last: {status}")


def record_points(n):
    return np.column_stack([np.arange(n, dtype=float), np.zeros(n)])


def evaluations(log) -> list[int]:
    return sorted(int(line) for line in open(log).read().split())


def test_a_job_runs_from_its_directory_and_reports_done(tmp_path):
    points = np.arange(50.0)
    job = make_job(tmp_path, "jobfuncs:fail_on_multiples_of_7", points, run_options={"chunksize": 3})
    proc = mpimap_cli(3, "run", "--job", job.path, cwd=tmp_path, env=job_env(MPIMAP_BATCH_ID="here:123"))
    r = read_results(job.results)
    bad = points % 7 == 0
    assert np.array_equal(r["value"][~bad], points[~bad] + 0.5)  # the serial reference
    assert list(r["status"][bad]) == ["failed"] * bad.sum() and r["attrs"]["state"] == "complete"
    status = Job(job.path).status()
    assert (status.state, status.total, status.done, status.failed, status.pending) == ("done", 50, 42, 8, 0)
    assert status.failures == {"raised": 8}
    assert status.batch_id == "here:123" and status.host == socket.gethostname() and status.pid > 0
    assert status.ended >= status.started and status.eta_seconds is None
    assert status.history[-1][1:] == [42, 8]
    assert sorted(row.rank for row in status.ranks) == [1, 2] and all(row.pid > 0 for row in status.ranks)
    assert "job complete" in proc.stdout


def test_points_the_results_file_refuses_count_as_failed_in_the_status(tmp_path):
    job = make_job(tmp_path, "jobfuncs:float_then_list", np.arange(8.0), run_options={"chunksize": 1})
    mpimap_cli(2, "run", "--job", job.path, cwd=tmp_path, env=job_env())  # one worker: points arrive in order
    r = read_results(job.results)
    assert list(r["status"]) == ["done"] * 3 + ["failed"] * 5 and "StoreError" in r["error"][3]
    status = Job(job.path).status()
    assert (status.done, status.failed, status.pending) == (3, 5, 0)  # as the results file says
    assert status.failures == {"raised": 5}


def test_a_resumed_job_counts_the_points_of_earlier_runs(tmp_path):
    import h5py

    from mpimap.store import ResultStore

    job = make_job(tmp_path, "jobfuncs:square", np.arange(30.0))
    store = ResultStore.open(job.results, np.arange(30.0), "jobfuncs:square")  # an earlier run stored 10 points
    store.write(np.arange(10), np.arange(10.0) ** 2, {}, np.zeros(10), 1, "elsewhere")
    store.close("interrupted")
    mpimap_cli(2, "run", "--job", job.path, cwd=tmp_path)
    status = Job(job.path).status()
    assert (status.state, status.total, status.done, status.pending) == ("done", 30, 30, 0)
    with h5py.File(job.results, "r") as f:
        assert f.attrs["runs"] == 2


def test_pause_stops_handing_out_points_and_resume_finishes_with_nothing_lost(tmp_path, jobs):
    n = 150
    log = tmp_path / "evaluated.txt"
    job = make_job(tmp_path, "jobfuncs:record", record_points(n),
                   run_options={"chunksize": 1, "rank_timeout": 5.0})
    proc = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    running = wait_status(job, lambda s: s.state == "running" and s.done >= 10, proc=proc)
    assert running.done < n, "the job ended before it could be paused: make its points slower"
    busy = [row for row in running.ranks if row.state == "busy"]
    assert busy and all(0 <= i < n for row in busy for i in row.evaluating)
    send(job.control, {"command": "pause"})
    sent = time.monotonic()
    paused = wait_status(job, lambda s: s.state == "paused", timeout=30, proc=proc)
    print(f"paused shown {time.monotonic() - sent:.2f} s after the command")
    # In-flight points land, then nothing more: the workers idle (and are not declared lost, rank_timeout 5 s).
    idle = wait_status(job, lambda s: all(row.state == "idle" and not row.evaluating for row in s.ranks), timeout=30)
    time.sleep(7)
    still = Job(job.path).status()
    assert still.state == "paused" and still.done == idle.done < n
    assert still.updated > idle.updated  # still reporting while paused
    assert len(evaluations(log)) == idle.done  # nothing evaluated meanwhile
    assert paused.done <= idle.done
    send(job.control, {"command": "resume"})
    wait_status(job, lambda s: s.state in ("running", "done"), timeout=30, proc=proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "declared lost" not in err
    r = read_results(job.results)
    assert set(r["status"]) == {"done"} and np.array_equal(r["value"], np.arange(n) * 2.0)
    assert sorted(set(evaluations(log))) == list(range(n))  # every point evaluated (a straggler may run twice)
    final = Job(job.path).status()
    assert (final.state, final.done, final.failed, final.pending) == ("done", n, 0, 0)


def test_cancel_while_running_stops_with_status_5_and_keeps_the_results(tmp_path, jobs):
    n = 400
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    wait_status(job, lambda s: s.done >= 10, proc=proc)
    with open(job.control, "a") as f:
        f.write('not json\n{"command": "explode"}\n')  # ignored, with a line in the job's log each
    send(job.control, {"command": "cancel"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "cancelled through the control file" in without_launcher_report(err)
    assert "ignored control command b'not json'" in err and "unknown command 'explode'" in err
    r = read_results(job.results)
    assert r["attrs"]["state"] == "cancelled"
    done = r["status"] == "done"
    assert 10 <= done.sum() < n and set(r["status"][~done]) == {"pending"}
    assert np.array_equal(r["value"][done], np.flatnonzero(done) * 2.0)
    status = Job(job.path).status()
    assert status.state == "cancelled" and status.done == done.sum() and status.ended is not None


def test_cancel_while_paused(tmp_path, jobs):
    n = 400
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    wait_status(job, lambda s: s.done >= 5, proc=proc)
    send(job.control, {"command": "pause"})
    paused = wait_status(job, lambda s: s.state == "paused" and all(r.state == "idle" for r in s.ranks),
                         timeout=30, proc=proc)
    send(job.control, {"command": "cancel"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    r = read_results(job.results)
    assert r["attrs"]["state"] == "cancelled" and (r["status"] == "done").sum() == paused.done
    assert Job(job.path).status().state == "cancelled"


def test_sigterm_stops_a_paused_job_cleanly(tmp_path, jobs):
    n = 400
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    wait_status(job, lambda s: s.done >= 5, proc=proc)
    send(job.control, {"command": "pause"})
    paused = wait_status(job, lambda s: s.state == "paused" and all(r.state == "idle" for r in s.ranks),
                         timeout=30, proc=proc)
    os.kill(paused.pid, signal.SIGTERM)  # the master, as the batch system's walltime would
    out, err = proc.communicate(timeout=120)
    r = read_results(job.results)
    assert r["attrs"]["state"] == "interrupted" and (r["status"] == "done").sum() == paused.done
    status = Job(job.path).status()
    assert status.state == "interrupted" and "SIGTERM" in status.message


def test_notify_command_hears_the_start_and_the_end(tmp_path):
    heard = tmp_path / "heard.txt"
    job = make_job(tmp_path, "jobfuncs:square", np.arange(20.0), name="notified",
                   notify_command=f"env | grep ^MPIMAP_ | sort >> {heard}; echo --- >> {heard}")
    mpimap_cli(3, "run", "--job", job.path, cwd=tmp_path)
    start_env, end_env = [dict(line.split("=", 1) for line in block.split("\n") if line)
                          for block in heard.read_text().split("---\n") if block.strip()]
    assert start_env["MPIMAP_EVENT"] == "start" and start_env["MPIMAP_JOB_STATE"] == "running"
    assert end_env["MPIMAP_EVENT"] == "end" and end_env["MPIMAP_JOB_STATE"] == "done"
    for env in (start_env, end_env):
        assert env["MPIMAP_JOB_NAME"] == "notified" and env["MPIMAP_JOB_DIR"] == job.path
        assert env["MPIMAP_POINTS_TOTAL"] == "20" and env["MPIMAP_POINTS_FAILED"] == "0"
    assert start_env["MPIMAP_POINTS_DONE"] == "0" and end_env["MPIMAP_POINTS_DONE"] == "20"


def test_a_failing_notify_command_is_logged_and_the_job_goes_on(tmp_path):
    job = make_job(tmp_path, "jobfuncs:square", np.arange(10.0), notify_command="echo hook broke >&2; exit 7")
    proc = mpimap_cli(2, "run", "--job", job.path, cwd=tmp_path)
    assert "exited 7: hook broke" in proc.stderr
    assert Job(job.path).status().state == "done"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notify_email_goes_through_the_smtp_server_of_the_config(tmp_path):
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.mails = []

        async def handle_DATA(self, server, session, envelope):
            self.mails.append(envelope)
            return "250 OK"

    inbox = Inbox()
    port = free_port()
    server = Controller(inbox, hostname="127.0.0.1", port=port)
    server.start()
    try:
        home = tmp_path / "home"
        home.mkdir()
        (home / "config.toml").write_text(f'smtp_host = "127.0.0.1"\nsmtp_port = {port}\nfrom = "jobs@example.org"\n')
        job = make_job(tmp_path, "jobfuncs:square", np.arange(10.0), name="mailed", notify_email="me@example.org")
        mpimap_cli(2, "run", "--job", job.path, cwd=tmp_path, env=job_env(MPIMAP_HOME=home))
    finally:
        server.stop()
    assert [m.rcpt_tos for m in inbox.mails] == [["me@example.org"], ["me@example.org"]]
    assert all(m.mail_from == "jobs@example.org" for m in inbox.mails)
    subjects = [next(line for line in m.content.decode().splitlines() if line.startswith("Subject:"))
                for m in inbox.mails]
    assert subjects == ["Subject: mpimap job mailed: running", "Subject: mpimap job mailed: done"]
    assert "points done 10, failed 0, of 10" in inbox.mails[1].content.decode()


def test_notify_email_without_a_config_warns_and_the_job_goes_on(tmp_path):
    job = make_job(tmp_path, "jobfuncs:square", np.arange(10.0), notify_email="me@example.org")
    proc = mpimap_cli(2, "run", "--job", job.path, cwd=tmp_path, env=job_env(MPIMAP_HOME=tmp_path / "nohome"))
    assert "config.toml does not exist" in proc.stderr
    assert Job(job.path).status().state == "done"


def one_line(*args, cwd):
    """Run ``python -m mpimap ARGS`` in one process; return its exit status and stderr."""
    proc = subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=cwd, env=job_env(), capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("extra, says", [
    (["jobfuncs:square"], "leave out FUNCTION"),
    (["--points", "p.npy", "--out", "r.h5"], "leave out --points, --out"),
    (["--retries", "2"], "leave out --retries"),
])
def test_run_job_with_what_the_job_file_says_is_one_line(tmp_path, extra, says):
    job = make_job(tmp_path, "jobfuncs:square", np.arange(5.0))
    status, err = one_line("run", "--job", job.path, *extra, cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and says in err, err
    assert not os.path.exists(job.results)


@pytest.mark.parametrize("options, says", [
    ({"retries": "many"}, "run option retries must be an integer >= 0"),
    ({"isolation": "vm"}, "run option isolation must be one of rank, process, fresh"),
    ({"chunk_size": 4}, "unknown run option(s) chunk_size"),
    ({"point_timeout": -1}, "run option point_timeout must be a number > 0"),
])
def test_a_bad_job_spec_is_one_line(tmp_path, options, says):
    job = make_job(tmp_path, "jobfuncs:square", np.arange(5.0), run_options=options)
    status, err = one_line("run", "--job", job.path, cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and says in err and "job.json" in err, err
    assert not os.path.exists(job.results)


def test_run_job_of_a_missing_or_damaged_directory_is_one_line(tmp_path):
    status, err = one_line("run", "--job", str(tmp_path / "nothing"), cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and "job.json does not exist" in err, err
    job = make_job(tmp_path, "jobfuncs:square", np.arange(5.0))
    with open(job.spec, "w") as f:
        f.write("{half")
    status, err = one_line("run", "--job", job.path, cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and "is damaged" in err, err
    status, err = one_line("run", "--points", "p.npy", cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and "missing FUNCTION, --out" in err, err


def test_status_history_is_thinned_to_a_bounded_size(tmp_path):
    tally = Tally(total=1000)
    writer = StatusWriter(str(tmp_path / "status.json"), tally)
    for _ in range(3 * HISTORY_LIMIT):
        tally.add(1, [])
        writer.write()
    samples = Job(str(tmp_path)).status().history  # read back as the commands read it
    assert HISTORY_LIMIT // 2 <= len(samples) <= HISTORY_LIMIT
    assert samples[0][1] == 1 and samples[-1][1] == 3 * HISTORY_LIMIT  # the first and the newest kept
    assert [s[1] for s in samples] == sorted(s[1] for s in samples)


def test_a_job_that_cannot_start_reports_failed_with_the_reason(tmp_path):
    job = make_job(tmp_path, "jobfuncs:no_such_function", np.arange(5.0))
    status, err = one_line("run", "--job", job.path, cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and "no_such_function" in err, err
    final = Job(job.path).status()
    assert final.state == "failed" and "no_such_function" in final.message and final.ended is not None


def test_a_second_start_of_a_running_job_leaves_its_status_alone(tmp_path, jobs):
    job = make_job(tmp_path, "jobfuncs:record", record_points(300), run_options={"chunksize": 1})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    wait_status(job, lambda s: s.done >= 2, proc=proc)
    status, err = one_line("run", "--job", job.path, cwd=tmp_path)
    assert status == 2 and "being written by another running job" in err, err
    assert Job(job.path).status().state == "running"
    send(job.control, {"command": "cancel"})
    proc.communicate(timeout=120)


def test_pool_pause_holds_back_work_until_resume(run_script):
    out = run_script("""
import time
from mpimap import Pool

if __name__ == "__main__":
    with Pool(rank_timeout=3) as pool:
        pool.pause()
        futures = [pool.submit(abs, -i) for i in range(20)]
        time.sleep(4)  # longer than rank_timeout: idle ranks are not silent ones
        print("while paused:", pool.paused, sum(f.done() for f in futures), [r["lost"] for r in pool.status()])
        pool.resume()
        print("resumed:", pool.paused, [f.result(timeout=60) for f in futures] == list(range(20)))
""")
    assert "while paused: True 0 [False, False]" in out and "resumed: False True" in out


def job_processes(proc: subprocess.Popen, job: files.JobDir) -> list[int]:
    """Processes left of a job: its session (mpiexec, the ranks) and whatever runs with the job's environment."""
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) == proc.pid:
                left.append(int(entry))
            elif f"MPIMAP_JOB_DIR={job.path}\0".encode() in open(f"/proc/{entry}/environ", "rb").read():
                left.append(int(entry))
        except (OSError, ProcessLookupError):
            pass
    return left


def gone_within(proc, job, seconds: float) -> list[int]:
    """Wait up to ``seconds`` for every process of the job to end; return those left."""
    deadline = time.monotonic() + seconds
    while (proc.poll() is None or job_processes(proc, job)) and time.monotonic() < deadline:  # poll reaps mpiexec
        time.sleep(0.5)
    proc.poll()
    return job_processes(proc, job)


def test_commands_sent_before_the_master_starts_or_between_runs_are_obeyed_once(tmp_path, jobs):
    n = 40
    log = tmp_path / "evaluated.txt"
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    send(job.control, {"command": "pause"})  # the job has not started yet (a slow env setup, a slow mpiexec)
    first = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(first)
    wait_status(job, lambda s: s.state == "paused", timeout=60, proc=first)
    time.sleep(3)
    assert not log.exists() and Job(job.path).status().state == "paused"  # nothing handed out
    os.kill(Job(job.path).status().pid, signal.SIGTERM)  # interrupted while paused (walltime, say)
    first.communicate(timeout=120)
    assert Job(job.path).status().state == "interrupted"
    # The next run starts paused (the job was paused when it stopped) and obeys a cancel sent before it starts.
    send(job.control, {"command": "cancel"})
    second = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(second)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 5, err
    assert not log.exists() and Job(job.path).status().state == "cancelled"
    # Commands the earlier runs read are not obeyed again: a cancel ends one run, and the job runs unpaused after it.
    third = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(third)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert Job(job.path).status().state == "done" and set(read_results(job.results)["status"]) == {"done"}


def test_a_paused_job_that_is_interrupted_starts_paused_again(tmp_path, jobs):
    n = 300
    log = tmp_path / "evaluated.txt"
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    first = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(first)
    wait_status(job, lambda s: s.done >= 5, proc=first)
    send(job.control, {"command": "pause"})
    paused = wait_status(job, lambda s: s.state == "paused" and all(r.state == "idle" for r in s.ranks),
                         timeout=30, proc=first)
    os.kill(paused.pid, signal.SIGTERM)
    first.communicate(timeout=120)
    evaluated = len(evaluations(log))
    second = start(job, MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP="0.05")
    jobs.append(second)
    wait_status(job, lambda s: s.state == "paused" and s.pid != paused.pid, timeout=60, proc=second)
    time.sleep(3)
    assert len(evaluations(log)) == evaluated  # nothing handed out until resumed
    send(job.control, {"command": "resume"})
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert Job(job.path).status().state == "done" and set(read_results(job.results)["status"]) == {"done"}


@pytest.mark.parametrize("how", ["remove", "truncate"])
def test_commands_still_reach_the_master_after_the_control_file_is_removed_or_truncated(tmp_path, jobs, how):
    n = 400
    job = make_job(tmp_path, "jobfuncs:record", record_points(n), run_options={"chunksize": 1})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="0.05")
    jobs.append(proc)
    wait_status(job, lambda s: s.done >= 5, proc=proc)
    send(job.control, {"command": "pause"})
    wait_status(job, lambda s: s.state == "paused", timeout=30, proc=proc)
    send(job.control, {"command": "resume"})
    wait_status(job, lambda s: s.state == "running", timeout=30, proc=proc)
    if how == "remove":
        os.remove(job.control)
    else:
        open(job.control, "w").close()
    time.sleep(2)  # the master looks at the shorter file
    send(job.control, {"command": "pause"})
    wait_status(job, lambda s: s.state == "paused", timeout=30, proc=proc)
    send(job.control, {"command": "cancel"})
    proc.communicate(timeout=120)
    assert Job(job.path).status().state == "cancelled"


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_cancel_ends_the_whole_job_promptly_while_points_are_stuck(tmp_path, jobs, isolation):
    n = 6
    job = make_job(tmp_path, "jobfuncs:record", record_points(n),
                   run_options={"chunksize": 1, "isolation": isolation})
    proc = start(job, MPIMAP_TEST_LOG=tmp_path / "log.txt", MPIMAP_TEST_SLEEP="900")
    jobs.append(proc)
    wait_status(job, lambda s: sum(r.state == "busy" for r in s.ranks) == 2, timeout=60, proc=proc)
    send(job.control, {"command": "cancel"})
    left = gone_within(proc, job, 60)
    assert not left, f"processes of the cancelled job still run: {left}"
    proc.communicate(timeout=30)
    assert proc.returncode == 5, proc.returncode
    r = read_results(job.results)
    assert r["attrs"]["state"] == "cancelled" and set(r["status"]) == {"pending"}
    assert Job(job.path).status().state == "cancelled"


def test_a_hanging_notify_command_neither_holds_up_the_job_nor_outlives_it(tmp_path, jobs):
    job = make_job(tmp_path, "jobfuncs:square", np.arange(10.0), notify_command="sleep 300")
    proc = start(job)
    jobs.append(proc)
    out, err = proc.communicate(timeout=90)
    ended = time.time()
    assert proc.returncode == 0, err
    status = Job(job.path).status()
    assert status.state == "done" and ended - status.ended < 30, ended - status.ended
    assert "did not finish within" in err
    assert not gone_within(proc, job, 5), "a notify command outlived its job"


def test_on_error_stop_of_a_job_names_the_command_that_runs_it_again(tmp_path):
    job = make_job(tmp_path, "jobfuncs:fail_on_multiples_of_7", np.arange(1.0, 30.0), name="stopper",
                   run_options={"on_error": "stop", "chunksize": 1})
    status, err = one_line("run", "--job", job.path, cwd=tmp_path)
    assert status == 2 and "mpimap resubmit stopper --retry-failed" in err, err
    np.save(tmp_path / "p.npy", np.arange(1.0, 30.0))
    status, err = one_line("run", "jobfuncs:fail_on_multiples_of_7", "--points", "p.npy", "--out", "r.h5",
                           "--on-error", "stop", cwd=tmp_path)
    assert status == 2 and "run the same command again with --retry-failed" in err, err


def test_a_command_sent_after_a_line_cut_short_is_obeyed(tmp_path):
    path = str(tmp_path / "control")
    with open(path, "w") as f:
        f.write('{"command": "res')  # a sender killed in the middle of its line
    seen = []
    watcher = Watcher(path, seen.append, offset=0)
    send(path, {"command": "pause"})
    watcher.poll()
    assert seen == [{"command": "pause"}]
