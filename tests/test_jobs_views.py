"""The read side of jobs: status, attach, ps, results, thumbnail and mpimap.load, on real job directories.

Each job directory is built with real files: a results file from a real
``mpiexec ... mpimap run``, the job's spec and status written with the
job files' own writers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env, kill_job, launch, mpimap_cli
from mpimap.jobs.files import JobDir, write_json
from mpimap.jobs.job import Job
from mpimap.jobs.records import JobSpec, JobStatus, RankRow, Resources, Submission
from mpimap.store import read_results

HOST = socket.gethostname()


def cli(*args, timeout=120, env=None, **kwargs):
    """``python -m mpimap ARGS`` (no MPI: the read commands never need it)."""
    return subprocess.run([sys.executable, "-m", "mpimap", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or job_env(), **kwargs)


def make_job(root, name: str, points: np.ndarray, function: str = "jobfuncs:fail_on_multiples_of_7",
             run: bool = True) -> Job:
    """A job directory as submit leaves it (spec, points copy), with a results file of a real run if ``run``."""
    path = root / name
    path.mkdir(mode=0o700)
    files = JobDir(str(path))
    np.save(files.points, points)
    spec = JobSpec(name=name, function=function, points_source="points.npy", run_options={},
                   resources=Resources(ranks=2), scheduler="local", workdir=str(root), user=os.environ.get("USER", ""),
                   created=time.time())
    write_json(files.spec, JobSpec.FORMAT, JobSpec.VERSION, spec.to_json())
    if run:
        mpimap_cli(2, "run", function, "--points", files.points, "--out", files.results, cwd=root)
    return Job(str(path))


def write_status(job: Job, **fields) -> JobStatus:
    status = JobStatus(**{"updated": time.time(), **fields})
    write_json(job.dir.status, JobStatus.FORMAT, JobStatus.VERSION, status.to_json())
    return status


def counts(job: Job) -> dict:
    status = read_results(job.dir.results)["status"]
    return {name: int(np.sum(status == name)) for name in ("done", "failed", "pending")}


@pytest.fixture
def live_session():
    """A live process in a session of its own, standing for a running job's batch allocation (local: HOST:PID)."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def register_batch(job: Job, proc) -> None:
    submission = Submission(batch_id=f"{HOST}:{proc.pid}", scheduler="local", submitted=time.time(), host=HOST)
    write_json(job.dir.batch, Submission.FORMAT, Submission.VERSION, {"submissions": [submission.to_json()]})


def finished_status(job: Job) -> JobStatus:
    """The final status a master writes for a finished job, with counts from its results file."""
    c = counts(job)
    now = time.time()
    return write_status(job, state="done", total=sum(c.values()), done=c["done"], failed=c["failed"],
                        pending=c["pending"], started=now - 60, ended=now, host=HOST, pid=1, rate=1.5,
                        failures={"raised": c["failed"]}, history=[[now - 60, 0, 0], [now - 30, 20, 2],
                                                                   [now, c["done"], c["failed"]]])


# ---------------------------------------------------------------------------------------------- results and load


def test_results_csv_equals_export_and_a_serial_reference(tmp_path):
    import jobfuncs

    pts = np.arange(30.0)
    job = make_job(tmp_path, "r1", pts)
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "r.csv"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 30 rows to {tmp_path / 'r.csv'}"
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [int(r["index"]) for r in rows] == list(range(30))
    for x, row in zip(pts, rows):
        if int(x) % 7 == 0:
            assert row["status"] == "failed" and row["y0"] == "" and row["error"] == f"ValueError: bad point {int(x)}"
        else:
            assert row["status"] == "done" and float(row["y0"]) == jobfuncs.fail_on_multiples_of_7(x)
    exported = cli("export", job.dir.results, "--csv", str(tmp_path / "e.csv"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "e.csv").read_text() == (tmp_path / "r.csv").read_text()


def test_results_npy_and_h5(tmp_path):
    import h5py

    pts = np.arange(20.0)
    job = make_job(tmp_path, "r2", pts)
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "v.npy"))
    assert proc.returncode == 0 and "3 failed rows hold NaN" in proc.stdout, proc.stdout + proc.stderr
    values = np.load(tmp_path / "v.npy")
    bad = pts % 7 == 0
    assert np.array_equal(values[~bad], pts[~bad] + 0.5) and np.isnan(values[bad]).all()
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "copy.h5"))
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "copy.h5", "r") as f:  # plain h5py, no mpimap
        assert list(f["index"][()]) == list(range(20))
        assert [s.decode() for s in f["status"][()]] == ["failed" if b else "done" for b in bad]
        assert np.array_equal(f["values"][()][~bad], pts[~bad] + 0.5)
        assert np.array_equal(f["points"][()], pts)


