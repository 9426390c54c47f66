"""A time bound on reading a results file that holds even while HDF5's C code runs (and holds the GIL).

Some damage (zeroed bytes in a heap) makes HDF5 loop for ever inside one C
call, where no Python timer or signal handler runs.  So a small forked child
watches instead: if the reader has not finished within the bound, the child
prints one line and SIGKILLs it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal

READ_TIMEOUT = 30.0  # seconds; MPIMAP_READ_TIMEOUT overrides it (tests)


def read_timeout() -> float:
    return float(os.environ.get("MPIMAP_READ_TIMEOUT", READ_TIMEOUT))


@contextlib.contextmanager
def bounded_read(path: str, fix: str):
    """Kill this process with a one-line error if the block takes longer than :func:`read_timeout` seconds."""
    seconds = read_timeout()
    done_r, done_w = os.pipe()
    line = (f"mpimap: error: reading {path} took longer than {seconds:g} s: the file is damaged or not an "
            f"mpimap results file; {fix}\n").encode()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # only system calls here: the parent may have had threads
        try:
            os.close(done_w)
            if not select.select([done_r], [], [], seconds)[0]:
                os.write(2, line)
                os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(done_r)
    try:
        yield
    finally:
        os.close(done_w)  # the child sees end of file and exits
        os.waitpid(child, 0)
