"""mpimap.bumps under real mpiexec with the real bumps package: fits equal bumps' serial mapper, the problem
travels once per fit, and a model that crashes or hangs costs its points (inf), not the fit."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import job_env, mpimap_cli

MODEL = '''
import os, time
import numpy as np
from bumps.curve import Curve
from bumps.fitproblem import FitProblem


def line(x, m, b):
    return m * x + b


def make_problem(fn=line):
    x = np.linspace(0.0, 10.0, 21)
    # its own generator: building the data must not consume the global np.random stream of the fit
    y = 2.5 * x - 1.0 + np.random.default_rng(12345).normal(0.0, 0.5, size=x.shape)
    model = Curve(fn, x, y, np.full_like(x, 0.5), m=1.0, b=0.0)
    model.m.range(0.0, 5.0)
    model.b.range(-5.0, 5.0)
    return FitProblem(model)


def seed_all(seed):
    """Everything DREAM and DE draw from (numba's own generator too, where numba is installed)."""
    np.random.seed(seed)
    try:
        from numba import njit
    except ImportError:
        return

    @njit
    def _seed(s):
        np.random.seed(s)

    _seed(seed)


def fit(fitclass, mapper_class, problem, **options):
    from bumps.fitters import FitDriver

    seed_all(7)
    calls = []
    mapper = mapper_class.start_mapper(problem, [], cpus=0)

    def counted(points):
        calls.append(len(points))
        return mapper(points)

    driver = FitDriver(fitclass=fitclass, problem=problem, monitors=[], mapper=counted, **options)
    driver.clip()
    x, fx = driver.fit()
    return [float(v) for v in x], float(fx), driver.fitter.state, len(calls)
'''

DREAM = "dict(samples=2000, burn=50, trim=False)"  # 151 calls of 20 points


def script(body: str) -> str:
    return MODEL + "\n\nif __name__ == \"__main__\":\n" + "\n".join("    " + line for line in body.splitlines())


def result_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_dream_and_de_fits_equal_the_serial_mapper_bit_for_bit(run_script):
    out = result_of(run_script(script(f'''
import json, threading
from bumps.fitters import DreamFit, DEFit
from bumps.mapper import SerialMapper
from mpimap.bumps import Mapper

out = {{}}
def chains_equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a.chains(), b.chains()))

xs, fs, ss, n = fit(DreamFit, SerialMapper, make_problem(), **{DREAM})
xp, fp, sp, n = fit(DreamFit, Mapper, make_problem(), **{DREAM})  # isolation="process", the default
out["dream"] = [xs == xp, fs == fp, chains_equal(ss, sp), n]

# DE from a fit thread, as the bumps command calls its mapper; a new fit without stop_mapper in between
xs, fs, _, n = fit(DEFit, SerialMapper, make_problem(), steps=200, pop=10)
thread = threading.Thread(target=lambda: out.update(de=fit(DEFit, Mapper, make_problem(), steps=200, pop=10)))
thread.start()
thread.join()
xp, fp, _, m = out.pop("de")
out["de"] = [xs == xp, fs == fp, n == m, n]
Mapper.stop_mapper()  # from the main thread

Mapper.configure(isolation="rank")
xp, fp, sp, n = fit(DreamFit, Mapper, make_problem(), **{DREAM})
xs, fs, ss, n = fit(DreamFit, SerialMapper, make_problem(), **{DREAM})
out["dream_rank"] = [xs == xp, fs == fp, chains_equal(ss, sp)]
Mapper.stop_mapper()

# bumps.fitters.fit: install() makes its process-pool mapper (parallel != 1) this one
import bumps.mapper, mpimap.bumps
from bumps.fitters import fit as bumps_fit
mpimap.bumps.install()
results = []
for parallel in (1, 0):
    seed_all(1)
    r = bumps_fit(make_problem(), method="dream", samples=2000, burn=50, parallel=parallel)
    results.append([list(r.x), r.fun])
out["fit"] = [results[0] == results[1], bumps.mapper.MPMapper is Mapper]
print("RESULT " + json.dumps(out))
'''), ranks=3, timeout=300))
    assert out["dream"] == [True, True, True, 151]
    assert out["de"][:3] == [True, True, True] and out["de"][3] > 10
    assert out["dream_rank"] == [True, True, True]
    assert out["fit"] == [True, True]


def test_a_fit_in_one_process_equals_the_serial_mapper(run_script):
    # No worker ranks: the pool evaluates in its own evaluation process (isolation="process"), or in-process.
    out = result_of(run_script(script(f'''