def test_results_table_and_json(tmp_path):
    job = make_job(tmp_path, "r3", np.arange(30.0))
    proc = cli("results", job.dir.path, "--head", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "30 points: done 25, failed 5, pending 0"
    assert lines[1].split() == ["index", "status", "x0", "y0", "seconds", "rank", "host", "error"]
    assert lines[2].split()[:4] == ["0", "failed", "0", "-"] and lines[3].split()[:4] == ["1", "done", "1",
                                                                                                      "1.5"]
    assert lines[-1].startswith("... 25 more rows")
    proc = cli("results", job.dir.path, "--json", "--head", "0")
    rows = json.loads(proc.stdout)
    assert len(rows) == 30 and rows[0]["status"] == "failed" and rows[0]["y0"] is None
    assert rows[8] == {**rows[8], "index": 8, "status": "done", "x0": 8.0, "y0": 8.5, "rank": 1, "host": HOST}


def test_load_with_and_without_pandas(tmp_path):
    import mpimap

    pts = np.arange(12.0)
    job = make_job(tmp_path, "l1", pts)
    data = mpimap.load(job.dir.path, as_frame=False)
    bad = pts % 7 == 0
    assert list(data["index"]) == list(range(12)) and np.array_equal(data["points"], pts)
    assert list(data["status"]) == ["failed" if b else "done" for b in bad]
    assert np.array_equal(data["values"][~bad], pts[~bad] + 0.5) and np.isnan(data["values"][bad]).all()
    assert data["error"][7].startswith("ValueError: bad point 7") and set(data["host"]) == {HOST}
    frame = mpimap.load(job.dir.path)  # pandas is installed here
    assert list(frame.columns) == ["status", "x0", "y0", "seconds", "rank", "host", "error"]
    assert frame.index.name == "index" and list(frame.index) == list(range(12))
    assert frame.loc[8, "y0"] == 8.5 and frame.loc[7, "status"] == "failed"
    assert mpimap.load(job.dir.results, as_frame=False)["status"].tolist() == list(data["status"])  # a results file
    assert job.results(as_frame=False)["status"].tolist() == list(data["status"])  # the Job API
    # without pandas: the dict by default, one line when pandas is insisted on
    script = ("import sys; sys.modules['pandas'] = None\nimport mpimap\n"
              f"r = mpimap.load({job.dir.path!r}); print(type(r).__name__, sorted(r))\n"
              f"mpimap.load({job.dir.path!r}, as_frame=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.stdout.splitlines()[0] == ("dict ['attrs', 'error', 'host', 'index', 'points', 'rank', 'seconds', "
                                           "'status', 'values']")
    assert "MpimapError: as_frame=True needs pandas: pip install mpimap-hpc[pandas]" in proc.stderr


def test_results_and_load_while_the_job_runs(tmp_path):
    """A job still running: what is stored so far, the rest pending, from the store's reader."""
    pts = np.arange(40.0)
    job = make_job(tmp_path, "w1", pts, run=False)
    (tmp_path / "slow.py").write_text("import time\ndef f(x):\n    time.sleep(0.2)\n    return 2 * x\n")
    proc = launch(2, "-m", "mpimap", "run", f"{tmp_path / 'slow.py'}:f", "--points", job.dir.points,
                  "--out", job.dir.results, "--flush-interval", "0", start_new_session=True,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(job.dir.results):
                out = cli("results", job.dir.path, "--json", "--head", "0")
                if out.returncode == 0:
                    rows = json.loads(out.stdout)
                    if 0 < sum(r["status"] == "done" for r in rows) < 40:
                        break
            time.sleep(0.3)
        else:
            pytest.fail("never saw a partly done job")
        assert [r["index"] for r in rows] == list(range(40))
        assert all(r["y0"] == 2 * r["x0"] for r in rows if r["status"] == "done")
        assert all(r["y0"] is None for r in rows if r["status"] == "pending")
        assert proc.poll() is None  # it was read while running
    finally:
        kill_job(proc)
        proc.wait(timeout=60)


VALUE_KINDS = ("import math\n"
               "def two(r):\n    return [float(r[0]), float(r[1])]\n"
               "def one(r):\n    return [math.sin(r[0]) + 2 * r[1]]\n"
               "def nested(r):\n    return [[float(r[0])], [float(r[1])]]\n"
               "def record(r):\n    return {'x': float(r[0]), 'label': f'p{int(r[0])}'}\n"
               "def word(r):\n    return f'p{int(r[0])}'\n"
               "def vector(r):\n    return [float(r[0]), float(r[1]), 1.0] if r[0] > 0 else [1.0]\n")
EXPECTED = {"two": lambda r: [float(r[0]), float(r[1])], "one": lambda r: [math.sin(r[0]) + 2 * r[1]],
            "nested": lambda r: [[float(r[0])], [float(r[1])]],
            "record": lambda r: {"x": float(r[0]), "label": f"p{int(r[0])}"}, "word": lambda r: f"p{int(r[0])}",
            "vector": lambda r: [float(r[0]), float(r[1]), 1.0] if r[0] > 0 else [1.0]}
NUMBERS_OF_ONE_SHAPE = ("two", "one", "nested")


def json_valued_job(tmp_path, kind: str, finished: bool) -> tuple[Job, np.ndarray]:
    """A job whose function returns JSON values (lists, dicts, text): finished, or with 3 rows still pending."""
    (tmp_path / "kinds.py").write_text(VALUE_KINDS)
    pts = np.arange(16.0).reshape(8, 2)
    job = make_job(tmp_path, kind, pts, function=f"{tmp_path / 'kinds.py'}:{kind}")
    if not finished:  # as a running job's file is: the store's own writer, then some rows not evaluated yet
        from mpimap.store import ResultStore

        os.unlink(job.dir.results)
        store = ResultStore.open(job.dir.results, pts, f"{tmp_path / 'kinds.py'}:{kind}", flush_interval=0)
        store.write(np.arange(5), [EXPECTED[kind](r) for r in pts[:5]], {}, np.full(5, 0.01), 1, HOST)
        store.close("running")
    return job, pts


@pytest.mark.parametrize("finished", [True, False], ids=["done", "running"])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_results_and_load_of_every_kind_of_json_value(tmp_path, kind, finished):
    import h5py
    import mpimap

    job, pts = json_valued_job(tmp_path, kind, finished)
    want = [EXPECTED[kind](r) for r in pts]
    done = np.array([finished or i < 5 for i in range(len(pts))])
    data = mpimap.load(job.dir.path, as_frame=False)
    assert data["values"].shape == (8,)
    assert [v for v, d in zip(data["values"], done) if d] == [w for w, d in zip(want, done) if d]
    assert all(v is None for v, d in zip(data["values"], done) if not d)
    frame = mpimap.load(job.dir.path)
    assert list(frame.columns) == ["status", "x0", "x1", "value", "seconds", "rank", "host", "error"]
    assert [frame.loc[i, "value"] for i in range(8) if done[i]] == [w for w, d in zip(want, done) if d]
    script = (f"import sys; sys.modules['pandas'] = None\nimport mpimap\n"
              f"print(mpimap.load({job.dir.path!r})['values'].shape)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.stdout.strip() == "(8,)", proc.stderr
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "c.h5"))
    assert proc.returncode == 0 and "datasets: index, status, points, values_json, seconds" in proc.stdout, proc.stderr
    with h5py.File(tmp_path / "c.h5", "r") as f:
        stored = [json.loads(t) if t else None for t in f["values_json"].asstr()[()]]
    assert stored == [w if d else None for w, d in zip(want, done)]
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "c.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [json.loads(r["value"]) if r["value"] else None for r in rows] == [w if d else None
                                                                              for w, d in zip(want, done)]
    proc = cli("results", job.dir.path, "--json", "--head", "0")
    assert proc.returncode == 0, proc.stderr
    assert [r["value"] for r in json.loads(proc.stdout)] == [w if d else None for w, d in zip(want, done)]
    table = cli("results", job.dir.path)
    assert table.returncode == 0 and table.stdout.startswith(f"8 points: done {int(done.sum())}"), table.stderr
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "c.npy"))
    if kind in NUMBERS_OF_ONE_SHAPE:  # numbers of one shape: an array, NaN where a point is not done
        assert proc.returncode == 0, proc.stderr
        values = np.load(tmp_path / "c.npy")
        assert values.shape == (8, *np.shape(want[0])) and np.array_equal(values[done], np.array(want)[done])
        assert np.isnan(values[~done]).all()
    else:
        assert proc.returncode == 2 and proc.stderr.strip() == (
            "mpimap: error: the values are not numbers of one shape (JSON data): write them with -o FILE.csv or "
            "-o FILE.h5") and not os.path.exists(tmp_path / "c.npy")


