"""No process of a job outlives the one that started it: ranks die with their launcher, children with their rank.

A rank whose launcher is gone (``kill -9`` of MPICH's ``hydra_pmi_proxy`` or of
Open MPI's ``prterun``) is not told by MPI while it evaluates a point, and a
worker ignores SIGTERM, so it would run on for ever, orphaned.  Linux's
``PR_SET_PDEATHSIG`` has the kernel kill it when its parent exits.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; elsewhere nothing happens).

    The signal is tied to the parent *thread* that forked this process, not to
    the parent process: MPICH's proxy and Open MPI's ``prterun`` keep that
    thread until they exit (checked: their ranks live through whole jobs).  A
    parent that died during the call would never send it: the parent pid
    changed, so this process ends here.
    """
    parent = os.getppid()
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def outlive_parent() -> None:
    """Undo :func:`die_with_parent`: this process is not a rank of a launcher, and may outlive its shell."""
    _prctl(_PR_SET_PDEATHSIG, 0)
