"""``mpimap run --native LIBRARY:SYMBOL --outputs NY`` (and ``submit``, ``info``) end to end under real mpiexec.

The models are tests/native/model.c (the ``native_model`` fixture): results must equal a serial loop calling the
same function through ctypes, with the C extension and without it (``MPIMAP_NO_EXTENSION=1``), failures too.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import job_env, kill_job, launch, mpimap_cli, wait_rows_done
import mpimap
from mpimap.errors import MpimapError
from mpimap.store import read_results

NATIVE_SIGNATURE = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
EXTENSION = {"with extension": {}, "without extension": {"MPIMAP_NO_EXTENSION": "1"}}


def serial(library: str, symbol: str, points: np.ndarray, outputs: int):
    """The reference: each point through ctypes in a plain loop; (values, codes) with values[i] of NY doubles."""
    fn = getattr(ctypes.CDLL(library), symbol)
    fn.argtypes, fn.restype = NATIVE_SIGNATURE, ctypes.c_int
    rows = np.ascontiguousarray(points, dtype=np.float64).reshape(len(points), -1)
    values, codes = np.full((len(rows), outputs), np.nan), np.zeros(len(rows), int)
    for i, x in enumerate(rows):
        y = np.zeros(outputs)
        codes[i] = fn(x.ctypes.data, len(x), y.ctypes.data, outputs, None)
        values[i] = y
    return values, codes


def chi2_points(n: int = 3000) -> np.ndarray:
    """amplitude, centre, width, background; every 17th width is <= 0, where chi2 returns 3."""
    rng = np.random.default_rng(14)
    points = np.column_stack([rng.uniform(1, 4, n), rng.uniform(-1, 1, n), rng.uniform(0.3, 2, n),
                              rng.uniform(0, 0.5, n)])
    points[::17, 2] *= -1
    points[5::34, 2] = 0.0
    return points


def run(tmp_path, *args, ranks=3, env=None, check=True, timeout=180):
    return mpimap_cli(ranks, "run", *args, cwd=tmp_path, env=job_env(**(env or {})), check=check, timeout=timeout)


def assert_equals_serial(out: str, library: str, symbol: str, points, outputs: int, symbol_codes=None):
    """The results file holds exactly what the serial ctypes loop gives: values of the good points, and each
    failed point recorded as failed with the code the function returned."""
    values, codes = serial(library, symbol, points, outputs)
    r = read_results(out)
    good = codes == 0
    assert list(r["status"][good]) == ["done"] * good.sum()
    stored = np.asarray(list(r["value"][good]), dtype=np.float64).reshape(good.sum(), -1)
    expected = values[good, 0:1] if outputs == 1 else values[good]
    assert stored.shape == expected.shape and np.array_equal(stored, expected)
    for i in np.flatnonzero(~good):
        assert r["status"][i] == "failed"
        assert r["error"][i].startswith(f"NativeError: {symbol} returned {codes[i]}"), r["error"][i]
    return r


@pytest.mark.parametrize("isolation", ["rank", "process"])
@pytest.mark.parametrize("extension", list(EXTENSION))
def test_chi2_equals_the_serial_ctypes_loop(tmp_path, native_model, isolation, extension):
    points = chi2_points()
    np.save(tmp_path / "p.npy", points)
    out = str(tmp_path / "r.h5")
    proc = run(tmp_path, "--native", f"{native_model}:chi2", "--outputs", "1", "--points", "p.npy", "--out", out,
               "--isolation", isolation, env=EXTENSION[extension])
    _, codes = serial(native_model, "chi2", points, 1)
    assert (codes == 3).sum() > 100 and f"{len(points)} of {len(points)}" in proc.stdout
    r = assert_equals_serial(out, native_model, "chi2", points, 1)
    assert r["value"].dtype == np.float64 and r["value"].shape == (len(points),)  # outputs=1: one number a point
    assert r["attrs"]["function"] == f"native:{native_model}:chi2:outputs=1"
    assert set(r["rank"][r["status"] == "done"]) == {1, 2}


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_the_same_results_file_with_and_without_the_extension(tmp_path, native_model, isolation):
    points = chi2_points(1000)
    np.save(tmp_path / "p.npy", points)
    files = {}
    for extension, env in EXTENSION.items():
        files[extension] = out = str(tmp_path / f"{extension}.h5")
        run(tmp_path, "--native", f"{native_model}:chi2", "--outputs", "1", "--points", "p.npy", "--out", out,
            "--isolation", isolation, env=env)
    a, b = (read_results(f) for f in files.values())
    assert np.array_equal(a["value"], b["value"], equal_nan=True)
    assert list(a["status"]) == list(b["status"]) and list(a["error"]) == list(b["error"])
    assert "failed" in set(a["status"])


@pytest.mark.parametrize("extension", list(EXTENSION))
def test_several_outputs_and_a_point_per_row_of_any_width(tmp_path, native_model, extension):
    """stats writes (sum, product, nx, -1): nx is the width of a row of the points file; a 1-column CSV gives 1."""
    wide = np.arange(1.0, 601.0).reshape(200, 3) / 100
    np.save(tmp_path / "wide.npy", wide)
    (tmp_path / "one.csv").write_text("x\n" + "\n".join(str(v) for v in np.linspace(-2, 2, 150)) + "\n")
    for name, points in (("wide.npy", wide), ("one.csv", np.linspace(-2, 2, 150).reshape(-1, 1))):
        out = str(tmp_path / f"{name}.h5")
        run(tmp_path, "--native", f"{native_model}:stats", "--outputs", "4", "--points", name, "--out", out,
            env=EXTENSION[extension])
        r = assert_equals_serial(out, native_model, "stats", points, 4)
        assert r["value"].shape == (len(points), 4) and set(r["value"][:, 2]) == {float(points.shape[1])}


@pytest.mark.parametrize("isolation", ["process", "fresh"])
@pytest.mark.parametrize("extension", list(EXTENSION))
def test_a_crash_a_loop_and_error_codes_are_recorded_and_the_rest_finish(tmp_path, native_model, extension,
                                                                         isolation):
    """misbehave: 13 segfaults, 7 loops for ever, a negative x returns -x; the same records either way."""
    points = np.arange(1.0, 41.0)
    points[[3, 25]] = [-3.0, -9.0]
    np.save(tmp_path / "p.npy", points)
    out = str(tmp_path / "r.h5")
    run(tmp_path, "--native", f"{native_model}:misbehave", "--outputs", "1", "--points", "p.npy", "--out", out,
        "--isolation", isolation, "--point-timeout", "5", "--quarantine", "1", "--chunksize", "4",
        env=EXTENSION[extension])
    r = read_results(out)
    status = dict(enumerate(r["status"]))
    assert status.pop(12) == "crashed" and r["error"][12].startswith("Crash:") and "SIGSEGV" in r["error"][12]
    assert status.pop(6) == "timeout" and r["error"][6].startswith("Timeout:")
    assert status.pop(3) == "failed" and r["error"][3].startswith("NativeError: misbehave returned 3")
    assert status.pop(25) == "failed" and r["error"][25].startswith("NativeError: misbehave returned 9")
    assert set(status.values()) == {"done"}
    done = r["status"] == "done"
    assert np.array_equal(r["value"][done], points[done] ** 2)


def test_a_resume_after_kill_9_mid_run_gives_every_point_once(tmp_path, native_model):
    """A point loops for ever, so the job is certainly mid-run (points done, in flight and pending) at the kill;
    the same command with --point-timeout resumes it: the stored points are kept, the others evaluated once."""
    n = 300
    points = np.arange(20.0, 20.0 + n)
    points[120] = 7.0  # misbehave loops for ever
    np.save(tmp_path / "p.npy", points)
    out = str(tmp_path / "r.h5")
    args = ["-m", "mpimap", "run", "--native", f"{native_model}:misbehave", "--outputs", "1", "--points", "p.npy",
            "--out", out, "--chunksize", "10", "--flush-interval", "0.1", "--quarantine", "1"]
    job = launch(2, *args, cwd=tmp_path, env=job_env(), start_new_session=True, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    try:
        done = wait_rows_done(str(out), 120)
        time.sleep(1)  # the job is stuck on row 120 for ever: nothing more arrives
        assert job.poll() is None and done == 120
    finally:
        kill_job(job)
        job.communicate(timeout=60)
    partial = read_results(out)
    stored = np.flatnonzero(partial["status"] == "done")
    assert list(stored) == list(range(120)) and (partial["status"][120:] == "pending").all()
    proc = mpimap_cli(2, *args[2:], "--point-timeout", "3", cwd=tmp_path, timeout=180)
    assert f"plus {len(stored)} from earlier runs" in proc.stdout
    final = read_results(out)
    assert final["status"][120] == "timeout"
    done = np.flatnonzero(final["status"] == "done")
    assert list(done) == [i for i in range(n) if i != 120]
    assert np.array_equal(final["value"][done], points[done] ** 2)
    assert np.array_equal(final["value"][stored], partial["value"][stored])  # nothing stored was rewritten
    assert (final["run"][stored] == 0).all() and (final["run"][121:] == 1).all()
    assert (final["attempts"][done] == 1).all()  # every point evaluated once


def one_line_error(proc, *words) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpimap: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


BAD_INPUTS = {
    "missing library": (["--native", "./nosuch.so:chi2", "--outputs", "1"], ["nosuch.so", "not found"]),
    "missing symbol": (["--native", "LIB:nosuch", "--outputs", "1"], ["has no function 'nosuch'"]),
    "not a shared object": (["--native", "./text.so:chi2", "--outputs", "1"], ["cannot load native library",
                                                                               "text.so"]),
    "no --outputs": (["--native", "LIB:chi2"], ["needs outputs", "--outputs NY"]),
    "--outputs 0": (["--native", "LIB:chi2", "--outputs", "0"], ["--outputs", "1 or more", "not 0"]),
    "--outputs -2": (["--native", "LIB:chi2", "--outputs", "-2"], ["--outputs", "1 or more", "not -2"]),
    "function and --native": (["jobfuncs:square", "--native", "LIB:chi2", "--outputs", "1"],
                              ["either FUNCTION (jobfuncs:square) or --native", "not both"]),
    "--outputs without --native": (["jobfuncs:square", "--outputs", "2"], ["--outputs", "goes with", "--native"]),
    "--native without :symbol": (["--native", "LIB", "--outputs", "1"], ["LIBRARY:SYMBOL", "libmodel.so'"]),
    "--ranks-per-task 2": (["--native", "LIB:chi2", "--outputs", "1", "--isolation", "rank", "--ranks-per-task", "2"],
                           ["ranks_per_task=2", "native model", "leave it out"]),
    "no function at all": ([], ["missing FUNCTION", "--native LIBRARY:SYMBOL --outputs NY"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_damages_nothing_stored(tmp_path, native_model, case):
    args, words = BAD_INPUTS[case]
    args = [a.replace("LIB", native_model) for a in args]
    (tmp_path / "text.so").write_text("not a shared object\n")
    np.save(tmp_path / "p.npy", chi2_points(40))
    out = str(tmp_path / "r.h5")
    run(tmp_path, "--native", f"{native_model}:chi2", "--outputs", "1", "--points", "p.npy", "--out", out, ranks=2)
    before = open(out, "rb").read()
    proc = run(tmp_path, *args, "--points", "p.npy", "--out", out, ranks=2, check=False, timeout=60)
    one_line_error(proc, *words)
    assert proc.returncode == 2
    assert open(out, "rb").read() == before and not os.path.exists(out + ".lock")


BAD_CONSTRUCTORS = {
    "exits": ("exit(3);", "(exit status 3)"),
    "exits with 0": ("exit(0);", "(exit status 0)"),  # found by review: a status of 0 passed for "loaded"
    "crashes": ("raise(SIGSEGV);", "(signal SIGSEGV)"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTORS))
def test_a_library_whose_initialisation_ends_the_process_is_one_line_not_a_silent_end(tmp_path, case):
    """Loading the library ran its constructor in the CLI's own process: an exit ended the run without a word."""
    body, words = BAD_CONSTRUCTORS[case]
    (tmp_path / "bad.c").write_text("#include <signal.h>\n#include <stdlib.h>\n#include <stdint.h>\n"
                                    f"__attribute__((constructor)) static void boom(void) {{ {body} }}\n"
                                    "int f(const double *x, int64_t nx, double *y, int64_t ny, void *ctx)"
                                    " { y[0] = x[0]; return 0; }\n")
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", str(tmp_path / "libbad.so"),
                    str(tmp_path / "bad.c")], check=True, timeout=120)
    np.save(tmp_path / "p.npy", np.arange(4.0).reshape(4, 1))
    proc = run(tmp_path, "--native", "./libbad.so:f", "--outputs", "1", "--points", "p.npy", "--out", "r.h5",
               ranks=2, check=False, timeout=120)
    one_line_error(proc, "loading native library", "libbad.so", "ends the process", words)
    assert proc.returncode == 2 and not (tmp_path / "r.h5").exists()


