"""Worker state under real mpiexec: the pool's initializer, ``pool.share`` and state versions per map."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import job_env, kill_job, launch, mpimap_cli
from mpimap.shared import PREFIX, _directory


def result_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def shared_files(tag: str) -> list:
    return [n for n in os.listdir(_directory()) if n.startswith(PREFIX) and tag in n]


INIT_SCRIPT = '''
import json, os, re, mpimap

CALLS = []

def init(tag):
    CALLS.append((tag, os.getpid()))  # a forked child inherits its parent's list: count this process's own
    if tag == "bad":
        raise ValueError(f"no licence server in {os.getpid()}")

def probe(i):
    if i == 105 and not os.path.exists("crashed"):
        open("crashed", "w").close()
        os._exit(3)  # the evaluation process dies: the next one runs the initializer again
    return os.getpid(), [tag for tag, pid in CALLS if pid == os.getpid()]

def rows(pool, points=range(12), **options):
    return [list(r) if not isinstance(r, Exception) else repr(r) for r in pool.map(probe, points, chunksize=1,
                                                                                     **options)]

if __name__ == "__main__":
    out = {}
    with mpimap.Pool(initializer=init, initargs=("good",), on_error="record") as pool:
        out["rank"] = rows(pool)
        out["process"] = rows(pool, isolation="process", max_points=3)
        out["fresh"] = rows(pool, isolation="fresh")
        out["crash"] = rows(pool, range(100, 112), isolation="process", quarantine=2)
    for isolation in ("rank", "process", "fresh"):
        with mpimap.Pool(initializer=init, initargs=("bad",), on_error="record", isolation=isolation) as pool:
            failed = list(pool.map(probe, range(6)))
            out["bad_" + isolation] = [[type(e).__name__, str(e), type(e.__cause__).__name__, str(e.__cause__)]
                                       for e in failed]
            out["bad_pids_" + isolation] = len({re.search(r"no licence server in ([0-9]+)", str(e))[1] for e in failed})
    with mpimap.Pool() as pool:  # the ranks whose initializer raised serve on
        out["after"] = sorted(r[0] for r in pool.map(probe, range(8), chunksize=1))
        out["size"] = pool.size
    print("RESULT " + json.dumps(out))
'''


def test_initializer_runs_once_in_every_evaluating_process_and_a_raising_one_fails_only_that_maps_points(
        run_script, tmp_path):
    out = result_of(run_script(INIT_SCRIPT, ranks=3, env=job_env(), timeout=240))
    # rank isolation: the initializer ran once in each worker rank, before its first point
    for pid, calls in out["rank"]:
        assert calls == ["good"]
    assert len({pid for pid, _ in out["rank"]}) <= 2
    # process isolation, recycled every 3 points: each new evaluation process runs it once
    pids = {pid for pid, _ in out["process"]}
    assert len(pids) >= 4 and all(calls == ["good"] for _, calls in out["process"])
    # fresh: a new process for every point, each with its own initializer run
    assert len({pid for pid, _ in out["fresh"]}) == 12 and all(calls == ["good"] for _, calls in out["fresh"])
    # the process that crashed on point 105 is replaced; the new one ran the initializer before its first point
    assert len(out["crash"]) == 12 and all(calls == ["good"] for _, calls in out["crash"])
    assert (tmp_path / "crashed").exists()
    for isolation in ("rank", "process", "fresh"):
        failures = out["bad_" + isolation]
        assert len(failures) == 6
        for kind, message, cause, cause_message in failures:
            assert kind == "InitializerError" and "initializer init raised ValueError: no licence server" in message
            assert cause == "RemoteTraceback" and "no licence server" in cause_message
    assert out["bad_pids_rank"] <= 2 and out["bad_pids_process"] <= 2  # one try per process (rank, or its child)
    assert out["bad_pids_fresh"] == 6  # a new process per point, each trying the initializer again
    assert out["size"] == 2 and len(out["after"]) == 8


SHARE_SCRIPT = '''
import gc, json, os, time, numpy as np, mpimap
from mpimap.shared import Shared, _directory

def look(args):
    handle, i = args
    value = handle.value
    a = value["array"]
    return [float(a[i]), value["name"], bool(a.flags.writeable), os.getpid()]

if __name__ == "__main__":
    out = {}
    with mpimap.Pool() as pool:
        array = np.arange(1_000_000, dtype=np.float64)
        handle = pool.share({"array": array, "name": "v1"})
        out["master_value"] = handle.value["array"] is array
        for isolation in ("rank", "process", "fresh"):
            rows = list(pool.map(look, [(handle, i) for i in range(0, 1_000_000, 99_999)], isolation=isolation))
            out[isolation] = [r[:3] for r in rows]
        name = handle.name
        out["file"] = os.path.exists(os.path.join(_directory(), name))
        del handle, rows
        gc.collect()
        pool.map(abs, [1])  # a turn of the master: the release has gone out
        time.sleep(0.5)
        out["file_after_release"] = os.path.exists(os.path.join(_directory(), name))
        failed = list(pool.map(look, [(Shared(name), 0)], on_error="record"))[0]
        out["released_value"] = [type(failed).__name__, str(failed)]
        out["pid"] = os.getpid()
    print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("hosts", ["one host", "a host per rank"])
def test_share_gives_every_isolation_a_read_only_view_and_is_released(run_script, hosts):
    env = job_env(**({"MPIMAP_HOST": "node{rank}"} if hosts != "one host" else {}))
    out = result_of(run_script(SHARE_SCRIPT, ranks=3, env=env, timeout=240))
    assert out["master_value"] is True and out["file"] is True
    expected = [[float(i), "v1", False] for i in range(0, 1_000_000, 99_999)]
    for isolation in ("rank", "process", "fresh"):
        assert out[isolation] == expected, isolation
    assert out["file_after_release"] is False
    kind, message = out["released_value"]
    assert kind == "RuntimeError" and "was released" in message
    assert shared_files(f"-{out['pid']}-") == []  # nothing left once the job ended


VERSIONS_SCRIPT = '''
import json, os, time, mpimap

def evaluate(args):
    handle, tag, i = args
    seen = handle.value["version"]
    with open(f"evals-{os.getpid()}.txt", "a") as f:
        f.write(f"{tag} {i} {seen}\\n")
    marker = f"first-{tag}-{i}"
    first = not os.path.exists(marker)
    if first:
        open(marker, "w").close()
        if tag == "B" and i == 3:
            time.sleep(3)  # a straggler: an idle rank gets a copy of it
        if tag != "B" and i % 4 == 1:
            raise RuntimeError("fails on its first attempt: retried")
    return tag, i, seen

if __name__ == "__main__":
    with mpimap.Pool(retries=1, on_error="record") as pool:
        state = {"version": "A", "data": list(range(1000))}
        a = pool.share(state)
        state["version"] = "B"  # the fitter updates its model: a new share, a new handle
        b = pool.share(state)
        first = pool.imap_unordered(evaluate, [(a, "A", i) for i in range(12)], chunksize=1)
        second = pool.imap_unordered(evaluate, [(b, "B", i) for i in range(12)], chunksize=1)
        third = pool.imap_unordered(evaluate, [(a, "A2", i) for i in range(12)], chunksize=1)
        rows = list(first) + list(second) + list(third)
    print("RESULT " + json.dumps(rows))
'''


def test_interleaved_maps_each_see_their_own_state_version_with_retries_and_straggler_copies(run_script, tmp_path):
    rows = result_of(run_script(VERSIONS_SCRIPT, ranks=3, timeout=240))
    assert sorted(map(tuple, rows)) == sorted([(tag, i, tag[0]) for tag in ("A", "B", "A2") for i in range(12)])
    evaluations = [line.split() for f in tmp_path.glob("evals-*.txt") for line in f.read_text().splitlines()]
    assert all(seen == tag[0] for tag, i, seen in evaluations)  # every evaluation, also those whose result lost
    counts = {}
    for tag, i, _ in evaluations:
        counts[tag, int(i)] = counts.get((tag, int(i)), 0) + 1
    assert all(counts[tag, i] >= 2 for tag in ("A", "A2") for i in range(1, 12, 4))  # retried
    assert counts["B", 3] >= 2  # a straggler copy was evaluated too


KILLED_SCRIPT = '''
import time, numpy as np, mpimap

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        handle = pool.share(np.zeros(1000))
        print("SHARED " + handle.name, flush=True)
        time.sleep(600)
'''


def test_a_master_killed_with_kill_9_leaves_no_shared_file_behind_after_the_next_start(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    job = launch(2, "-m", "mpimap", str(script), cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                 start_new_session=True)
    try:
        line = job.stdout.readline()
        assert line.startswith("SHARED "), line
        name = line.split()[1]
        assert os.path.exists(os.path.join(_directory(), name))
    finally:
        kill_job(job, signal.SIGKILL)
        job.wait(timeout=60)
    # Nothing removes it now but the next mpimap master of this user on this host (on a shared machine, another
    # job's may come first: then it is gone already).
    subprocess.run([sys.executable, "-c", "import mpimap; mpimap.Pool().shutdown()"], env=job_env(), timeout=120,
                   check=True)
    assert not os.path.exists(os.path.join(_directory(), name))


INIT_MODULE = '''
import os
STATE = {}

def setup():
    STATE["pid"] = os.getpid()
    STATE["scale"] = 10.0

def scaled(x):
    assert STATE["pid"] == os.getpid(), "the initializer did not run in this process"
    return STATE["scale"] * float(x)
'''


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_run_init_runs_the_initializer_on_the_workers(tmp_path, isolation):
    import mpimap

    (tmp_path / "initmod.py").write_text(INIT_MODULE)
    np.save(tmp_path / "points.npy", np.arange(20.0))
    args = ["run", "initmod:scaled", "--points", "points.npy", "--out", "out.h5", "--init", "initmod:setup",
            "--isolation", isolation]
    if isolation == "process":
        args += ["--max-points", "3"]
    mpimap_cli(3, *args, cwd=tmp_path, timeout=180)
    results = mpimap.load(str(tmp_path / "out.h5"), as_frame=False)
    assert list(results["status"]) == ["done"] * 20
    assert np.array_equal(np.asarray(results["values"], dtype=float), 10.0 * np.arange(20.0))


def test_run_init_that_is_not_module_function_is_one_line(tmp_path):
    np.save(tmp_path / "points.npy", np.arange(3.0))
    proc = mpimap_cli(2, "run", "math:sqrt", "--points", "points.npy", "--out", "out.h5", "--init", "nocolon",
                      cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "init must be MODULE:FUNCTION" in proc.stderr


def test_submit_carries_init_to_the_job_and_a_bad_one_is_one_line(tmp_path):
    (tmp_path / "initmod.py").write_text(INIT_MODULE)
    np.save(tmp_path / "points.npy", np.arange(20.0))
    env = job_env(MPIMAP_HOME=str(tmp_path / "home"))

    def submit(*args):
        return subprocess.run([sys.executable, "-m", "mpimap", "submit", "initmod.py:scaled", "--points",
                               "points.npy", "--ranks", "3", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=180)

    proc = submit("--name", "bad", "--init", "initmod.py:nosuch")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "nosuch" in proc.stderr
    proc = submit("--name", "st", "--init", "initmod.py:setup", "--wait")
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((tmp_path / "mpimap-jobs" / "st" / "job.json").read_text())
    assert spec["run_options"]["init"] == f"{tmp_path / 'initmod.py'}:setup"
    from mpimap.store import read_results

    results = read_results(str(tmp_path / "mpimap-jobs" / "st" / "results.h5"))
    assert list(results["status"]) == ["done"] * 20
    assert np.array_equal(results["value"], 10.0 * np.arange(20.0))


def test_a_rank_of_another_host_writes_its_hosts_file_from_the_bytes_and_removes_it_when_released():
    """What a rank on another host than the master's does with SHARE and UNSHARE, on real files (no MPI)."""
    from mpimap import shared

    state = {"array": np.arange(100_000.0), "name": "v"}
    handle, published = shared.publish(state)
    data = bytes(published.data)
    published.release()  # as if the master's file were on another host: this host has none yet
    assert shared_files(handle.name) == []
    shared.accept(shared.ShareMessage(handle.name, bytearray(data)))
    shared.accept(shared.ShareMessage(handle.name, bytearray(data)))  # a second rank of this host: file kept
    assert shared_files(handle.name) == [handle.name]
    value = handle.value
    assert value["name"] == "v" and np.array_equal(value["array"], state["array"])
    assert not value["array"].flags.writeable
    shared.release(handle.name)
    assert shared_files(handle.name) == []
    with pytest.raises(RuntimeError, match="was released"):
        handle.value
    assert np.array_equal(value["array"], state["array"])  # a value still held keeps its pages