# -------------------------------------------------------------------------------------------------------- status


def test_status_of_a_finished_job_agrees_with_its_files(tmp_path):
    job = make_job(tmp_path, "s1", np.arange(30.0))
    written = finished_status(job)
    proc = cli("status", job.dir.path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0] == "job s1: done"
    assert "progress   : 25 done, 5 failed, 0 pending of 30" in out
    assert "failures   : raised 5" in out and f"master {HOST} pid 1" in out
    assert f"thumbnail  : none yet; mpimap thumbnail {job.dir.path} writes {job.dir.thumbnail}" in out
    report = json.loads(cli("status", job.dir.path, "--json").stdout)
    assert report["state"] == "done" and report["status"] == json.loads(json.dumps(written.to_json()))


def test_status_of_a_running_job_shows_ranks_per_host_with_pids(tmp_path, live_session):
    job = make_job(tmp_path, "s2", np.arange(10.0), run=False)
    register_batch(job, live_session)
    ranks = [RankRow(1, "nodeA", 1001, "busy", 1, 3, 0.5, [4, 5]), RankRow(2, "nodeA", 1002, "idle"),
             RankRow(3, "nodeB", 2001, "busy", 1, 2, 0.1, [7]), RankRow(4, "nodeB", 2002, "lost")]
    write_status(job, state="running", total=10, done=5, failed=1, pending=4, started=time.time() - 20,
                 host="nodeA", pid=1000, rate=0.25, eta_seconds=16.0, ranks=[r.to_json() for r in ranks],
                 failures={"timeout": 1})
    out = cli("status", job.dir.path).stdout
    assert out.splitlines()[0] == "job s2: running"
    assert "ranks      : 3 alive, 2 busy, 1 idle on 2 host(s)" in out
    assert "    nodeA: 2 alive (1 busy, 1 idle), pids 1001 1002" in out
    assert "    nodeB: 1 alive (1 busy, 0 idle, 1 lost), pids 2001" in out
    assert "[##############----------] 6/10 points, 1 failed, 0.25 points/s, ETA 0:00:16" in out
    assert "failures   : timeout 1" in out
    hosts = json.loads(cli("status", job.dir.path, "--json").stdout)["hosts"]
    assert hosts == [{"host": "nodeA", "ranks": 2, "alive": 2, "busy": 1, "idle": 1, "lost": 0, "pids": [1001, 1002],
                      "ended": False},
                     {"host": "nodeB", "ranks": 2, "alive": 1, "busy": 1, "idle": 0, "lost": 1, "pids": [2001],
                      "ended": False}]


