"""Functions the seed tests map (importable on every rank as ``seedfuncs``), and what each point must give."""

import os
import time

import numpy as np

import mpimap


def draws(gen: np.random.Generator, x) -> float:
    """Several draws of several kinds from one stream: a value that changes if any draw does."""
    a = gen.standard_normal(3)
    b = gen.integers(1 << 40)
    return float(a.sum() + b * 1e-12 + gen.random() + float(np.ravel(x)[0]))


def draw(x):
    """A point's value from its stream (``mpimap.rng()`` twice: the second call continues the stream)."""
    gen = mpimap.rng()
    assert mpimap.rng() is gen
    return draws(gen, x)


def expected(seed: int, indices, points=None) -> list:
    """What :func:`draw` gives point ``i`` (at stream ``indices[i]``), computed alone with ``point_rng``."""
    points = indices if points is None else points
    return [draws(mpimap.point_rng(seed, int(k)), x) for k, x in zip(indices, points)]


def flaky(x, markers):
    """Draw, then fail the first evaluation of every third point (a retry must start the stream again)."""
    value = draw(x)
    marker = os.path.join(markers, f"flaky-{int(x)}")
    if int(x) % 3 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError(f"first attempt at point {int(x)}")
    return value


def crashy(x, markers):
    """Draw, then kill the evaluation process at the first evaluation of every fifth point."""
    value = draw(x)
    marker = os.path.join(markers, f"crashy-{int(x)}")
    if int(x) % 5 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return value


def straggle(x, markers):
    """Point 7's first evaluation draws and then hangs for 30 s; its copy (on another rank) finishes at once."""
    value = draw(x)
    if int(x) == 7:
        marker = os.path.join(markers, "straggle-7")
        if os.path.exists(marker):
            open(marker + "-copy", "w").close()
        else:
            open(marker, "w").close()
            time.sleep(30)
    return value


def slow_draw(x):
    """:func:`draw`, slowed down by ``MPIMAP_TEST_SLEEP`` seconds (for a kill in the middle of a run)."""
    time.sleep(float(os.environ.get("MPIMAP_TEST_SLEEP", "0")))
    return draw(x)
