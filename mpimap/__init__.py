"""mpimap: map a function over many points on MPI ranks, and keep going when things misbehave."""

from .failures import RemoteError
from .groups import task_comm
from .pool import Pool
from .results import load

__version__ = "0.1.0"
__all__ = ["Pool", "RemoteError", "load", "task_comm", "__version__"]
