"""``python -m mpimap run`` end to end under real mpiexec: results, file layout, resume after kill -9, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import job_env, kill_job, launch, mpimap_cli, open_mpi
from mpimap.launch import find_mpiexec
from mpimap.store import read_results


@pytest.fixture
def points2d(tmp_path):
    pts = np.column_stack([np.arange(12000.0), np.linspace(-1, 1, 12000)])
    path = tmp_path / "points.npy"
    np.save(path, pts)
    return pts, str(path)


@pytest.mark.parametrize("ranks", [2, 3])
def test_run_equals_serial_and_records_every_point(tmp_path, points2d, ranks):
    pts, path = points2d
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(ranks, "run", "jobfuncs:poly", "--points", path, "--out", out, cwd=tmp_path)
    assert "job complete" in proc.stdout and "12000 of 12000" in proc.stdout
    r = read_results(out)
    from jobfuncs import poly

    assert np.array_equal(r["value"], np.array([poly(p) for p in pts]))
    assert set(r["status"]) == {"done"}
    assert set(r["rank"]) == set(range(1, ranks))
    assert set(r["host"]) == {os.uname().nodename}
    assert (r["seconds"] >= 0).all() and (r["run"] == 0).all()
    attrs = r["attrs"]
    assert attrs["format"] == "mpimap-results" and attrs["format_version"] == 1
    assert attrs["function"] == "jobfuncs:poly" and attrs["state"] == "complete" and len(attrs["points_checksum"]) == 64
    assert np.array_equal(r["points"], pts)


def test_failures_are_recorded_and_the_job_goes_on(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(1.0, 101.0))
    out = str(tmp_path / "r.h5")
    proc = mpimap_cli(3, "run", "jobfuncs:fail_on_multiples_of_7", "--points", "p.npy", "--out", out, cwd=tmp_path)
    assert "succeeded / failed   : 86 / 14" in proc.stdout
    r = read_results(out)
    failed = np.flatnonzero(r["status"] == "failed")
    assert list(failed + 1) == list(range(7, 101, 7))
    assert r["error"][6].startswith("ValueError: bad point 7") and "Traceback" in r["error"][6]
    good = r["status"] == "done"
    assert np.array_equal(r["value"][good], np.arange(1.0, 101.0)[good] + 0.5)
    shown = subprocess.run([sys.executable, "-m", "mpimap", "show", out], capture_output=True, text=True, env=job_env())
    assert "done 86, failed 14, pending 0" in shown.stdout and "ValueError: bad point" in shown.stdout


def test_json_values_and_csv_export(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(5.0))
    out = str(tmp_path / "r.h5")
    mpimap_cli(2, "run", "jobfuncs:returns_dict", "--points", "p.npy", "--out", out, cwd=tmp_path)
    r = read_results(out)
    assert list(r["value"]) == [{"x": float(i), "label": f"p{i}"} for i in range(5)]
    subprocess.run([sys.executable, "-m", "mpimap", "export", out, "--csv", str(tmp_path / "r.csv")], check=True,
                   env=job_env())
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("index,status,x0,value,seconds,rank,host,error") and len(lines) == 6


def test_csv_and_hdf5_points(tmp_path):
    (tmp_path / "p.csv").write_text("a\n" + "\n".join(str(i) for i in range(50)) + "\n")
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["grid"] = np.arange(50.0)
    for spec in ("p.csv", "in.h5:grid"):
        out = str(tmp_path / f"r-{spec[:2]}.h5")
        mpimap_cli(2, "run", "jobfuncs:square", "--points", spec, "--out", out, cwd=tmp_path)
        assert np.array_equal(read_results(out)["value"], np.arange(50.0) ** 2)


def _start_job(tmp_path, path, out, log, sleep):
    return launch(3, "-m", "mpimap", "run", "jobfuncs:record", "--points", path, "--out", out, "--flush-interval", "0.2",
                  cwd=tmp_path, env=job_env(MPIMAP_TEST_LOG=log, MPIMAP_TEST_SLEEP=sleep), start_new_session=True,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_loses_nothing_and_recomputes_nothing(tmp_path):
    n = 3000
    pts = np.column_stack([np.arange(n, dtype=float), np.linspace(0, 1, n)])
    path = str(tmp_path / "p.npy")
    np.save(path, pts)
    out = str(tmp_path / "r.h5")
    log1, log2 = str(tmp_path / "first.log"), str(tmp_path / "second.log")
    job = _start_job(tmp_path, path, out, log1, "0.002")
    # wait until some results are flushed, then kill -9 the whole job (mpiexec and every rank)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if os.path.exists(out):
            try:
                with h5py.File(out, "r", swmr=True) as f:  # readable while the job runs
                    done = int((f["status"][()] == 1).sum())
            except OSError:
                continue
            if done > 300:
                break
    kill_job(job)
    job.communicate()
    partial = read_results(out)  # readable after kill -9
    stored = np.flatnonzero(partial["status"] == "done")
    assert 300 <= len(stored) < n
    resumed = _start_job(tmp_path, path, out, log2, "0")
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"plus {len(stored)} from earlier runs" in stdout
    final = read_results(out)
    assert set(final["status"]) == {"done"}
    assert np.array_equal(final["value"], pts[:, 0] * 2 + pts[:, 1])  # equals an uninterrupted run
    assert np.array_equal(final["value"][stored], partial["value"][stored])  # nothing stored was rewritten
    assert (final["run"][stored] == 0).all() and (np.delete(final["run"], stored) == 1).all()
    second = [int(x) for x in open(log2).read().split()]
    # only the missing points were evaluated (a straggler copy may evaluate one of them twice; it is stored once)
    assert set(second) == set(range(n)) - set(stored.tolist())


def test_resume_of_a_different_job_is_refused_unless_fresh(tmp_path, points2d):
    _, path = points2d
    out = str(tmp_path / "r.h5")
    mpimap_cli(2, "run", "jobfuncs:poly", "--points", path, "--out", out, cwd=tmp_path)
    before = open(out, "rb").read()
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", path, "--out", out, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mpimap: error: {out} holds results of jobfuncs:poly, not jobfuncs:square; "
        "use another --out, or --fresh to start over"]
    np.save(tmp_path / "other.npy", np.ones((10, 2)))
    proc = mpimap_cli(2, "run", "jobfuncs:poly", "--points", "other.npy", "--out", out, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "different points" in proc.stderr
    assert open(out, "rb").read() == before  # the refused resumes did not touch the file
    mpimap_cli(2, "run", "jobfuncs:poly", "--points", "other.npy", "--out", out, "--fresh", cwd=tmp_path)
    assert len(read_results(out)["value"]) == 10


BAD_INPUTS = [
    (["nosuchmodule:f", "--points", "p.npy"], "cannot import module 'nosuchmodule'"),
    (["jobfuncs:nosuchfunction", "--points", "p.npy"], "module 'jobfuncs' has no function 'nosuchfunction'"),
    (["jobfuncs:NOT_CALLABLE", "--points", "p.npy"], "is a int, not a function"),
    (["jobfuncs", "--points", "p.npy"], "is not of the form MODULE:FUNCTION"),
    (["jobfuncs:square", "--points", "missing.npy"], "points file missing.npy does not exist"),
    (["jobfuncs:square", "--points", "empty.npy"], "holds no points"),
    (["jobfuncs:square", "--points", "cube.npy"], "have shape (2, 2, 2)"),
    (["jobfuncs:square", "--points", "corrupt.npy"], "cannot read points from corrupt.npy"),
    (["jobfuncs:square", "--points", "strings.npy"], "not numbers"),
    (["jobfuncs:square", "--points", "p.npy", "--out", "nodir/r.h5"], "directory"),
    (["jobfuncs:square", "--points", "p.npy", "--out", "."], "is a directory"),
    (["jobfuncs:returns_set", "--points", "p.npy"], "cannot be stored"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_gets_one_line_error_and_nonzero_exit(tmp_path, args, message):
    np.save(tmp_path / "p.npy", np.arange(10.0))
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    if "--out" not in args:
        args = args + ["--out", "r.h5"]
    proc = mpimap_cli(3, "run", *args, cwd=tmp_path, check=False, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpimap: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_bad_input_never_damages_an_existing_results_file(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(20.0))
    out = str(tmp_path / "r.h5")
    mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", out, cwd=tmp_path)
    before = read_results(out)
    (tmp_path / "corrupt.npy").write_bytes(b"junk")
    for args in (["nosuchmodule:f", "--points", "p.npy"], ["jobfuncs:square", "--points", "corrupt.npy"]):
        assert mpimap_cli(2, "run", *args, "--out", out, cwd=tmp_path, check=False).returncode != 0
    after = read_results(out)
    assert np.array_equal(before["value"], after["value"]) and after["attrs"]["state"] == "complete"


def test_second_writer_is_refused_while_a_job_runs(tmp_path):
    n = 400
    np.save(tmp_path / "p.npy", np.column_stack([np.arange(n, dtype=float), np.zeros(n)]))
    out = str(tmp_path / "r.h5")
    job = _start_job(tmp_path, str(tmp_path / "p.npy"), out, str(tmp_path / "log"), "0.02")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(out + ".lock") and time.monotonic() < deadline:
            time.sleep(0.1)
        proc = mpimap_cli(2, "run", "jobfuncs:record", "--points", "p.npy", "--out", out, cwd=tmp_path, check=False,
                          env=job_env(MPIMAP_TEST_LOG=str(tmp_path / "log2")))
        assert proc.returncode == 2 and "is being written by another running job" in proc.stderr
    finally:
        kill_job(job)
        job.communicate()


def test_demo_runs_on_a_fresh_setup(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpimap", "demo", "--points", "400"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.returncode == 0, proc.stderr
    assert "job complete" in proc.stdout
    import re

    tau, freq = map(float, re.search(r"best fit: tau = ([\d.]+), freq = ([\d.]+)", proc.stdout).groups())
    assert abs(tau - 2.5) < 0.3 and abs(freq - 0.8) < 0.05


def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path):
    n = 2000
    pts = np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    path = str(tmp_path / "p.npy")
    np.save(path, pts)
    out = str(tmp_path / "r.h5")
    job = _start_job(tmp_path, path, out, str(tmp_path / "a.log"), "0.005")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not os.path.exists(tmp_path / "a.log")
                                            or len(open(tmp_path / "a.log").read().split()) < 200):
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)  # to mpiexec, which forwards it to every rank, as scancel does
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    if not open_mpi():  # Open MPI's mpiexec ends without passing on the ranks' last output
        assert "SIGTERM: stopping; results so far are kept" in stderr
    r = read_results(out)
    assert r["attrs"]["state"] == "interrupted"
    kept = int((r["status"] == "done").sum())
    assert kept >= 150  # what was evaluated before the signal is kept (in-flight points may be lost)
    resumed = _start_job(tmp_path, path, out, str(tmp_path / "b.log"), "0")
    resumed.communicate(timeout=120)
    assert len(set(open(tmp_path / "b.log").read().split())) == n - kept  # only the missing points ran
    final = read_results(out)
    assert final["attrs"]["state"] == "complete" and set(final["status"]) == {"done"}
    assert np.array_equal(final["value"], pts[:, 0] * 2)


def test_progress_line(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(300.0))
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", "--progress", cwd=tmp_path)
    assert "[########################] 300/300 points, 0 failed," in proc.stderr and "ETA" in proc.stderr
    quiet = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "q.h5", cwd=tmp_path)
    assert quiet.stderr == ""  # not a terminal: no progress line unless asked


def test_an_integer_first_result_does_not_truncate_later_floats(tmp_path):
    # default chunking: the first chunks hold one point each, and point 0 (an int) comes back first
    (tmp_path / "model3.py").write_text("import time\ndef f(x):\n    x = float(x)\n"
                                        "    time.sleep(0 if x == 0 else 0.2)\n    return 0 if x == 0 else x / 3\n")
    np.save(tmp_path / "p.npy", np.arange(20.0))
    out = str(tmp_path / "r.h5")
    mpimap_cli(3, "run", "model3.py:f", "--points", "p.npy", "--out", out, "--no-progress", cwd=tmp_path)
    r = read_results(out)
    assert set(r["status"]) == {"done"} and r["value"].dtype == np.float64
    assert np.array_equal(r["value"], np.arange(20.0) / 3)


def test_retry_failed_clears_the_old_error_and_log_and_counts_attempts(tmp_path):
    (tmp_path / "model4.py").write_text(
        "import logging, os\n"
        "def f(x):\n"
        "    if x == 2 and not os.path.exists('fixed4'):\n"
        "        logging.getLogger('model4').warning('about to fail on %s', x)\n"
        "        raise RuntimeError('flaky backend')\n"
        "    return float(x) * 10\n")
    np.save(tmp_path / "p.npy", np.arange(3.0))
    out = str(tmp_path / "r.h5")
    args = ("run", "model4.py:f", "--points", "p.npy", "--out", out, "--keep-logs", "failed", "--no-progress")
    mpimap_cli(2, *args, cwd=tmp_path)
    first = read_results(out)
    assert first["error"][2].startswith("RuntimeError: flaky backend") and "about to fail" in first["log"][2]
    (tmp_path / "fixed4").touch()
    mpimap_cli(2, *args, "--retry-failed", cwd=tmp_path)
    r = read_results(out)
    assert list(r["status"]) == ["done"] * 3 and list(r["value"]) == [0.0, 10.0, 20.0]
    assert r["error"][2] == "" and r["log"][2] == "" and r["attempts"][2] == 2 and r["run"][2] == 1
    subprocess.run([sys.executable, "-m", "mpimap", "export", out, "--csv", "r.csv"], cwd=tmp_path, check=True,
                   env=job_env(), timeout=60)
    assert (tmp_path / "r.csv").read_text().splitlines()[3].endswith(",")  # no stale error in the CSV


def test_flush_interval_bounds_what_a_kill_loses_even_when_no_other_result_arrives(tmp_path):
    (tmp_path / "model9.py").write_text("import time\ndef f(x):\n    time.sleep(0.3 if x < 2 else 120)\n"
                                        "    return float(x)\n")
    np.save(tmp_path / "p.npy", np.arange(4.0))
    out = str(tmp_path / "r.h5")
    job = launch(3, "-m", "mpimap", "run", "model9.py:f", "--points", "p.npy", "--out", out, "--isolation", "rank",
                 "--flush-interval", "0.5", "--chunksize", "1", "--no-progress", cwd=tmp_path, start_new_session=True,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while done < 2 and time.monotonic() < deadline:  # points 0 and 1 come back; 2 and 3 take two minutes
            time.sleep(0.5)
            try:
                done = int((read_results(out)["status"] == "done").sum())
            except Exception:
                continue
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
    r = read_results(out)  # after kill -9: both results received were on disk
    assert list(r["status"]) == ["done", "done", "pending", "pending"] and list(r["value"][:2]) == [0.0, 1.0]


def _damaged_files(tmp_path):
    """Results files as a user may find them: truncated (after a clean end, or after a kill), empty, not HDF5..."""
    import multiprocessing

    import store_writer
    from mpimap.store import ResultStore

    complete = str(tmp_path / "complete.h5")
    store = ResultStore.open(complete, np.arange(3000.0), "jobfuncs:square")
    store.write(np.arange(3000), np.arange(3000.0), {}, np.zeros(3000), 1, "h")
    store.close("complete")
    killed = str(tmp_path / "killed.h5")
    ready = multiprocessing.get_context("fork").Event()
    writer = multiprocessing.get_context("fork").Process(target=store_writer.main, args=(killed, 1, 0, False, ready))
    writer.start()
    ready.wait(60)
    time.sleep(0.3)
    writer.kill()
    writer.join()
    files = {}
    for name, source in (("complete", complete), ("killed", killed)):
        data = open(source, "rb").read()
        for size in (48, 100, 2000, len(data) // 2, len(data) - 100):
            files[f"{name}-{size}"] = data[:size]
    files["empty"] = b""
    files["text"] = b"time,value\n1,2\n"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    files["other-hdf5"] = (tmp_path / "other.h5").read_bytes()
    with h5py.File(complete, "r+") as f:
        del f["status"]
    files["no-status"] = open(complete, "rb").read()
    for name, data in files.items():
        (tmp_path / f"{name}.h5").write_bytes(data)
    return sorted(files)


def test_every_command_gives_one_line_for_a_damaged_results_file_and_never_hangs(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(3000.0))
    for name in _damaged_files(tmp_path):
        before = (tmp_path / f"{name}.h5").read_bytes()
        commands = [["show", f"{name}.h5"], ["export", f"{name}.h5", "--csv", "out.csv"],
                    ["loglevel", f"{name}.h5", "DEBUG"]]
        for command in commands:
            proc = subprocess.run([sys.executable, "-m", "mpimap", *command], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=60, env=job_env())
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("mpimap: error:"), (name, proc)
            assert "Traceback" not in proc.stdout + proc.stderr
        if name in ("killed-100", "killed-2000", "empty", "text", "no-status"):
            proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", f"{name}.h5", cwd=tmp_path,
                              check=False, timeout=60)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (name, proc.stderr)
            assert "damaged" in proc.stderr and "--fresh" in proc.stderr, proc.stderr
        assert (tmp_path / f"{name}.h5").read_bytes() == before  # never changed by a refused command


def test_export_to_an_unwritable_path_is_one_line(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(5.0))
    mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", cwd=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mpimap", "export", "r.h5", "--csv", "nodir/r.csv"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=job_env())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "mpimap: error: cannot write nodir/r.csv: No such file or directory; choose another file"]


def _run_on_a_terminal(tmp_path, *command):
    """Run ``command`` in a new session whose controlling terminal is a pseudo-terminal; return all it wrote there."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader, the pty its controlling terminal and its stdin/stdout/stderr
        os.chdir(tmp_path)
        os.execve(command[0], list(command), job_env())
    out = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and b"results              :" not in out:
            if select.select([fd], [], [], 1)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the terminal closed: everything was read
                    break
                out += data
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    return out.decode(errors="replace")