@pytest.mark.parametrize("content, message", [
    (b'{"format": "mpimap-status", "vers', "status.json is damaged (not a mpimap-status file)"),
    (b"\xff\xfe\x00garbage", "status.json is damaged (not a mpimap-status file)"),
    (b'{"format": "mpimap-status", "version": 99, "state": "running"}', "upgrade mpimap"),
    (b'{"format": "mpimap-status", "version": 1, "ranks": []}', "status.json is damaged (not a mpimap-status file"),
    (b'{"format": "mpimap-status", "version": 1, "state": "running", "updated": 1, "done": "many"}',
     "status.json is damaged (not a mpimap-status file: done is str, not int)"),
    (b'{"format": "mpimap-status", "version": 1, "state": "running", "updated": 1, "ranks": [{"rank": 1}]}',
     "status.json is damaged (not a mpimap-status file"),
    (None, "status.json is not a regular file"),
])
def test_a_damaged_status_file_is_one_line_for_every_read_command(tmp_path, content, message):
    job = make_job(tmp_path, "d1", np.arange(8.0))
    if content is None:
        os.mkfifo(job.dir.status)  # a reader that opened it plainly would block for ever
    else:
        with open(job.dir.status, "wb") as f:
            f.write(content)
    for command in (["status", job.dir.path], ["attach", job.dir.path], ["ps", job.dir.path],
                    ["thumbnail", job.dir.path, "-o", str(tmp_path / "t.png")], ["ls", "--scan", str(tmp_path)]):
        proc = cli(*command, timeout=60, env=job_env(MPIMAP_HOME=str(tmp_path / "home")))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (command, proc.stderr)
        assert lines[0].startswith("mpimap: error: ")


