"""mpimap: map a function over many points on MPI ranks, and keep going when things misbehave."""

from .failures import RemoteError
from .pool import Pool
from .results import load
from .shared import InitializerError, Shared

__version__ = "0.1.0"
__all__ = ["Pool", "RemoteError", "load", "__version__", "Shared", "InitializerError"]
