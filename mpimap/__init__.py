"""mpimap: map a function over many points on MPI ranks, and keep going when things misbehave."""

from .failures import RemoteError
from .native_models import NativeError, native
from .nested import current_pool
from .groups import task_comm
from .pool import Pool
from .results import load
from .seeds import point_rng, rng
from .shared import InitializerError, Shared

__version__ = "0.1.0"
__all__ = ["Pool", "RemoteError", "current_pool", "load", "native", "NativeError", "point_rng", "rng", "Shared", "InitializerError",
           "task_comm", "__version__"]
