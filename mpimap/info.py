"""What this installation of mpimap runs on (``mpimap info``): its version, Python's, MPI's, HDF5's, and whether the
C extension is in use, so a bug report or a slow run can be matched to the software behind it."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass


@dataclass
class Installation:
    """The versions mpimap runs with; ``extension``: whether the C extension evaluates native models."""

    mpimap: str
    mpimap_path: str
    python: str
    python_path: str
    mpi4py: str
    mpi_standard: str                   # the MPI standard the library implements, e.g. 4.1
    mpi_library: str                    # the first line of MPI_Get_library_version
    numpy: str
    h5py: str
    hdf5: str
    extension: bool
    extension_line: str                 # mpimap.native_models.describe(): in use, off, or not built, and why

    def lines(self) -> list[str]:
        return [f"mpimap {self.mpimap} ({self.mpimap_path})",
                f"Python {self.python} ({self.python_path})",
                f"mpi4py {self.mpi4py}, MPI {self.mpi_standard}: {self.mpi_library}",
                f"numpy {self.numpy}",
                f"h5py {self.h5py}, HDF5 {self.hdf5}",
                self.extension_line]

    def to_json(self) -> dict:
        return asdict(self)


def installation() -> Installation:
    """The versions of this process's mpimap and what it runs on (imports mpi4py.MPI, which starts MPI)."""
    import h5py
    import mpi4py
    import numpy
    from mpi4py import MPI

    from . import __version__, native_models

    major, minor = MPI.Get_version()
    library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())  # MPICH pads with spaces
    return Installation(
        mpimap=__version__, mpimap_path=os.path.dirname(os.path.abspath(__file__)),
        python=platform.python_version(), python_path=sys.executable,
        mpi4py=mpi4py.__version__, mpi_standard=f"{major}.{minor}", mpi_library=library,
        numpy=numpy.__version__, h5py=h5py.__version__, hdf5=h5py.version.hdf5_version,
        extension=native_models.extension is not None, extension_line=native_models.describe())