INLINE_CALLS = []


def inline_init(tag):
    INLINE_CALLS.append((tag, os.getpid()))


def inline_look(args):
    handle, i = args
    return float(handle.value[i]), [tag for tag, pid in INLINE_CALLS if pid == os.getpid()], os.getpid()


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_the_pool_of_one_process_runs_the_initializer_and_shares_too(isolation):
    import mpimap

    with mpimap.Pool(initializer=inline_init, initargs=("one",), isolation=isolation) as pool:
        handle = pool.share(np.arange(10.0) * 2)
        rows = list(pool.map(inline_look, [(handle, i) for i in range(10)]))
        name = handle.name
    assert [value for value, _, _ in rows] == [2.0 * i for i in range(10)]
    assert all(calls == ["one"] for _, calls, _ in rows)
    assert all((pid == os.getpid()) == (isolation == "rank") for _, _, pid in rows)
    assert shared_files(name) == []  # released at shutdown


def test_initargs_that_cannot_travel_are_refused_when_the_pool_is_made_naming_the_initializer(run_script):
    """Not at the first map, as a failure to send the map's function: the initializer is what cannot travel."""
    out = run_script('''
import threading, mpimap
def setup(lock):
    pass
def square(x):
    return x * x
if __name__ == "__main__":
    try:
        mpimap.Pool(initializer=setup, initargs=(threading.Lock(),))
    except TypeError as exc:
        print("REFUSED", exc)
    with mpimap.Pool() as pool:  # the session goes on
        print("THEN", list(pool.map(square, range(4))))
''', ranks=2)
    refused = next(line for line in out.splitlines() if line.startswith("REFUSED"))
    assert "cannot send the pool's initializer setup and its initargs" in refused and "lock" in refused, out
    assert "THEN [0, 1, 4, 9]" in out


