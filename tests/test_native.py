"""Native models (``mpimap.native``): the C extension's loop and the ctypes fallback give the same values and the same
failures as a serial loop; crashes and hangs are contained like any point's; bad input is one line."""

import ctypes
import json
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest

from mpimap import native_models as native_module
from mpimap.native_models import NativeError, NativeFunction, native

EXTENSION = pytest.param("1", id="extension", marks=pytest.mark.skipif(native_module.extension is None,
                                                                       reason="the C extension is not built here"))
WAYS = [EXTENSION, pytest.param("0", id="ctypes")]


def chi2_points(n: int = 600) -> np.ndarray:
    """Random parameters of the Gaussian model; every 37th point has a width <= 0 (the model returns 3)."""
    points = np.random.default_rng(7).uniform([0.5, -1, 0.2, 0], [4, 1, 2, 0.5], size=(n, 4))
    points[::37, 2] *= -1
    return points


def serial(fn: NativeFunction, points):
    """What a plain loop calling the function point by point through ctypes gives: values, and errors by index."""
    values, errors = [], {}
    for i, point in enumerate(points):
        try:
            values.append(fn(point))
        except NativeError as exc:
            values.append(None)
            errors[i] = f"NativeError: {exc}"
    return values, errors


SCRIPT = '''
import json, sys
import numpy as np
import mpimap
from mpimap import native_models as native

def extension_in_use(_):
    return native.extension is not None

if __name__ == "__main__":
    library, isolation = sys.argv[1], sys.argv[2]
    chi2 = native.native(library, "chi2")
    stats = native.native(library, "stats", outputs=4, context=np.array([2.5]))
    points = np.load("points.npy")
    with mpimap.Pool() as pool:
        used = sorted(set(pool.map(extension_in_use, range(8), chunksize=1)))
        mapped = list(pool.map(chi2, points, isolation=isolation, on_error="record"))
        chunks = list(pool.imap_chunks(chi2, points, isolation=isolation, chunksize=50))
        packed = [None] * len(points)
        for chunk in chunks:
            kept = chunk.delivered()
            for offset, value in zip(chunk.offsets(), kept.values):
                packed[chunk.start + offset] = None if offset in kept.failures else float(value)
        rows = [list(v) for v in pool.map(stats, [[1.0, 2.0], [3.0, 4.0, 5.0]], isolation=isolation)]
        rows += [list(v) for v in pool.map(stats, [1.0, 3.0], [2.0, 4.0], isolation=isolation)]
    print("RESULT " + json.dumps(dict(
        used=used, rows=rows, packed=packed,
        values=[v if isinstance(v, float) else None for v in mapped],
        errors={i: f"{type(v).__name__}: {v}" for i, v in enumerate(mapped) if isinstance(v, Exception)})))
'''


def result_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_values_and_failures_equal_a_serial_ctypes_loop_with_and_without_the_extension(run_script, tmp_path,
                                                                                      native_model, isolation):
    points = chi2_points()
    np.save(tmp_path / "points.npy", points)
    want_values, want_errors = serial(native(native_model, "chi2"), points)
    assert want_errors and len(want_errors) < len(points)
    outs = {}
    ways = ["0"] + (["1"] if native_module.extension is not None else [])
    for way in ways:
        env = dict(os.environ, MPIMAP_NO_EXTENSION="" if way == "1" else "1")
        out = outs[way] = result_of(run_script(SCRIPT, args=(native_model, isolation), env=env, timeout=180))
        assert out["used"] == [way == "1"]  # the workers evaluated with the extension, or without it
        assert out["values"] == want_values  # exactly: the same function on the same doubles
        assert {int(k): v for k, v in out["errors"].items()} == want_errors
        assert out["packed"] == want_values
        assert out["rows"] == [[3.0, 2.0, 2.0, 2.5], [12.0, 60.0, 3.0, 2.5], [3.0, 2.0, 2.0, 2.5], [7.0, 12.0, 2.0, 2.5]]
    if len(outs) == 2:
        assert outs["0"] == {**outs["1"], "used": [False]}