import json
from bumps.fitters import DreamFit
from bumps.mapper import SerialMapper
from mpimap.bumps import Mapper

xs, fs, _, _ = fit(DreamFit, SerialMapper, make_problem(), **{DREAM})
xp, fp, _, _ = fit(DreamFit, Mapper, make_problem(), **{DREAM})
Mapper.configure(isolation="rank")
xr, fr, _, _ = fit(DreamFit, Mapper, make_problem(), **{DREAM})
print("RESULT " + json.dumps([xs == xp == xr, fs == fp == fr]))
'''), ranks=1, plain=True, timeout=300))
    assert out == [True, True]


COUNTED = '''
class Counted:
    """Part of the problem: writes a line each time the problem is pickled (here) or unpickled (a worker)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        with open(self.path + ".dumps", "a") as f:
            f.write(f"{os.getpid()}\\n")
        return (_loaded, (self.path,))


def _loaded(path):
    with open(path + ".loads", "a") as f:
        f.write(f"{os.getpid()}\\n")
    return Counted(path)
'''


def test_the_problem_travels_once_per_worker_per_fit(run_script, tmp_path):
    out = result_of(run_script(COUNTED + script(f'''
import json, sys
from bumps.fitters import DreamFit, DEFit
from mpimap.bumps import Mapper

out = dict(master=os.getpid(), calls=[])
for k, fitclass in enumerate([DreamFit, DEFit, DreamFit]):
    problem = make_problem()
    problem.counter = Counted(os.path.join(sys.argv[1], f"fit{{k}}"))
    options = {DREAM} if fitclass is DreamFit else dict(steps=100, pop=10)
    out["calls"].append(fit(fitclass, Mapper, problem, **options)[3])
Mapper.stop_mapper()
print("RESULT " + json.dumps(out))
'''), ranks=3, args=[str(tmp_path)], timeout=300))
    assert out["calls"][0] == 151 and out["calls"][1] > 10
    for k in range(3):
        dumps = (tmp_path / f"fit{k}.dumps").read_text().split()
        loads = (tmp_path / f"fit{k}.loads").read_text().split()
        assert dumps == [str(out["master"])], f"fit {k}: the master pickled the problem {len(dumps)} times"
        assert str(out["master"]) not in loads
        # Each worker process (rank, and its evaluation process) loads each fit's problem once, not per call.
        assert 1 <= len(set(loads)) <= 4 and len(loads) == len(set(loads)), f"fit {k}: loads by pid {loads}"


def test_a_model_that_segfaults_or_hangs_on_some_parameters_still_finishes_the_fit(run_script):
    proc = run_script(script(f'''
import ctypes, json
from bumps.fitters import DreamFit
from bumps.mapper import SerialMapper
from mpimap.bumps import Mapper

def crashing_line(x, m, b):
    if m > 2.6:  # a region DREAM visits on its way: the model segfaults there
        ctypes.string_at(0)
    return m * x + b

def inf_line(x, m, b):  # the same model, with inf where the other crashes: the serial reference
    return np.full_like(x, np.inf) if m > 2.6 else m * x + b

def hanging_line(x, m, b):
    if b < -4.0:
        time.sleep(3600)
    return m * x + b

out = {{}}
xs, fs, ss, _ = fit(DreamFit, SerialMapper, make_problem(inf_line), **{DREAM})
xp, fp, sp, n = fit(DreamFit, Mapper, make_problem(crashing_line), **{DREAM})
out["crash"] = [xs == xp, fs == fp, all(np.array_equal(a, b) for a, b in zip(ss.chains(), sp.chains())), n]

Mapper.configure(point_timeout=2, quarantine=1)
mapper = Mapper.start_mapper(make_problem(hanging_line))
points = np.array([[-1.0, 2.0], [-4.5, 2.0], [1.0, 3.0], [-4.9, 1.0], [-1.0, 2.5]])  # (b, m): sorted by name
serial = SerialMapper.start_mapper(make_problem())
out["hang"] = [list(mapper(points)), list(serial(points))]
Mapper.stop_mapper()
print("RESULT " + json.dumps(out))
'''), ranks=3, full=True, timeout=300)
    out = result_of(proc.stdout)
    assert out["crash"] == [True, True, True, 151]
    crashes = [line for line in proc.stderr.splitlines() if "counted as inf" in line and "SIGSEGV" in line]
    assert crashes, proc.stderr[-3000:]  # DREAM did visit the region, and each point there is logged
    got, serial = out["hang"]
    assert got[1] == got[3] == float("inf")
    assert [got[k] for k in (0, 2, 4)] == [serial[k] for k in (0, 2, 4)]
    assert proc.stderr.count("point_timeout") >= 2


CLI_MODEL = '''
import os
import numpy as np
from bumps.curve import Curve
from bumps.fitproblem import FitProblem


def line(x, m, b):
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "serial"))
    if rank not in SEEN:  # which ranks evaluated the model
        SEEN.add(rank)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ranks.txt"), "a") as f:
            f.write(rank + "\\n")
    return m * x + b


SEEN = set()
x = np.linspace(0.0, 10.0, 21)
y = 2.5 * x - 1.0 + np.random.default_rng(12345).normal(0.0, 0.5, size=x.shape)
M = Curve(line, x, y, np.full_like(x, 0.5), m=1.0, b=0.0)
M.m.range(0.0, 5.0)
M.b.range(-5.0, 5.0)
problem = FitProblem(M)
'''


def test_the_bumps_command_under_mpimap_fits_like_bumps_serial(tmp_path):
    (tmp_path / "model.py").write_text(CLI_MODEL)
    fit = ["--fit=dream", "--samples=2000", "--burn=50", "--seed=5", "--batch"]
    # With numba installed, bumps compiles parts of DREAM whose random draws come from numba's own generator,
    # which --seed does not seed: two serial fits differ.  Without its JIT, every draw follows --seed.
    env = dict(job_env(), NUMBA_DISABLE_JIT="1")
    serial = subprocess.run([sys.executable, "-m", "bumps", "model.py", *fit, "--parallel=1", "--export=serial"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert serial.returncode == 0, serial.stderr
    os.remove(tmp_path / "ranks.txt")
    mpimap_cli(3, "bumps", "model.py", *fit, "--export=parallel", cwd=tmp_path, env=env, timeout=300)
    assert (tmp_path / "parallel" / "model.par").read_text() == (tmp_path / "serial" / "model.par").read_text()
    ranks = set((tmp_path / "ranks.txt").read_text().split())
    assert {"1", "2"} <= ranks, ranks  # the worker ranks evaluated the model
    chains = [np.loadtxt(tmp_path / d / "model-chain.mc.gz") for d in ("serial", "parallel")]
    assert np.array_equal(*chains)


def test_a_generation_after_the_first_goes_out_as_one_chunk_per_worker(run_script):
    # A fitter calls its mapper with a few cheap points per generation: once the function's cost is known (from
    # the map before), each worker gets one chunk, so a call costs one message each way per worker.
    out = result_of(run_script('''
import json, numpy as np, mpimap
from jobfuncs import square

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        chunks = [len(list(pool.imap_chunks(square, np.arange(20.0)))) for _ in range(4)]
    print("RESULT " + json.dumps(chunks))
''', ranks=3))
    assert out[1:] == [2, 2, 2], out


def test_a_problem_the_workers_cannot_load_stops_the_fit_with_its_error_not_inf(run_script, tmp_path):
    # The model's function lives in a module only rank 0 can import (a model file that adds its own folder to
    # sys.path, as bumps models do): the workers fail to load the problem, which must not be fitted as inf.
    (tmp_path / "only_here").mkdir()
    (tmp_path / "only_here" / "hidden_model.py").write_text("def line(x, m, b):\n    return m * x + b\n")
    proc = run_script(script(f'''
import json, sys
sys.path.insert(0, {str(tmp_path / "only_here")!r})
from hidden_model import line as hidden
from bumps.fitters import DEFit
from mpimap.bumps import Mapper
try:
    fit(DEFit, Mapper, make_problem(hidden), steps=5, pop=10)
    print("RESULT " + json.dumps("fitted"))
except ModuleNotFoundError as exc:
    print("RESULT " + json.dumps(str(exc)))
'''), ranks=3, timeout=300)
    assert result_of(proc) == "No module named 'hidden_model'"
