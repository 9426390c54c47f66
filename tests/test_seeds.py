"""Reproducible random numbers: one seed per map, one stream per point, bit-identical however the points run.

Every value is compared exactly (``==`` on floats) with what ``mpimap.point_rng`` gives the point in this
process; the maps run under real ``mpiexec`` at 1, 2 and 3 ranks, and ``mpimap run`` is killed with -9
and resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpimap
import seedfuncs
from conftest import job_env, kill_job, launch, mpimap_cli, wait_rows_done
from mpimap.store import read_results

SEED = 20261126
N = 40

# Every way of mapping that must not change a point's numbers; the script prints each map's values in point order.
SCRIPT = """
import json, os, sys
import numpy as np
import mpimap, seedfuncs

if __name__ == "__main__":
    seed, n, markers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    xs = list(range(n))
    out = {}
    with mpimap.Pool(seed=seed) as pool:
        out["map"] = list(pool.map(seedfuncs.draw, xs))
        out["chunksize 1"] = list(pool.map(seedfuncs.draw, xs, chunksize=1))
        out["chunksize 7, process"] = list(pool.map(seedfuncs.draw, xs, chunksize=7, isolation="process"))
        out["fresh"] = list(pool.map(seedfuncs.draw, xs[:12], isolation="fresh", chunksize=3))
        out["numpy points, chunksize 3"] = list(pool.map(seedfuncs.draw, np.arange(n), chunksize=3))
        out["unordered"] = [v for _, v in sorted(pool.imap_unordered(seedfuncs.draw, xs, indexed=True, chunksize=2))]
        got = {}
        for chunk in pool.imap_chunks(seedfuncs.draw, np.arange(n, dtype=float), chunksize=5):
            got.update(zip(range(chunk.start, chunk.stop), chunk.values.tolist()))
        out["imap_chunks"] = [got[i] for i in xs]
        out["submit"] = [f.result() for f in [pool.submit(seedfuncs.draw, x) for x in xs]]
        out["retried"] = list(pool.map(seedfuncs.flaky, xs, [markers] * n, retries=1, chunksize=4))
        out["crashed, retried"] = list(pool.map(seedfuncs.crashy, xs, [markers] * n, isolation="process",
                                               quarantine=2, chunksize=4))
    with mpimap.Pool() as pool:
        out["map seed"] = list(pool.map(seedfuncs.draw, xs, seed=seed + 1))
        out["no seed"] = [type(e).__name__ for e in pool.map(seedfuncs.draw, xs[:2], on_error="record")]
    print("VALUES " + json.dumps(out))
"""


def run_maps(run_script, tmp_path, ranks: int) -> dict:
    markers = tmp_path / f"markers-{ranks}"
    markers.mkdir()
    stdout = run_script(SCRIPT, ranks=ranks, args=(str(SEED), str(N), str(markers)), timeout=300)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("VALUES "))
    return json.loads(line[len("VALUES "):])


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_every_way_of_mapping_gives_each_point_its_own_stream_at_1_2_and_3_ranks(run_script, tmp_path, ranks):
    out = run_maps(run_script, tmp_path, ranks)
    want = seedfuncs.expected(SEED, range(N))
    assert out.pop("no seed") == ["RuntimeError"] * 2
    assert out.pop("map seed") == seedfuncs.expected(SEED + 1, range(N))  # a map's seed, in a pool without one
    assert out.pop("fresh") == want[:12]
    for name, values in out.items():
        assert values == want, name
    assert len(set(want)) == N  # (the streams differ from point to point)
    markers = os.listdir(tmp_path / f"markers-{ranks}")
    assert len([m for m in markers if m.startswith("flaky-")]) == len(range(0, N, 3))  # each failed once, then not
    assert len([m for m in markers if m.startswith("crashy-")]) == len(range(0, N, 5))


STRAGGLER = """
import json, sys
import mpimap, seedfuncs

if __name__ == "__main__":
    seed, markers = int(sys.argv[1]), sys.argv[2]
    with mpimap.Pool(seed=seed) as pool:
        values = list(pool.map(seedfuncs.straggle, range(12), [markers] * 12, chunksize=1, isolation="process"))
    print("VALUES " + json.dumps(values))