def test_an_interactive_run_shows_progress_on_the_terminal_and_a_detached_one_does_not(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(300.0))
    run = [find_mpiexec(), "-n", "2", sys.executable, "-m", "mpimap", "run", "jobfuncs:square", "--points", "p.npy"]
    shown = _run_on_a_terminal(tmp_path, *run, "--out", "a.h5")  # as typed at a shell prompt
    assert "[########################] 300/300 points, 0 failed," in shown and "job complete" in shown
    # output to the same terminal, but mpiexec detached from it (no controlling terminal): no progress line
    detached = _run_on_a_terminal(tmp_path, shutil.which("setsid"), "-w", *run, "--out", "b.h5")
    assert "job complete" in detached and "points/s, ETA" not in detached.split("mpimap: job complete")[0]


def _cli(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=job_env(**env))


def _one_error_line(proc, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("mpimap: error:"), proc.stderr
    assert all(word in lines[0] for word in words), proc.stderr


def test_a_fifo_named_as_the_results_file_is_one_line_and_never_blocks(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(5.0))
    os.mkfifo(tmp_path / "r.h5")
    for command in (["show", "r.h5"], ["export", "r.h5", "--csv", "out.csv"]):
        _one_error_line(_cli(tmp_path, *command), "not a regular file")
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", cwd=tmp_path, check=False,
                      timeout=60)
    _one_error_line(proc, "not a regular file")