def test_a_damaged_results_file_and_an_unknown_job_are_one_line(tmp_path):
    job = make_job(tmp_path, "d2", np.arange(8.0))
    with open(job.dir.results, "r+b") as f:
        f.truncate(200)
    for command in (["results", job.dir.path], ["results", job.dir.path, "-o", str(tmp_path / "x.csv")],
                    ["thumbnail", job.dir.path]):
        proc = cli(*command, timeout=90)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "is damaged or not an mpimap results file" in lines[0], \
            proc.stderr
    assert not os.path.exists(tmp_path / "x.csv")
    for command in ("status", "attach", "results", "thumbnail", "ps"):
        proc = cli(command, str(tmp_path / "no-such-job"), timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "no-such-job" in lines[0], (command, proc.stderr)
    queued = make_job(tmp_path, "q1", np.arange(3.0), run=False)
    proc = cli("results", queued.dir.path)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"mpimap: error: job {queued.dir.path} has no results "
                                                            f"yet: it has not started (mpimap status "
                                                            f"{queued.dir.path} tells why)")
    proc = cli("results", job.dir.path, "-o", str(tmp_path / "x.txt"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"mpimap: error: -o {tmp_path / 'x.txt'}: the extension decides the format; use FILE.csv, FILE.npy or FILE.h5")


ENDED_RANKS = [RankRow(1, "nodeA", 1001, "busy", 1, 3, 0.5, [4, 5]), RankRow(2, "nodeA", 1002, "idle"),
               RankRow(3, "nodeB", 2001, "lost")]


@pytest.mark.parametrize("state", ["done", "cancelled", "failed", "interrupted"])
def test_status_of_an_ended_job_shows_its_ranks_as_they_ended_and_no_eta(tmp_path, state):
    job = make_job(tmp_path, "e1", np.arange(10.0), run=False)
    gone = subprocess.Popen(["true"], start_new_session=True)  # its batch job: ended (kill -9 leaves no word)
    gone.wait(timeout=60)
    register_batch(job, gone)
    write_status(job, state="running" if state == "interrupted" else state, total=10, done=6, failed=1, pending=3,
                 started=time.time() - 20, host="nodeA", pid=1000, rate=0.25, eta_seconds=12.0,
                 ranks=[r.to_json() for r in ENDED_RANKS])
    out = cli("status", job.dir.path).stdout
    assert out.splitlines()[0] == f"job e1: {state}"
    assert "ETA" not in out and "alive" not in out and "busy" not in out, out
    assert "[################--------] 7/10 points, 1 failed\n" in out
    assert "ranks      : 3 on 2 host(s) when the job ended (none runs now)" in out
    assert "    nodeA: 2 ranks, pids were 1001 1002" in out and "    nodeB: 1 rank (1 lost), pids were -" in out
    report = json.loads(cli("status", job.dir.path, "--json").stdout)
    assert report["state"] == state and report["status"]["eta_seconds"] is None
    assert report["hosts"] == [
        {"host": "nodeA", "ranks": 2, "alive": 0, "busy": 0, "idle": 0, "lost": 0, "pids": [1001, 1002], "ended": True},
        {"host": "nodeB", "ranks": 1, "alive": 0, "busy": 0, "idle": 0, "lost": 1, "pids": [], "ended": True}]


def test_a_job_that_failed_before_reading_its_points_shows_their_count(tmp_path):
    job = make_job(tmp_path, "f0", np.arange(40.0), run=False)
    write_status(job, state="failed", started=time.time() - 5, ended=time.time(), host=HOST, pid=1,
                 message="cannot import module gone")  # the master never counted the points
    out = cli("status", job.dir.path).stdout
    assert "progress   : 0 done, 0 failed, 40 pending of 40" in out
    assert "[------------------------] 0/40 points, 0 failed\n" in out
    report = json.loads(cli("status", job.dir.path, "--json").stdout)
    assert (report["status"]["total"], report["status"]["pending"]) == (40, 40)
    attached = cli("attach", job.dir.path)
    assert attached.returncode == 1 and "job f0 failed: 0 done, 0 failed of 40 (cannot import module gone)" in \
        attached.stdout, attached.stdout + attached.stderr
    env = {**job_env(), "MPIMAP_HOME": str(tmp_path / "home")}
    listed = json.loads(cli("ls", "--json", "--scan", str(tmp_path), env=env).stdout)
    assert [(row["name"], row["total"]) for row in listed] == [("f0", 40)]


@pytest.mark.parametrize("history", [[[1]], [[1, "a", 2]], [[1, 2, 3], [4, 5]], [5], [1, 2, 3]])
def test_a_status_file_with_bad_history_is_one_line_for_the_thumbnail(tmp_path, history):
    job = make_job(tmp_path, "h1", np.arange(8.0), run=False)
    write_status(job, state="running", total=8, pending=8, history=history)
    proc = cli("thumbnail", job.dir.path, "-o", str(tmp_path / "t.png"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mpimap: error: {job.dir.status} is damaged (not a mpimap-status file: history")
    assert not os.path.exists(tmp_path / "t.png")


def test_a_registry_entry_of_the_wrong_type_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.json").write_text(json.dumps({"format": "mpimap-registry", "version": 1,
                                                    "jobs": {"j1": str(tmp_path / "j1"), "j2": 5}}))
    for command in (["status", "j2"], ["status", "j1"], ["ls"]):
        proc = cli(*command, cwd=tmp_path, env=job_env(MPIMAP_HOME=str(home)), timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (command, proc.stderr)
        assert lines[0].startswith(f"mpimap: error: the job registry {home / 'registry.json'} is damaged")


@pytest.mark.parametrize("name, magic", [("t.jpg", b"\xff\xd8\xff"), ("t.svg", b"<?xml"), ("t.pdf", b"%PDF")])
def test_thumbnail_writes_the_format_its_extension_names(tmp_path, name, magic):
    job = make_job(tmp_path, "x1", np.arange(10.0), run=False)
    out = tmp_path / name
    proc = cli("thumbnail", job.dir.path, "-o", str(out))
    assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {out}"), proc.stderr
    assert out.read_bytes().startswith(magic)
    proc = cli("thumbnail", job.dir.path, "-o", str(tmp_path / "t.xyz"))
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"mpimap: error: -o {tmp_path / 't.xyz'}: matplotlib cannot write .xyz files; use one of ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "t.xyz")


# ------------------------------------------------------------------------------------------------------------ ps


def test_ps_lists_every_process_and_the_idle_ranks(tmp_path, live_session):
    running = make_job(tmp_path, "p1", np.arange(10.0), run=False)
    register_batch(running, live_session)
    ranks = [RankRow(1, "nodeA", 1001, "busy", 1, 3, 0.5, [4, 5, 6, 9]), RankRow(2, "nodeB", 2001, "idle"),
             RankRow(3, "nodeB", 2002, "busy", 1, 0, 0.2, [7], frozen=12.4)]
    rows = [r.to_json() for r in ranks]
    del rows[0]["frozen"]  # as a writer from before ``frozen`` left it
    write_status(running, state="running", total=10, done=3, pending=7, host="nodeA", pid=1000, ranks=rows)
    done = make_job(tmp_path, "p2", np.arange(5.0))
    finished_status(done)
    proc = cli("ps", running.dir.path, done.dir.path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split() for line in lines[:5]] == [["JOB", "HOST", "RANK", "PID", "STATE", "EVALUATING"],
                                                    ["p1", "nodeA", "0", "1000", "master", "-"],
                                                    ["p1", "nodeA", "1", "1001", "busy", "4-6,9"],
                                                    ["p1", "nodeB", "2", "2001", "idle", "-"],
                                                    ["p1", "nodeB", "3", "2002", "busy", "(frozen", "12s)", "7"]]
    assert lines[5] == "1 of 3 live worker ranks idle: p1 rank 2 on nodeB"
    assert lines[6] == "hosts with no busy rank: none"
    listed = json.loads(cli("ps", running.dir.path, done.dir.path, "--json").stdout)
    assert [(p["job"], p["rank"], p["pid"], p["state"], p["evaluating"], p["frozen"])
            for p in listed["processes"]] == [
        ("p1", 0, 1000, "master", [], 0.0), ("p1", 1, 1001, "busy", [4, 5, 6, 9], 0.0), ("p1", 2, 2001, "idle", [], 0.0),
        ("p1", 3, 2002, "busy", [7], 12.4)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a job directory to another user")
def test_ps_all_users_adds_running_jobs_of_other_users(tmp_path, live_session):
    import pwd

    other = pwd.getpwnam("nobody").pw_uid
    jobs = tmp_path / "mpimap-jobs"
    jobs.mkdir()
    theirs = make_job(jobs, "theirs", np.arange(4.0), run=False)
    register_batch(theirs, live_session)
    write_status(theirs, state="running", total=4, pending=4, host="nodeC", pid=3000,
                 ranks=[RankRow(1, "nodeC", 3001, "busy", 1, 0, 0.1, [0]).to_json()])
    for path in (jobs / "theirs", *(jobs / "theirs").iterdir()):
        os.chown(path, other, -1)
    env = job_env(MPIMAP_HOME=str(tmp_path / "home"))
    assert cli("ps", cwd=tmp_path, env=env).stdout.strip() == "no running jobs"
    listed = json.loads(cli("ps", "--all-users", "--json", cwd=tmp_path, env=env).stdout)["processes"]
    assert [(p["job"], p["host"], p["rank"], p["pid"]) for p in listed] == [("theirs", "nodeC", 0, 3000),
                                                                            ("theirs", "nodeC", 1, 3001)]


# ----------------------------------------------------------------------------------------------------- thumbnail


def _image(path):
    from matplotlib.image import imread

    return imread(path)


@pytest.mark.parametrize("points", [np.linspace(0, 1, 60), np.stack(np.meshgrid(np.arange(8.0), np.arange(8.0)),
                                                                    -1).reshape(-1, 2)], ids=["1-D", "2-D"])
def test_thumbnail_is_a_real_png_with_a_map(tmp_path, points):
    function = "jobfuncs:square" if points.ndim == 1 else "jobfuncs:poly"
    job = make_job(tmp_path, "t1", points, function=function)
    finished_status(job)
    out = tmp_path / "progress.png"
    proc = cli("thumbnail", job.dir.path, "-o", str(out))
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {out} (640x260 pixels)", proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = _image(out)
    assert image.shape[:2] == (260, 640) and image[..., :3].std() > 0.05  # not blank
    right = image[:, 330:, :3]  # the map: green for done points
    green = (right[..., 1] > 0.5) & (right[..., 0] < 0.4) & (right[..., 2] < 0.4)
    assert green.sum() > 50
    # the default place, which status then names
    assert cli("thumbnail", job.dir.path).returncode == 0
    assert f"thumbnail  : {job.dir.thumbnail} (written " in cli("status", job.dir.path).stdout


def test_thumbnail_of_a_queued_job_and_without_matplotlib(tmp_path):
    job = make_job(tmp_path, "t2", np.arange(10.0), run=False)  # queued: no results, no status yet
    out = tmp_path / "q.png"
    assert cli("thumbnail", job.dir.path, "-o", str(out)).returncode == 0
    image = _image(out)
    assert image.shape[:2] == (260, 640) and image[..., :3].std() > 0.05
    script = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
              "from mpimap.__main__ import main\n"
              f"sys.exit(main(['thumbnail', {job.dir.path!r}, '-o', {str(tmp_path / 'n.png')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "mpimap: error: the thumbnail needs matplotlib: pip install mpimap-hpc[plot]")
    assert not os.path.exists(tmp_path / "n.png")


# ---------------------------------------------------------------------------- a really running job (local scheduler)


SLOW_FAILING = ("import time\ndef f(x):\n    time.sleep({sleep})\n    if int(x) % 5 == 3:\n"
                "        raise ValueError(f'bad point {{int(x)}}')\n    return 2 * x\n")


@pytest.fixture
def submitted(tmp_path):
    """``submit(name, npoints, sleep)``: a real job submitted with ``mpimap submit --scheduler local`` (2 ranks)
    from tmp_path, with an mpimap home of its own; every process of its session is killed afterwards."""
    env = job_env(MPIMAP_HOME=str(tmp_path / "home"))
    sessions = []

    def submit(name: str, npoints: int, sleep: float = 0.25) -> Job:
        (tmp_path / f"{name}.py").write_text(SLOW_FAILING.format(sleep=sleep))
        np.save(tmp_path / f"{name}.npy", np.arange(float(npoints)))
        proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", f"{name}.py:f", "--points", f"{name}.npy",
                               "--scheduler", "local", "--ranks", "2", "--name", name], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        job = Job(str(tmp_path / "mpimap-jobs" / name))
        sessions.append(int(job.batch_id().rpartition(":")[2]))
        return job

    submit.env = env
    yield submit
    kill_sessions(sessions)


def kill_sessions(sessions: list[int]) -> None:
    """kill -9 every process of these sessions and their descendants (MPICH starts each rank in a session of its
    own)."""
    doomed = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(entry)) in sessions or set(sessions) & set(ancestors(int(entry))):
                doomed.append(int(entry))
        except OSError:
            pass
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rpartition(")")[2].split()[1])
        found.append(pid)
    return found


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"waited {seconds} s for {what}")