def test_one_point_called_directly_and_the_function_pickled(native_model):
    chi2 = native(native_model, "chi2")
    assert chi2([3.0, 0.5, 1.2, 0.2]) == pytest.approx(0.1015, abs=1e-9)
    with pytest.raises(NativeError, match="chi2 returned 3") as info:
        chi2([3.0, 0.5, -1.0, 0.2])
    assert info.value.code == 3
    again = pickle.loads(pickle.dumps(chi2))
    assert again.spec == chi2.spec == f"native:{native_model}:chi2:outputs=1"
    assert again([1.0, 0.0, 1.0, 0.0]) == chi2([1.0, 0.0, 1.0, 0.0])
    stats = native(native_model, "stats", outputs=4, context=np.array([-7.5]))
    assert list(pickle.loads(pickle.dumps(stats))([2.0, 3.0])) == [5.0, 6.0, 2.0, -7.5]
    assert list(native(native_model, "stats", outputs=4)([2.0])) == [2.0, 2.0, 1.0, -1.0]  # no context: NULL
    assert list(stats(2.0, 3.0)) == list(stats([2.0, 3.0]))  # as Pool.map(f, xs, ys) calls it
    every_other = np.array([4.5, 0.0, 9.0])[::2]  # not contiguous: copied in order
    assert native(os.fsencode(native_model), "stats", outputs=4, context=every_other)([1.0])[3] == 4.5


