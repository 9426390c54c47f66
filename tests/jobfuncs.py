"""Functions the test jobs evaluate (importable on every rank as ``jobfuncs``)."""

import os
import time

import numpy as np


def square(x):
    return x * x


def poly(row):
    """A 2-D point to a small vector result."""
    a, b = row
    return np.array([a + b, a * b, a - b])


def record(row):
    """Log every evaluation (for counting re-evaluations across a kill), then return a value."""
    with open(os.environ["MPIMAP_TEST_LOG"], "a") as f:
        f.write(f"{int(row[0])}\n")
    time.sleep(float(os.environ.get("MPIMAP_TEST_SLEEP", "0")))
    return float(row[0]) * 2 + row[1]


def fail_on_multiples_of_7(x):
    if int(x) % 7 == 0:
        raise ValueError(f"bad point {int(x)}")
    return x + 0.5


def returns_dict(x):
    return {"x": float(x), "label": f"p{int(x)}"}


def returns_set(x):
    return {x}


def not_a_function_but(x):
    return x


NOT_CALLABLE = 42