def test_status_and_ps_of_a_running_job_name_its_real_processes(tmp_path, submitted):
    job = submitted("live", 200, sleep=0.3)
    wait_for(lambda: job.status() is not None and job.status().done >= 2, 90, "2 points done")
    report = json.loads(cli("status", "live", "--json", cwd=tmp_path, env=submitted.env).stdout)
    assert report["state"] == "running" and report["batch"]["state"] == "running"
    assert report["status"]["total"] == 200 and report["hosts"][0]["alive"] == 1
    listed = json.loads(cli("ps", "--json", cwd=tmp_path, env=submitted.env).stdout)["processes"]
    assert [(p["job"], p["rank"], p["state"] in ("master", "busy", "idle")) for p in listed] == [
        ("live", 0, True), ("live", 1, True)]
    for p in listed:  # real processes of this job: descendants of its batch id's process
        assert int(job.batch_id().rpartition(":")[2]) in ancestors(p["pid"])
        assert "mpimap" in open(f"/proc/{p['pid']}/cmdline").read()
    assert listed[1]["pid"] == report["hosts"][0]["pids"][0]
    text = cli("ps", cwd=tmp_path, env=submitted.env).stdout
    assert text.splitlines()[0].split() == ["JOB", "HOST", "RANK", "PID", "STATE", "EVALUATING"]
    assert f"live  {HOST}" in text and "live worker ranks idle" in text