"""


def test_a_straggler_copy_draws_the_same_numbers(run_script, tmp_path):
    stdout = run_script(STRAGGLER, ranks=3, args=(str(SEED), str(tmp_path)), timeout=120)
    values = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("VALUES "))[len("VALUES "):])
    assert (tmp_path / "straggle-7-copy").exists()  # point 7's value came from a copy on another rank
    assert values == seedfuncs.expected(SEED, range(12))


def _start_run(tmp_path, points, out, sleep):
    return launch(3, "-m", "mpimap", "run", "seedfuncs:slow_draw", "--points", points, "--out", out,
                  "--seed", str(SEED), "--flush-interval", "0.2", "--chunksize", "2", cwd=tmp_path,
                  env=job_env(MPIMAP_TEST_SLEEP=sleep),
                  start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_seed_is_stored_and_a_resume_after_kill_9_gives_every_row_its_stream(tmp_path):
    n = 400
    points = np.linspace(0.0, 1.0, n)
    path, out = str(tmp_path / "p.npy"), str(tmp_path / "r.h5")
    np.save(path, points)
    job = _start_run(tmp_path, path, out, "0.01")
    wait_rows_done(str(out), 60)
    kill_job(job)
    job.communicate(timeout=60)
    partial = read_results(out)
    stored = np.flatnonzero(partial["status"] == "done")
    assert 60 <= len(stored) < n  # killed in the middle: the resume maps only the rows still to do
    resumed = _start_run(tmp_path, path, out, "0")
    stdout, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr
    final = read_results(out)
    assert set(final["status"]) == {"done"}
    assert set(final["run"][stored]) == {0} and set(np.delete(final["run"], stored)) == {1}
    assert final["value"].tolist() == seedfuncs.expected(SEED, range(n), points)  # row i drew from stream i
    attrs = final["attrs"]
    assert int(attrs["seed"]) == SEED
    assert attrs["rng_derivation"] == mpimap.seeds.DERIVATION and attrs["rng_derivation_version"] == 1
    shown = mpimap_cli(1, "show", out, cwd=tmp_path).stdout
    assert f"seed {SEED}" in shown


def test_resuming_with_another_seed_or_none_is_one_line_and_leaves_the_file_alone(tmp_path):
    np.save(tmp_path / "p.npy", np.arange(6.0))
    run = ("run", "seedfuncs:draw", "--points", "p.npy", "--out", "r.h5", "--isolation", "rank")
    mpimap_cli(1, *run, "--seed", "5", cwd=tmp_path)
    before = (tmp_path / "r.h5").read_bytes()
    for again in (("--seed", "6"), ()):
        proc = mpimap_cli(1, *run, *again, cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            "mpimap: error: r.h5 was computed with --seed 5: resume it with --seed 5, or use another --out, "
            "or --fresh to start over"]
    assert (tmp_path / "r.h5").read_bytes() == before
    mpimap_cli(1, *run, "--seed", "6", "--fresh", cwd=tmp_path)  # --fresh starts over with the new seed
    assert read_results(str(tmp_path / "r.h5"))["value"].tolist() == seedfuncs.expected(6, range(6), np.arange(6.0))


def test_submit_seed_reaches_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMAP_HOME", str(tmp_path / "home"))
    np.save(tmp_path / "points.npy", np.arange(10.0))
    proc = subprocess.run([sys.executable, "-m", "mpimap", "submit", "seedfuncs:draw", "--points", "points.npy",
                           "--name", "seeded", "--ranks", "2", "--seed", str(SEED), "--wait"], cwd=tmp_path,
                          env=job_env(MPIMAP_HOME=str(tmp_path / "home")), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    results = read_results(str(tmp_path / "mpimap-jobs" / "seeded" / "results.h5"))
    assert results["attrs"]["seed"] == str(SEED)
    assert results["value"].tolist() == seedfuncs.expected(SEED, range(10), np.arange(10.0))


# -- in one process ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 128), index=st.integers(0, 200))
def test_point_rng_is_the_index_th_child_of_the_seed_s_seed_sequence(seed, index):
    child = np.random.SeedSequence(seed).spawn(index + 1)[index]
    want = np.random.Generator(np.random.PCG64(child)).bit_generator.random_raw(8)
    assert np.array_equal(mpimap.point_rng(seed, index).bit_generator.random_raw(8), want)
    assert not np.array_equal(mpimap.point_rng(seed, index + 1).bit_generator.random_raw(8), want)


def test_keys_give_rows_of_a_larger_table_their_own_streams():
    rows = np.array([3, 17, 4, 250])
    with mpimap.Pool(seed=SEED) as pool:
        chunks = list(pool.imap_chunks(seedfuncs.draw, rows.astype(float), keys=rows, chunksize=1))
    got = {c.start: c.values[0] for c in chunks}
    assert [got[k] for k in range(4)] == seedfuncs.expected(SEED, rows, rows.astype(float))


def test_submit_calls_draw_from_their_number_in_the_pool_also_next_to_cancelled_calls():
    with mpimap.Pool(seed=SEED) as pool:
        first = pool.submit(seedfuncs.draw, 0).result()
        pool.pause()  # the next calls wait in one batch; cancelling some leaves holes in its chunks
        futures = [pool.submit(seedfuncs.draw, i) for i in range(1, 13)]
        assert all(f.cancel() for f in futures[::3])
        pool.resume()
        got = [f.result(timeout=60) for f in futures if not f.cancelled()]
    want = seedfuncs.expected(SEED, range(13))
    assert [first] + got == [want[0]] + [want[i] for i in range(1, 13) if (i - 1) % 3]


def test_rng_outside_a_seeded_map_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"only in a map with a seed.*point_rng\(seed, index\)"):
        mpimap.rng()


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("7", TypeError)])
def test_a_bad_seed_is_refused_when_given(seed, error):
    with pytest.raises(error, match="seed must be a non-negative integer"):
        mpimap.Pool(seed=seed)
    with mpimap.Pool() as pool:
        with pytest.raises(error, match="seed must be a non-negative integer"):
            pool.map(seedfuncs.draw, [1], seed=seed)
    with pytest.raises(error, match="seed must be a non-negative integer"):
        mpimap.point_rng(seed, 0)


@pytest.mark.parametrize("keys", [[1, 2], [0, -1, 2], [0.5, 1, 2]])
def test_bad_keys_are_refused_when_given(keys):
    with mpimap.Pool(seed=1) as pool:
        with pytest.raises(ValueError, match="one non-negative integer stream index per point"):
            pool.imap_chunks(seedfuncs.draw, [0, 1, 2], keys=keys)


def test_run_seed_option_is_checked_like_every_run_option():
    from mpimap.runner import RunOptions

    assert RunOptions(seed=3).problem() is None
    assert "seed must be a non-negative integer" in RunOptions(seed=-3).problem()
    assert "seed must be a non-negative integer" in RunOptions(seed="3").problem()


NESTED = '''
import json
import mpimap


def inner(x):
    try:
        return float(mpimap.rng().random())
    except RuntimeError:
        return "no stream"


def outer(i):
    first = float(mpimap.rng().random())
    unseeded = list(mpimap.current_pool().map(inner, range(3)))
    seeded = list(mpimap.current_pool().map(inner, range(3), seed=5))
    return [first, float(mpimap.rng().random()), unseeded, seeded]


if __name__ == "__main__":
    with mpimap.Pool(seed=1) as pool:
        print("RESULT " + json.dumps(list(pool.map(outer, range(3), isolation="rank"))))
'''


@pytest.mark.parametrize("ranks", [1, 3])
def test_nested_maps_have_their_own_streams_and_leave_the_waiting_points_stream_alone(run_script, ranks):
    line = next(x for x in run_script(NESTED, ranks=ranks, timeout=120).splitlines() if x.startswith("RESULT "))
    for i, (first, second, unseeded, seeded) in enumerate(json.loads(line[len("RESULT "):])):
        assert [first, second] == mpimap.point_rng(1, i).random(2).tolist()  # the outer stream goes on unchanged
        assert unseeded == ["no stream"] * 3  # a nested map without a seed has none (not the waiting point's)
        assert seeded == [mpimap.point_rng(5, j).random() for j in range(3)]