def test_a_resume_with_another_native_function_or_outputs_is_refused_in_one_line(tmp_path, native_model):
    np.save(tmp_path / "p.npy", chi2_points(40))
    out = str(tmp_path / "r.h5")
    run(tmp_path, "--native", f"{native_model}:stats", "--outputs", "4", "--points", "p.npy", "--out", out, ranks=2)
    before = open(out, "rb").read()
    for symbol, outputs in (("chi2", "4"), ("stats", "3")):
        proc = run(tmp_path, "--native", f"{native_model}:{symbol}", "--outputs", outputs, "--points", "p.npy",
                   "--out", out, ranks=2, check=False)
        assert one_line_error(proc) == (
            f"mpimap: error: {out} holds results of native:{native_model}:stats:outputs=4, not "
            f"native:{native_model}:{symbol}:outputs={outputs}; use another --out, or --fresh to start over")
    proc = run(tmp_path, "jobfuncs:square", "--points", "p.npy", "--out", out, ranks=2, check=False)
    one_line_error(proc, "holds results of native:", "not jobfuncs:square")
    assert open(out, "rb").read() == before
    # The same model named by a relative path is the same job: it resumes (nothing left to do).
    proc = run(tmp_path, "--native", f"{os.path.relpath(native_model, tmp_path)}:stats", "--outputs", "4",
               "--points", "p.npy", "--out", out, ranks=2)
    assert "plus 40 from earlier runs" in proc.stdout


