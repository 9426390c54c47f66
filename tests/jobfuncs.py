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


_LEAK = []


def rank() -> str:
    """The MPI rank this process runs on, from mpiexec's environment (inherited by the child process)."""
    return os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"  # MPICH, Open MPI


def misbehave(x):
    """The resilience scenario: what each point does is decided by its number (and by the rank it runs on)."""
    import ctypes

    p = int(x)
    here = rank()
    if p % 10 == 1:
        raise ValueError(f"point {p} is bad")
    if p == 3:
        while True:  # a Python loop that never ends
            pass
    if p == 5:
        ctypes.PyDLL(os.environ["MPIMAP_TEST_CSPIN"]).spin()  # a C loop that never ends, holding the GIL
    if p == 7:
        ctypes.string_at(0)  # segmentation fault
    if p % 10 == 8:
        _LEAK.append(bytearray(50 * 2 ** 20))  # leaks 50 MB per call
        for page in range(0, len(_LEAK[-1]), 4096):
            _LEAK[-1][page] = 1
    if p % 10 == 9 and here == "2":
        raise RuntimeError("bad node: rank 2 gets these wrong")
    time.sleep(0.2 if here == "1" else 0.01)  # rank 1 is a slow node
    return float(p * p)


def memory_mb(_):
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def scratch_user(x):
    """Leaves a file in its TMPDIR and reports where that was."""
    import tempfile

    path = tempfile.mkdtemp()
    with open(os.path.join(path, "junk"), "w") as f:
        f.write("x")
    return os.environ["TMPDIR"]


def chatty(x):
    """Logs at INFO and DEBUG; fails on multiples of 5; slow on multiples of 3."""
    import logging

    log = logging.getLogger("jobfuncs.chatty")
    log.info("evaluating %s", x)
    log.debug("debug detail for %s", x)
    if int(x) % 3 == 0:
        time.sleep(0.3)
    if int(x) % 5 == 0:
        raise ArithmeticError(f"{x} is a multiple of 5")
    return x


def warns(x):
    import logging

    logging.getLogger("jobfuncs.warns").warning("warning from point %s", x)
    logging.getLogger("jobfuncs.warns").info("info from point %s", x)
    return x


def slow_chatty(x):
    import logging

    time.sleep(0.05)
    logging.getLogger("jobfuncs.slow_chatty").info("working on %s", x)
    return x


def fails_on_node2(x):
    """Every point fails when evaluated on node2 (a bad node), and succeeds elsewhere."""
    time.sleep(0.01)
    if rank() == "2":
        raise RuntimeError("bad node")
    return x * 10


def host_dependent(x):
    """Differs between ranks on every 4th point (like a node with flaky floating point)."""
    bump = float(rank()) * 1e-9 if int(x) % 4 == 0 else 0.0
    return x + bump


def exits_on_2(x):
    if int(x) == 2:
        os._exit(3)
    return x


def float_then_list(x):
    """A number for the first points, then lists: the results file cannot hold the lists (StoreError)."""
    return float(x) if x < 3 else [float(x), 1.0]


def hold_gil(seconds):
    """Sleep ``seconds`` in a C call that holds the GIL (``hold`` of the test model named by $NATIVE_MODEL)."""
    import ctypes

    ctypes.PyDLL(os.environ["NATIVE_MODEL"]).hold(ctypes.c_double(seconds))
    return seconds