def test_function_pointers_of_ctypes_and_cffi_name_their_library_and_symbol(native_model):
    lib = ctypes.CDLL(native_model)
    from_ctypes = native(lib.chi2)
    assert (from_ctypes.library, from_ctypes.symbol) == (os.path.abspath(native_model), "chi2")
    assert native(ctypes.cast(lib.chi2, ctypes.c_void_p).value).symbol == "chi2"
    cffi = pytest.importorskip("cffi")
    ffi = cffi.FFI()
    ffi.cdef("int chi2(const double *x, int64_t nx, double *y, int64_t ny, void *ctx);"
             "int stats(double *x, double nx); int misbehave(double *x, long nx, double *y, long ny, void *ctx);")
    clib = ffi.dlopen(native_model)
    from_cffi = native(clib.chi2)
    assert from_cffi.symbol == "chi2" and from_cffi([1.0, 0.0, 1.0, 0.0]) == from_ctypes([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="another signature"):
        native(clib.stats)
    assert native(clib.misbehave)([3.0]) == 9.0  # long is int64_t here


def test_a_numba_cfunc_is_found_again_on_the_workers(run_script, tmp_path, native_model):
    pytest.importorskip("numba")
    (tmp_path / "nbmodel.py").write_text(textwrap.dedent('''
        from numba import cfunc, types, carray

        @cfunc(types.int32(types.CPointer(types.float64), types.int64, types.CPointer(types.float64), types.int64,
                           types.voidptr))
        def square_sum(x, nx, y, ny, ctx):
            xs = carray(x, (nx,))
            total = 0.0
            for v in xs:
                total += v * v
            y[0] = total
            return 0 if total < 100 else 9

        @cfunc(types.float64(types.float64))
        def wrong(x):
            return x
    '''))
    out = result_of(run_script('''
import json, sys
sys.path.insert(0, ".")
import mpimap
import nbmodel

if __name__ == "__main__":
    f = mpimap.native(nbmodel.square_sum)
    with mpimap.Pool() as pool:
        values = list(pool.map(f, [[1.0, 2.0], [3.0, 4.0], [10.0, 1.0]], on_error="record"))
    print("RESULT " + json.dumps([v if isinstance(v, float) else str(v) for v in values]))
''', timeout=240))
    assert out == [5.0, 25.0, "square_sum returned 9"]
    sys.path.insert(0, str(tmp_path))
    try:
        import nbmodel

        with pytest.raises(ValueError, match="signature"):
            native(nbmodel.wrong)
    finally:
        sys.path.remove(str(tmp_path))


CONTAINED = '''
import json, sys
import mpimap
from mpimap import native_models as native

if __name__ == "__main__":
    f = native.native(sys.argv[1], "misbehave")
    points = [1.0, 13.0, 2.0, 7.0, 3.0, -4.0] + [float(v) for v in range(20, 60)]
    with mpimap.Pool() as pool:
        out = list(pool.map(f, points, isolation=sys.argv[2], point_timeout=3, max_points=5, chunksize=4,
                            on_error="record"))
    print("RESULT " + json.dumps([v if isinstance(v, float) else type(v).__name__ for v in out]))
'''


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("isolation", ["process", "fresh"])
def test_a_native_point_that_crashes_or_loops_fails_alone_and_the_rest_finish(run_script, native_model, way,
                                                                            isolation):
    env = dict(os.environ, MPIMAP_NO_EXTENSION="" if way == "1" else "1")
    out = result_of(run_script(CONTAINED, args=(native_model, isolation), env=env, timeout=180))
    assert out == [1.0, "PointCrashed", 4.0, "PointTimeout", 9.0, "NativeError"] + [v * v for v in range(20, 60)]


def test_cancelling_a_map_stops_a_rank_inside_a_long_native_chunk(run_script, native_model):
    """In rank isolation the loop returns every time slice, so the rank takes the cancel and drops its chunk: the
    next map starts at once instead of after the 20 s the chunk would take."""
    out = result_of(run_script('''
import json, sys, time
import mpimap
from mpimap import native_models as native

def rank(_):
    return 1

if __name__ == "__main__":
    f = native.native(sys.argv[1], "nap")
    with mpimap.Pool() as pool:
        it = pool.imap_unordered(f, [0.1] * 400, chunksize=200)
        time.sleep(1.5)
        t0 = time.monotonic()
        it.close()
        later = list(pool.map(rank, range(4)))
        print("RESULT " + json.dumps(dict(later=later, seconds=time.monotonic() - t0)), flush=True)
''', args=(native_model,), timeout=120))
    assert out["later"] == [1] * 4
    assert out["seconds"] < 10  # not the 18.5 s left of each rank's chunk


def test_bad_input_is_one_line(tmp_path, native_model):
    (tmp_path / "notlib.so").write_text("not a library")
    cases = [
        (lambda: native(str(tmp_path / "missing.so"), "chi2"), "not found: no such file"),
        (lambda: native("libmissing.so", "chi2"), "not found: give its path"),
        (lambda: native(str(tmp_path / "notlib.so"), "chi2"), "cannot load native library"),
        (lambda: native(str(tmp_path), "chi2"), "is a directory: give the path of the shared library"),
        (lambda: native(native_model, "nosuch"), "has no function 'nosuch'"),
        (lambda: native(native_model, "not_exported_but_data"), "is data, not a function"),
        (lambda: native(ctypes.addressof(ctypes.c_int.in_dll(ctypes.CDLL(native_model), "not_exported_but_data"))),
         "not an exported function of a shared library"),
        (lambda: native(native_model), "give the function's name"),
        (lambda: native(native_model, "chi2", outputs=0), "outputs must be a whole number from 1 to"),
        (lambda: native(native_model, "chi2", outputs=1.5), "outputs must be a whole number from 1 to"),
        (lambda: native(native_model, "chi2", outputs=10 ** 12), "outputs must be a whole number from 1 to"),
        (lambda: native(native_model, "chi2", outputs=True), "outputs must be a whole number from 1 to"),
        (lambda: native(native_model, 3), "symbol must be the function's name"),
        (lambda: native(native_model, "chi2\0x"), "symbol must be the function's name"),
        (lambda: native(native_model, "chi2", context=3.0), "context must be bytes or a buffer"),
        (lambda: native(print), "not builtin_function_or_method"),
        (lambda: native(12345), "not an exported function of a shared library"),
    ]
    lib = ctypes.CDLL(native_model)
    wrong = lib.stats
    wrong.argtypes = (ctypes.c_double, ctypes.c_int64)
    cases.append((lambda: native(wrong), "declared with another signature"))
    wrong_result = ctypes.CDLL(native_model).chi2
    wrong_result.restype = ctypes.c_double
    cases.append((lambda: native(wrong_result), "declared with another signature"))
    for make, message in cases:
        with pytest.raises(ValueError) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_points_that_are_not_rows_of_numbers_fail_alone_with_why(run_script, native_model):
    out = result_of(run_script('''
import json, sys
import mpimap
from mpimap import native_models as native

if __name__ == "__main__":
    f = native.native(sys.argv[1], "stats", outputs=2)
    with mpimap.Pool() as pool:
        out = list(pool.map(f, [[1.0, 2.0], "ab", [3.0], [[1.0]], [None, 1.0], 10 ** 400, "1.5", [1j]], chunksize=8,
                            on_error="record"))
    print("RESULT " + json.dumps([list(v) if not isinstance(v, Exception) else str(v) for v in out]))
''', args=(native_model,), timeout=120))
    assert out[0] == [3.0, 2.0] and out[2] == [3.0, 3.0]
    assert out[3] == [1.0, 1.0]  # a nested list of numbers is flattened into one row, as numpy reads it
    # never NaN for None, a parsed string, a truncated complex or an overflow: each fails alone, saying why
    for k, example in ((1, "'ab'"), (4, "None"), (5, str(10 ** 400)[:20]), (6, "'1.5'"), (7, "1j")):
        assert out[k].startswith("a native function's point must be real numbers") and example in out[k], out[k]


def test_info_line_says_whether_the_extension_is_in_use(monkeypatch):
    assert native_module.describe().startswith("C extension: ")
    import subprocess

    off = subprocess.run([sys.executable, "-c", "from mpimap import native_models; print(native_models.describe())"],
                         env=dict(os.environ, MPIMAP_NO_EXTENSION="1"), capture_output=True, text=True, timeout=60)
    assert off.stdout.strip() == "C extension: off (MPIMAP_NO_EXTENSION=1): pure Python"


@pytest.mark.parametrize("isolation", ["rank", "process"])
def test_a_pause_holds_back_native_chunks_and_resume_finishes_them(run_script, native_model, isolation):
    """While paused, the points in flight finish and no more start; after resume, every value is there."""
    out = result_of(run_script('''
import json, sys, time
import mpimap

if __name__ == "__main__":
    f = mpimap.native(sys.argv[1], "nap")
    with mpimap.Pool(isolation=sys.argv[2]) as pool:
        futures = [pool.submit(f, [0.2]) for _ in range(30)]
        while sum(x.done() for x in futures) < 2:
            time.sleep(0.05)
        pool.pause()
        time.sleep(1.5)  # what was in flight when paused ends within this
        first = sum(x.done() for x in futures)
        time.sleep(2)
        second = sum(x.done() for x in futures)
        pool.resume()
        values = [x.result(timeout=120) for x in futures]
    print("RESULT " + json.dumps(dict(first=first, second=second, values=values)))
''', args=(native_model, isolation), timeout=180))
    assert out["first"] == out["second"] < 30
    assert out["values"] == [0.2] * 30


CANCEL = '''
import json, sys, time
import mpimap

def one(_):
    return 1

if __name__ == "__main__":
    f = mpimap.native(sys.argv[1], "nap")
    points = [float(v) for v in sys.argv[3].split(",")]
    with mpimap.Pool(isolation=sys.argv[2]) as pool:
        it = pool.imap_unordered(f, points * 2, chunksize=len(points))  # a chunk for each of the two ranks
        time.sleep(2)
        t0 = time.monotonic()
        it.close()
        later = list(pool.map(one, range(4)))
        print("RESULT " + json.dumps(dict(later=later, seconds=time.monotonic() - t0)), flush=True)
'''


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("isolation, points", [
    # fast points first, then slow ones: an untimed loop must still end its slice on time
    ("rank", ",".join(["0"] * 20479 + ["0.005"] * 4000)),
    # one child per point: the rank takes the cancel between two children, not at the end of the chunk
    ("fresh", ",".join(["0.005"] * 2000)),
])
def test_a_cancel_reaches_a_rank_within_a_slice_whatever_the_points(run_script, native_model, way, isolation, points):
    env = dict(os.environ, MPIMAP_NO_EXTENSION="" if way == "1" else "1")
    out = result_of(run_script(CANCEL, args=(native_model, isolation, points), env=env, timeout=180))
    assert out["later"] == [1] * 4 and out["seconds"] < 8  # not the rest of the chunk (18 s; 20 s or more)


def test_a_library_that_does_not_load_on_the_workers_fails_each_point_with_why(run_script, tmp_path, native_model):
    """The rank survives, each point fails with the loader's error, and the next map runs."""
    out = result_of(run_script('''
import json, os, shutil, sys
import mpimap

def one(_):
    return 1

if __name__ == "__main__":
    shutil.copy(sys.argv[1], "gone.so")
    f = mpimap.native("./gone.so", "chi2")  # checked here, where it loads
    os.remove("gone.so")
    with mpimap.Pool() as pool:
        failed = [str(v) for v in pool.map(f, [[1.0, 0.0, 1.0, 0.0]] * 6, on_error="record")]
        later = list(pool.map(one, range(4)))
    print("RESULT " + json.dumps(dict(failed=failed, later=later)))
''', args=(native_model,), timeout=120))
    assert all("cannot load native library" in text and "gone.so" in text for text in out["failed"]), out["failed"]
    assert out["later"] == [1] * 4
