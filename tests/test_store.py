"""The results file on its own: layout details, recovery after a killed writer, format checks."""

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpimap import store as store_module
from mpimap.errors import MpimapError
from mpimap.failures import Failure
from mpimap.store import ResultStore, _lookup3, read_results


def test_lookup3_matches_hdf5_superblock_checksum(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f["x"] = np.arange(3)
    block = path.read_bytes()[:48]
    assert int.from_bytes(block[44:48], "little") == _lookup3(block[:44])


def test_values_that_do_not_fit_fail_that_point_only(tmp_path):
    pts = np.arange(4.0)
    store = ResultStore.open(str(tmp_path / "r.h5"), pts, "m:f")
    idx = np.arange(4)
    store.write(idx[:2], [np.zeros(2), np.ones(2)], {}, np.zeros(2), 1, "h")
    store.write(idx[2:], [np.ones(3), np.ones(2)], {}, np.zeros(2), 1, "h")
    store.close("complete")
    r = read_results(str(tmp_path / "r.h5"))
    assert list(r["status"]) == ["done", "done", "failed", "done"]
    assert r["error"][2].startswith("StoreError: result of type ndarray and shape (3,) does not fit")


def test_failures_and_values_in_one_chunk(tmp_path):
    store = ResultStore.open(str(tmp_path / "r.h5"), np.arange(3.0), "m:f")
    failure = Failure.from_exception(KeyError("k"))
    store.write(np.arange(3), [1.5, None, 2.5], {1: failure}, np.array([0.1, 0.2, 0.3]), 2, "node7")
    store.close("complete")
    r = read_results(str(tmp_path / "r.h5"))
    assert list(r["status"]) == ["done", "failed", "done"]
    assert r["value"][0] == 1.5 and r["value"][2] == 2.5 and np.isnan(r["value"][1])
    assert r["error"][1].startswith("KeyError: 'k'") and list(r["host"]) == ["node7"] * 3


WRITER = '''
import sys, numpy as np
from mpimap.store import ResultStore
store = ResultStore.open(sys.argv[1], np.arange(1000.0), "m:f", flush_interval=0)
for start in range(0, 600, 100):
    idx = np.arange(start, start + 100)
    store.write(idx, idx * 2.0, {}, np.zeros(100), 1, "h")
print("written", flush=True)
sys.stdin.read()
'''


def test_resume_after_the_writer_was_killed(tmp_path):
    path = str(tmp_path / "r.h5")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "written"
    with h5py.File(path, "r", swmr=True) as f:  # readable while the writer lives
        assert (f["status"][()] == 1).sum() == 600
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    assert (read_results(path)["status"] == "done").sum() == 600  # readable after the kill
    store = ResultStore.open(path, np.arange(1000.0), "m:f")  # clears the flags the kill left
    todo = store.todo()
    assert list(todo) == list(range(600, 1000))
    store.write(todo, todo * 2.0, {}, np.zeros(400), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert np.array_equal(r["value"], np.arange(1000.0) * 2) and r["attrs"]["runs"] == 2
    with h5py.File(path, "r") as f:  # a plain reader is fine once the job has closed the file
        assert f.attrs["state"] == "complete"


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    path = str(tmp_path / "r.h5")
    ResultStore.open(path, np.arange(3.0), "m:f").close("complete")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(MpimapError, match="written by a newer mpimap"):
        ResultStore.open(path, np.arange(3.0), "m:f")
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(MpimapError, match="not an mpimap results file"):
        ResultStore.open(other, np.arange(3.0), "m:f")


def test_later_values_widen_the_column_instead_of_being_cast(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(8.0), "m:f", flush_interval=0)  # every write reaches the file
    store.write(np.array([0]), np.array([0]), {}, np.zeros(1), 1, "h")  # an int first: the file's column is float64
    store.write(np.array([1, 2]), np.array([1 / 3, 2 / 3]), {}, np.zeros(2), 1, "h")
    store.write(np.array([3]), [1 + 2j], {}, np.zeros(1), 1, "h")
    store.write(np.array([4, 5, 6]), [True, "3.5", 2 ** 60], {}, np.zeros(3), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done"] * 5 + ["failed", "failed", "pending"]
    assert r["value"].dtype == np.complex128 and list(r["value"][:5]) == [0, 1 / 3, 2 / 3, 1 + 2j, 1]
    assert r["error"][5].startswith("StoreError: result of type str does not fit") and "not a number" in r["error"][5]
    assert r["error"][6].startswith("StoreError: result of type int does not fit") and "exactly" in r["error"][6]


def test_every_real_number_is_stored_as_float64_from_the_first_value(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(6.0), "m:f", flush_interval=0)
    store.write(np.array([0, 1]), [True, 3], {}, np.zeros(2), 1, "h")
    store.write(np.array([2, 3]), np.array([2 ** 53, -7]), {}, np.zeros(2), 1, "h")
    store.write(np.array([4, 5]), [2.5, -(2 ** 53) - 2], {}, np.zeros(2), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert r["value"].dtype == np.float64 and list(r["status"]) == ["done"] * 5 + ["failed"]
    assert list(r["value"][:5]) == [1, 3, 2 ** 53, -7, 2.5] and "exactly" in r["error"][5]


READER = """
import sys, numpy as np
from mpimap.store import open_for_reading, _read_columns
reader = open_for_reading(sys.argv[1])  # opened while the job runs, as a monitoring script would
print("opened", flush=True)
sys.stdin.readline()
r = _read_columns(reader, sys.argv[1])
done = r["status"] == "done"
print(int(done.sum()), repr(r["value"][done].tolist()), flush=True)
"""


def test_a_reader_that_opened_the_file_before_floats_follow_ints_reads_the_right_values(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(100.0), "m:f", flush_interval=0)
    store.write(np.arange(50), np.arange(50) * 3, {}, np.zeros(50), 1, "h")  # integers first
    reader = subprocess.Popen([sys.executable, "-c", READER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert reader.stdout.readline().strip() == "opened"
        store.write(np.arange(50, 100), np.arange(50, 100) / 7, {}, np.zeros(50), 1, "h")
        out, _ = reader.communicate("go\n", timeout=60)
    finally:
        reader.kill()
        store.close("complete")
    count, values = out.split(" ", 1)
    expected = np.concatenate([np.arange(50) * 3, np.arange(50, 100) / 7])
    assert int(count) == 100 and eval(values) == expected.tolist()


def _format1_file(path, values):
    """A results file as mpimap wrote format 1 with integer results: an int64 ``value`` column, rows done."""
    ResultStore.open(path, np.arange(4.0), "m:f").close("interrupted")
    with h5py.File(path, "r+", libver="latest") as f:
        f.create_dataset("value", data=np.array(values + [0] * (4 - len(values)), np.int64), maxshape=(None,),
                         chunks=True, fillvalue=0)
        f["status"][:len(values)] = np.ones(len(values), np.int8)


def test_an_int64_column_of_an_older_file_still_widens_when_every_integer_is_exact(tmp_path):
    path = str(tmp_path / "r.h5")
    _format1_file(path, [5, -3])
    store = ResultStore.open(path, np.arange(4.0), "m:f", flush_interval=0)
    store.write(np.array([2, 3]), [0.5, 7], {}, np.zeros(2), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert r["value"].dtype == np.float64 and list(r["value"]) == [5, -3, 0.5, 7]


def test_integers_that_a_float_column_cannot_hold_exactly_are_kept_and_the_float_fails(tmp_path):
    path = str(tmp_path / "r.h5")
    _format1_file(path, [2 ** 60 + 1])
    store = ResultStore.open(path, np.arange(4.0), "m:f", flush_interval=0)
    store.write(np.array([1, 2]), [0.5, True], {}, np.zeros(2), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done", "failed", "done", "pending"] and r["value"].dtype == np.int64
    assert r["value"][0] == 2 ** 60 + 1 and r["value"][2] == 1 and r["error"][1].startswith("StoreError")


def test_a_first_integer_beyond_float64_precision_makes_the_column_json_and_exact(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(3.0), "m:f", flush_interval=0)
    store.write(np.array([0, 1, 2]), [2 ** 70, 2 ** 60 + 1, 0.5], {}, np.zeros(3), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done"] * 3 and list(r["value"]) == [2 ** 70, 2 ** 60 + 1, 0.5]


def test_a_later_integer_beyond_int64_fails_its_point_and_the_job_goes_on(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(4.0), "m:f", flush_interval=0)
    store.write(np.array([0]), [1], {}, np.zeros(1), 1, "h")
    store.write(np.array([1, 2]), [2 ** 70, 2], {}, np.zeros(2), 1, "h")
    store.write(np.array([3]), np.array([-(2 ** 70)], dtype=object), {}, np.zeros(1), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done", "failed", "done", "failed"] and list(r["value"][[0, 2]]) == [1, 2]
    assert r["error"][1].startswith("StoreError: result of type int does not fit") and "int64" in r["error"][1]
    store = ResultStore.open(path, np.arange(4.0), "m:f")  # and the file resumes
    assert list(store.todo(retry_failed=True)) == [1, 3]
    store.close("complete")


def test_a_long_double_is_not_rounded_to_float64(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(3.0), "m:f", flush_interval=0)
    store.write(np.array([0, 1]), [np.float16(1.5), np.longdouble(1) / 3], {}, np.zeros(2), 1, "h")
    store.write(np.array([2]), np.array([np.longdouble(2) / 3]), {}, np.zeros(1), 1, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done", "failed", "failed"] and r["value"][0] == 1.5
    assert all(e.startswith("StoreError") and "exactly" in e for e in r["error"][1:])


def test_retried_rows_lose_their_old_error_and_log_and_attempts_accumulate(tmp_path):
    path = str(tmp_path / "r.h5")
    store = ResultStore.open(path, np.arange(3.0), "m:f")
    failure = Failure.from_exception(RuntimeError("flaky backend"))
    store.write(np.arange(3), [0.0, None, 2.0], {1: failure}, np.zeros(3), 1, "h", {1: 2}, {1: "WARNING about to fail"})
    store.close("complete")
    store = ResultStore.open(path, np.arange(3.0), "m:f")
    assert list(store.todo()) == [] and list(store.todo(retry_failed=True)) == [1]
    store.write(np.array([1]), [10.0], {}, np.zeros(1), 2, "h")
    store.close("complete")
    r = read_results(path)
    assert list(r["status"]) == ["done"] * 3 and list(r["value"]) == [0.0, 10.0, 2.0]
    assert r["error"][1] == "" and r["log"][1] == ""
    assert list(r["attempts"]) == [1, 3, 1] and list(r["run"]) == [0, 1, 0]  # 2 attempts in run 0, 1 in run 1


def test_a_file_system_without_flock_runs_one_job_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(store_module.fcntl, "flock", no_flock)
    path = str(tmp_path / "r.h5")
    with caplog.at_level(logging.WARNING):
        store = ResultStore.open(path, np.arange(3.0), "m:f")
    store.write(np.arange(3), [1.0, 2.0, 3.0], {}, np.zeros(3), 1, "h")
    store.close("complete")
    assert list(read_results(path)["value"]) == [1.0, 2.0, 3.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "does not support flock" in warnings[0]


def test_other_flock_errors_are_named(tmp_path, monkeypatch):
    def failing(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_module.fcntl, "flock", failing)
    with pytest.raises(MpimapError, match=r"cannot lock .*r.h5.lock: Input/output error"):
        ResultStore.open(str(tmp_path / "r.h5"), np.arange(3.0), "m:f")


def test_a_lock_file_removed_by_the_job_that_released_it_is_not_taken(tmp_path, monkeypatch):
    path = str(tmp_path / "r.h5")
    first = store_module._take_lock(path)
    real_flock = fcntl.flock

    def first_job_ends_between_open_and_flock(fd, operation):
        if not first.closed:
            store_module._release_lock(first, path)
        return real_flock(fd, operation)

    monkeypatch.setattr(store_module.fcntl, "flock", first_job_ends_between_open_and_flock)
    second = store_module._take_lock(path)  # it opened the first job's lock file, which is then removed
    monkeypatch.undo()
    with pytest.raises(MpimapError, match="is being written by another running job"):
        store_module._take_lock(path)  # a third job: the second must hold the lock file that exists
    store_module._release_lock(second, path)


RESTRUCTURING_WRITER = '''
import sys, time, numpy as np
from mpimap.store import ResultStore
store = ResultStore.open(sys.argv[1], np.arange(10.0), "m:f", flush_interval=0)
store.write(np.arange(5), np.arange(5.0), {}, np.zeros(5), 1, "h")
with store._restructuring():  # what the job does when the value column appears or widens, held longer
    store._file.flush()
    print("restructuring", flush=True)
    time.sleep(2)
sys.stdin.read()
store.close("complete")
'''


def test_a_reader_of_a_file_its_live_job_is_restructuring_waits_instead_of_failing(tmp_path):
    path = str(tmp_path / "r.h5")
    writer = subprocess.Popen([sys.executable, "-c", RESTRUCTURING_WRITER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "restructuring"
        r = read_results(path)
        assert list(r["value"][:5]) == [0, 1, 2, 3, 4] and list(r["status"][:5]) == ["done"] * 5
    finally:
        writer.communicate("", timeout=60)