# -- submit ----------------------------------------------------------------------------------------------------------
def cli(tmp_path, *args, env=None, timeout=120):
    """``python -m mpimap ARGS`` outside mpiexec, as a user types it (an mpimap home of the test's own)."""
    return subprocess.run([sys.executable, "-m", "mpimap", *args], cwd=tmp_path, capture_output=True, text=True,
                          env=job_env(MPIMAP_HOME=str(tmp_path / "home"), **(env or {})), timeout=timeout)


def test_submit_native_runs_the_job_to_results_equal_to_the_serial_loop(tmp_path, native_model):
    points = chi2_points(500)
    np.save(tmp_path / "p.npy", points)
    relative = os.path.relpath(native_model, tmp_path)
    script = cli(tmp_path, "submit", "--native", f"{relative}:chi2", "--outputs", "1", "--points", "p.npy",
                 "--dry-run")
    assert script.returncode == 0 and "-m mpimap run --job" in script.stdout, script.stderr
    proc = cli(tmp_path, "submit", "--native", f"{relative}:chi2", "--outputs", "1", "--points", "p.npy",
               "--ranks", "3", "--point-timeout", "30", "--dir", "job", "--wait", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job chi2-" in proc.stdout  # named after the symbol
    spec = json.loads((tmp_path / "job" / "job.json").read_text())
    assert spec["function"] == "" and spec["run_options"] == {"native": f"{native_model}:chi2", "outputs": 1,
                                                              "point_timeout": 30.0}
    assert_equals_serial(str(tmp_path / "job" / "results.h5"), native_model, "chi2", points, 1)


@pytest.mark.parametrize("args,words", [
    (["--native", "LIB:chi2"], ["needs outputs"]),
    (["--native", "LIB:nosuch", "--outputs", "1"], ["has no function 'nosuch'"]),
    (["jobfuncs:square", "--native", "LIB:chi2", "--outputs", "1"], ["not both"]),
    (["jobfuncs:square", "--outputs", "1"], ["goes with"]),
], ids=["no outputs", "missing symbol", "function and native", "outputs without native"])
def test_submit_native_bad_input_is_one_line_and_creates_nothing(tmp_path, native_model, args, words):
    np.save(tmp_path / "p.npy", chi2_points(10))
    proc = cli(tmp_path, "submit", *[a.replace("LIB", native_model) for a in args], "--points", "p.npy")
    one_line_error(proc, *words)
    assert not (tmp_path / "mpimap-jobs").exists()


def test_submit_from_python_takes_a_native_model_object(tmp_path, native_model, monkeypatch):
    import mpimap
    from mpimap.jobs import submit

    monkeypatch.setenv("MPIMAP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    points = np.arange(24.0).reshape(8, 3)
    np.save(tmp_path / "p.npy", points)
    job = submit(mpimap.native(native_model, "stats", outputs=4), "p.npy", directory="job")
    assert job.spec().function == "" and job.spec().run_options == {"native": f"{native_model}:stats", "outputs": 4}
    deadline = time.monotonic() + 120
    seen = []
    while (state := job.state()) not in ("done", "failed", "cancelled", "interrupted") and time.monotonic() < deadline:
        seen.append(state)
        time.sleep(0.5)
    # Seen once in CI: 'running' after the job's files all said done (not reproduced): say all there is if again.
    files = {name: (tmp_path / "job" / name).read_text() for name in ("status.json", "batch.json", "job.log")
             if (tmp_path / "job" / name).exists()}
    assert state == "done", (state, seen[-5:], job.last_run(), job.batch_view(), files)
    assert_equals_serial(str(tmp_path / "job" / "results.h5"), native_model, "stats", points, 4)
    # A context cannot travel in a job spec: refused in one line, nothing created.
    with pytest.raises(MpimapError, match="cannot be named for a job"):
        submit(mpimap.native(native_model, "stats", outputs=4, context=b"12345678"), "p.npy", directory="job2")
    assert not (tmp_path / "job2").exists()


def test_a_job_spec_without_native_options_still_runs(tmp_path):
    """job.json of an mpimap from before --native: no native/outputs among its run options."""
    np.save(tmp_path / "p.npy", np.arange(12.0))
    proc = cli(tmp_path, "submit", "jobfuncs:square", "--points", "p.npy", "--dir", "job", "--retries", "1",
               "--wait", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = json.loads((tmp_path / "job" / "job.json").read_text())
    assert spec["run_options"] == {"retries": 1}
    r = read_results(str(tmp_path / "job" / "results.h5"))
    assert np.array_equal(r["value"], np.arange(12.0) ** 2)


# -- info ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extension", list(EXTENSION))
def test_info_names_the_versions_and_whether_the_extension_is_in_use(tmp_path, extension):
    import h5py
    import mpi4py
    import numpy

    import mpimap

    env = EXTENSION[extension]
    proc = cli(tmp_path, "info", env=env, timeout=60)  # outside mpiexec: must not wait for a launcher
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["mpimap", "Python", "mpi4py", "numpy", "h5py", "C"]
    assert lines[0].startswith(f"mpimap {mpimap.__version__} (")
    assert lines[1].startswith(f"Python {sys.version.split()[0]} ({sys.executable})")
    assert lines[2].startswith(f"mpi4py {mpi4py.__version__}, MPI ") and ("MPICH" in lines[2] or "Open MPI" in lines[2])
    assert lines[3] == f"numpy {numpy.__version__}"
    assert lines[4] == f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}"
    if env:
        assert lines[5] == "C extension: off (MPIMAP_NO_EXTENSION=1): pure Python"
    else:
        assert lines[5].startswith("C extension: in use (") and "_native" in lines[5]
    as_json = json.loads(cli(tmp_path, "info", "--json", env=env, timeout=60).stdout)
    assert as_json["extension"] is (not env) and as_json["extension_line"] == lines[5]
    assert as_json["mpimap"] == mpimap.__version__ and as_json["hdf5"] == h5py.version.hdf5_version
    under_mpiexec = mpimap_cli(2, "info", cwd=tmp_path, env=job_env(**env), timeout=60)
    assert under_mpiexec.stdout.splitlines() == lines


def test_info_says_when_the_extension_is_not_built(tmp_path):
    """As on a machine without a C compiler at install time: mpimap._native cannot be imported."""
    code = "import sys; sys.modules['mpimap._native'] = None; from mpimap.cli import main; sys.exit(main(['info']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=job_env(),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "C extension: not built (no C compiler when mpimap was installed?): pure Python"


def test_info_says_when_the_extension_is_built_but_does_not_load(tmp_path):
    """An extension that is there but fails to import (built for another Python or MPI) is named with its error."""
    package = tmp_path / "mpimap"
    shutil.copytree(os.path.dirname(mpimap.__file__), package, ignore=shutil.ignore_patterns("_native*", "__pycache__"))
    (package / "_native.py").write_text("raise ImportError('undefined symbol: PyFoo')\n")
    code = "from mpimap import native_models as n; print(n.describe())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**job_env(), "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "C extension: built but does not load (undefined symbol: PyFoo): pure Python"