@pytest.mark.skipif(__import__("mpimap.native_models").native_models.extension is None,
                    reason="the C extension is not in use here: without its heartbeat such a rank is lost, not frozen")
def test_ps_shows_a_rank_whose_python_side_is_held_in_a_c_call_as_frozen(tmp_path, native_model):
    """A point that holds the GIL for 8 s (rank isolation): ``ps`` shows its rank busy and frozen, not lost."""
    env = job_env(MPIMAP_HOME=str(tmp_path / "home"), NATIVE_MODEL=native_model, MPIMAP_HEARTBEAT="0.3")
    np.save(tmp_path / "pts.npy", np.array([8.0, 0.0, 0.0]))
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "jobfuncs:hold_gil", "--points", "pts.npy",
                           "--scheduler", "local", "--ranks", "2", "--name", "held", "--isolation", "rank"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = Job(str(tmp_path / "mpimap-jobs" / "held"))
    try:
        def frozen_row():
            rows = json.loads(cli("ps", "held", "--json", cwd=tmp_path, env=env).stdout)["processes"]
            return next((r for r in rows if r["rank"] == 1 and r["frozen"] >= 2.0), None)

        row = wait_for(frozen_row, 60, "rank 1 shown frozen")
        assert row["state"] == "busy" and 0 in row["evaluating"]
        line = next(x for x in cli("ps", "held", cwd=tmp_path, env=env).stdout.splitlines() if " 1 " in x)
        assert "busy (frozen " in line, line
        wait_for(lambda: job.state() == "done", 90, "the job to end")
        assert [(r.state, r.frozen) for r in job.status().ranks] == [("idle", 0.0)]  # never lost; moves again
        out = read_results(job.dir.results)
        assert out["status"].tolist() == ["done"] * 3 and out["value"].ravel().tolist() == [8.0, 0.0, 0.0]
    finally:
        kill_sessions([int(job.batch_id().rpartition(":")[2])])