def test_an_initializer_of_the_scripts_main_block_travels_by_value(run_script):
    """Found by review: it passed the pickle check by reference, and then every map failed on the workers ("Can't
    get attribute 'setup' on <module '__worker__'>"), which import the script without running its main block."""
    out = run_script('''
import os, mpimap
def tagged(x):
    return os.environ.get("TAG"), x
if __name__ == "__main__":
    def setup(tag):
        os.environ["TAG"] = tag
    with mpimap.Pool(initializer=setup, initargs=("set",)) as pool:
        print("GOT", list(pool.map(tagged, range(3))))
''', ranks=2)
    assert "GOT [('set', 0), ('set', 1), ('set', 2)]" in out, out


def test_a_pool_of_one_process_refuses_them_alike():
    """A pool of one process sends its maps through pickle too (one behaviour everywhere): the same refusal."""
    import threading

    import mpimap

    with pytest.raises(TypeError, match="cannot send the pool's initializer inline_init and its initargs"):
        mpimap.Pool(initializer=inline_init, initargs=(threading.Lock(),))


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_a_pool_of_one_process_never_shut_down_leaves_no_shared_file(tmp_path, isolation):
    """Its files go when the process exits (they stayed until the next master of the user swept them); an
    evaluation process forked from it exits first and leaves them alone."""
    script = tmp_path / "left.py"
    script.write_text(f'''
import numpy as np, mpimap
def look(h, i):
    return float(h.value[i])
pool = mpimap.Pool(isolation="{isolation}")
handle = pool.share(np.arange(10.0))
print(handle.name, list(pool.map(look, [handle] * 3, range(3))), flush=True)
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=job_env())
    assert proc.returncode == 0, proc.stderr
    name, values = proc.stdout.split(" ", 1)
    assert values.strip() == "[0.0, 1.0, 2.0]"
    assert shared_files(name) == []


HELD_ELSEWHERE = '''
import copy, functools, gc, json, time
import numpy as np
import mpimap


def f(h, x):
    return float(h.value[x])


def g(x, data=None):
    time.sleep(0.05)
    return float(data.value[x])


if __name__ == "__main__":
    out = {}
    with mpimap.Pool() as pool:
        # the caller keeps no handle: the partial, submit's keywords and a copy hold it
        it = pool.map(functools.partial(f, pool.share(np.arange(20.0))), range(20))
        gc.collect()
        out["partial"] = list(it)
        futures = [pool.submit(g, i, data=pool.share(np.arange(10.0) * k)) for k, i in enumerate(range(1, 6))]
        gc.collect()
        out["submit"] = [fu.result() for fu in futures]
        config = {"data": pool.share(np.arange(5.0))}
        copied = copy.deepcopy(config)
        del config
        gc.collect()
        out["copy"] = list(pool.map(f, [copied["data"]] * 5, range(5)))
    print("RESULT " + json.dumps(out))
'''


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_handle_held_only_by_a_partial_submit_keywords_or_a_copy_stays_until_its_maps_end(run_script, ranks):
    out = result_of(run_script(HELD_ELSEWHERE, ranks=ranks, timeout=120))
    assert out["partial"] == [float(x) for x in range(20)]
    assert out["submit"] == [float(k * i) for k, i in enumerate(range(1, 6))]
    assert out["copy"] == [float(x) for x in range(5)]
