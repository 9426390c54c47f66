"""Jobs: submit a map to a batch system or this machine, walk away, follow, steer and collect it.

A job lives in one directory (see :mod:`.files`); the running master and every
command talk only through the files in it: no daemon, no port.
"""

from .job import Job
from .submit import submit

__all__ = ["Job", "submit"]