def test_flush_interval_inf_flushes_at_close_and_nan_is_refused(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(20.0))
    for interval in ("inf", "1e300"):
        proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", f"r{interval}.h5",
                          "--flush-interval", interval, "--no-progress", cwd=tmp_path, timeout=60)
        assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
        r = read_results(str(tmp_path / f"r{interval}.h5"))
        assert np.array_equal(r["value"], np.arange(20.0) ** 2) and set(r["status"]) == {"done"}
    proc = mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "rnan.h5", "--flush-interval", "nan",
                      cwd=tmp_path, check=False, timeout=60)
    _one_error_line(proc, "flush interval nan")
    assert not (tmp_path / "rnan.h5").exists()


def test_a_results_file_whose_text_heap_was_zeroed_gives_one_line_within_the_bound(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(300.0))
    mpimap_cli(2, "run", "jobfuncs:fail_on_multiples_of_7", "--points", "p.npy", "--out", "r.h5", "--no-progress",
               cwd=tmp_path, timeout=120)
    data = bytearray((tmp_path / "r.h5").read_bytes())
    heaps = [k for k in range(len(data)) if data[k:k + 4] == b"GCOL"]
    assert heaps
    for heap in heaps:  # the heaps of the error texts: HDF5 loops for ever on these zeroed bytes
        data[heap + 16:heap + 80] = bytes(64)
    (tmp_path / "r.h5").write_bytes(bytes(data))
    for command in (["show", "r.h5"], ["export", "r.h5", "--csv", "out.csv"]):
        start = time.monotonic()
        proc = _cli(tmp_path, *command, MPIMAP_READ_TIMEOUT=5)
        assert time.monotonic() - start < 50
        _one_error_line(proc, "took longer than 5 s", "damaged")
    proc = mpimap_cli(2, "run", "jobfuncs:fail_on_multiples_of_7", "--points", "p.npy", "--out", "r.h5",
                      "--retry-failed", cwd=tmp_path, check=False, timeout=100,
                      env=job_env(MPIMAP_READ_TIMEOUT=5))
    assert proc.returncode != 0 and "took longer than 5 s" in proc.stderr, proc.stderr


