"""Finding and running ``mpiexec``: the one from the environment's MPI wheel first."""

from __future__ import annotations

import os
import shutil
import sys

from .errors import MpimapError


def find_mpiexec() -> str:
    """The ``mpiexec`` beside this Python (the ``mpich`` wheel puts it there), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise MpimapError("no mpiexec found: install an MPI (pip install mpich) or load your site's MPI module")
    return found


def mpiexec_command(ranks: int, *args: str) -> list[str]:
    """``mpiexec -n RANKS python -m mpimap ARGS`` with this Python."""
    return [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpimap", *args]