def test_attach_follows_a_job_to_its_end_and_prints_each_failure(tmp_path, submitted):
    job = submitted("followed", 30)
    proc = cli("attach", "followed", "--interval", "0.3", cwd=tmp_path, env=submitted.env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"attached to job followed ({job.dir.path}); Ctrl-C detaches, the job goes on"
    failed = [line for line in out if " failed on " in line]
    # every failure once: listed as it happened, or counted if it was there at the first look
    earlier = [int(line.split()[0]) for line in out if "points had failed before" in line]
    assert len(failed) + sum(earlier) == 6 and len(set(failed)) == len(failed) and len(failed) >= 3
    for line in failed:
        i = int(line.split()[1])
        assert i % 5 == 3 and line == f"point {i} failed on {HOST} rank 1: ValueError: bad point {i}"
    assert "job followed done: 24 done, 6 failed of 30" in out
    assert out[-1].startswith("results: mpimap results followed") and job.dir.thumbnail in out[-1]
    assert job.state() == "done"
    assert cli("results", "followed", "-o", "f.csv", cwd=tmp_path, env=submitted.env).returncode == 0  # by its name
    rows = list(csv.DictReader(open(tmp_path / "f.csv")))
    assert [int(r["index"]) for r in rows] == list(range(30))
    assert all((r["status"], r["y0"]) == (("failed", "") if i % 5 == 3 else ("done", str(2.0 * i)))
               for i, r in enumerate(rows))
    assert len(job.status().history) >= 2  # the master's samples: the thumbnail draws them
    assert cli("thumbnail", "followed", cwd=tmp_path, env=submitted.env).returncode == 0
    assert _image(job.dir.thumbnail)[..., :3].std() > 0.05


def test_attach_ctrl_c_detaches_and_leaves_the_job_running(tmp_path, submitted):
    job = submitted("watched", 200)
    attach = subprocess.Popen([sys.executable, "-m", "mpimap", "attach", "watched", "--interval", "0.3"],
                              cwd=tmp_path, env=submitted.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: job.status() is not None and job.status().done > 0, 90, "a point done")
        time.sleep(1.0)  # attach has looked at least once
        attach.send_signal(signal.SIGINT)
        out, err = attach.communicate(timeout=60)
    finally:
        attach.kill()
    assert attach.returncode == 0 and err == "", out + err
    assert "running: [" in out and out.splitlines()[-1] == "detached; the job goes on (mpimap attach watched)"
    before = job.status().done
    assert job.state() == "running" and not os.path.exists(job.dir.control)  # nothing was sent to it
    wait_for(lambda: job.status().done > before, 60, "the job to go on")


def test_attach_exits_with_the_final_state_of_a_cancelled_job(tmp_path, submitted):
    job = submitted("dropped", 200)
    wait_for(lambda: job.status() is not None and job.status().done > 0, 90, "a point done")
    attach = subprocess.Popen([sys.executable, "-m", "mpimap", "attach", "dropped", "--interval", "0.3"],
                              cwd=tmp_path, env=submitted.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        cancel = cli("cancel", "dropped", cwd=tmp_path, env=submitted.env)
        assert cancel.returncode == 0, cancel.stderr
        out, err = attach.communicate(timeout=90)
    finally:
        attach.kill()
    assert attach.returncode == 5, out + err
    assert "job dropped cancelled:" in out


def test_attach_says_interrupted_when_the_job_dies_without_a_word(tmp_path, submitted):
    job = submitted("killed", 200)
    wait_for(lambda: job.status() is not None and job.status().done > 0, 90, "a point done")
    attach = subprocess.Popen([sys.executable, "-m", "mpimap", "attach", "killed", "--interval", "0.3"],
                              cwd=tmp_path, env=submitted.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        time.sleep(1.0)
        kill_sessions([int(job.batch_id().rpartition(":")[2])])  # kill -9: no final status is written
        out, err = attach.communicate(timeout=90)
    finally:
        attach.kill()
    assert attach.returncode == 3, out + err
    assert "job killed interrupted:" in out and job.status().state == "running"


def test_an_allocation_that_ended_without_a_word_lasts_until_the_next_link_started(tmp_path):
    from mpimap.jobs.views import clock, duration

    job = make_job(tmp_path, "c3", np.arange(8.0))
    status = finished_status(job)
    first = Submission(batch_id=f"{HOST}:999991", scheduler="local", submitted=status.started - 5,
                       started=status.started, state="running")  # killed: nothing recorded its end
    second = Submission(batch_id=f"{HOST}:999992", scheduler="local", submitted=status.started - 4,
                        after=first.batch_id, started=status.started + 12, ended=status.ended, points=8, state="done")
    write_json(job.dir.batch, Submission.FORMAT, Submission.VERSION,
               {"submissions": [first.to_json(), second.to_json()]})
    write_status(job, **{**status.to_json(), "batch_id": second.batch_id})
    seen = []
    for _ in range(2):
        [line] = [line for line in cli("status", job.dir.path).stdout.splitlines()
                  if line.startswith(f"    {first.batch_id}:")]
        seen.append(line)
        time.sleep(1.5)
    expected = f"ended without a word, {clock(first.started)} for {duration(12.0)}"
    assert seen[0] == seen[1] and seen[0].endswith(expected), seen


def test_a_job_resubmitted_by_an_older_mpimap_shows_no_queued_chain(tmp_path):
    job = make_job(tmp_path, "old3", np.arange(8.0))
    status = finished_status(job)
    subs = [{"batch_id": f"{HOST}:99999{k}", "scheduler": "local", "submitted": status.started - 300 + 100 * k,
             "host": HOST} for k in range(3)]  # batch.json before chains: no after, started, state, ...
    write_json(job.dir.batch, Submission.FORMAT, Submission.VERSION, {"submissions": subs})
    write_status(job, **{**status.to_json(), "batch_id": subs[-1]["batch_id"]})
    text = cli("status", job.dir.path).stdout
    assert text.splitlines()[0] == "job old3: done", text
    assert "queued" not in text and "0 allocations" not in text, text