def test_a_resume_without_permission_to_write_says_so_and_does_not_advise_fresh(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(5.0))
    mpimap_cli(2, "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5", cwd=tmp_path, timeout=60)
    os.chmod(tmp_path / "r.h5", 0o444)
    before = (tmp_path / "r.h5").read_bytes()
    command = [sys.executable, "-m", "mpimap", "run", "jobfuncs:square", "--points", "p.npy", "--out", "r.h5",
               "--retry-failed"]
    if os.geteuid() == 0:  # root writes read-only files: drop that capability, as an ordinary user has none
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=job_env())
    _one_error_line(proc, "no permission to write", "chmod", "another --out")
    assert "--fresh" not in proc.stderr and (tmp_path / "r.h5").read_bytes() == before


@pytest.mark.parametrize("args", [["--chunksize", "abc"], ["--outputs", "1.5", "--native", "lib.so:f"], ["--nosuch"]])
def test_a_bad_option_value_is_one_line(tmp_path, args):
    """click's own usage errors (a value of the wrong type, an unknown option) are one line and exit 2 too."""
    proc = subprocess.run([sys.executable, "-m", "mpimap", "run", *args, "--points", "p.npy", "--out", "r.h5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("mpimap: error: ") and "(see mpimap run --help)" in proc.stderr
