"""A job's inputs: the function named ``MODULE:FUNCTION`` (or the native model of ``--native LIBRARY:SYMBOL``) and the
points file."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import stat
import sys

import numpy as np

from .errors import MpimapError


def _import(module: str):
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise MpimapError(f"cannot import {module}: no such file")
        name = os.path.splitext(os.path.basename(path))[0]
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a module beside the job is found
    return importlib.import_module(module)


class FunctionRef:
    """A function named ``MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``), resolved where it is unpickled.

    It travels to the workers as its name, not as code, so every rank imports
    the same module from its own file system.
    """

    def __init__(self, spec: str):
        module, sep, name = spec.rpartition(":")
        if not sep or not module or not name:
            raise MpimapError(f"function {spec!r} is not of the form MODULE:FUNCTION (e.g. mymodel:loglike)")
        if module.endswith(".py"):
            module = os.path.abspath(module)
        self.spec = f"{module}:{name}"
        try:
            mod = _import(module)
        except MpimapError:
            raise
        except Exception as exc:
            raise MpimapError(f"cannot import module {module!r}: {type(exc).__name__}: {exc}") from None
        target = mod
        for part in name.split("."):
            if not hasattr(target, part):
                raise MpimapError(f"module {module!r} has no function {name!r}")
            target = getattr(target, part)
        if not callable(target):
            raise MpimapError(f"{spec!r} is a {type(target).__name__}, not a function")
        self.function = target

    def __call__(self, *args):
        return self.function(*args)

    def __reduce__(self):
        return FunctionRef, (self.spec,)

    def __repr__(self):
        return f"FunctionRef({self.spec!r})"


def function_of(function: str | None, native: str | None = None, outputs: int | None = None):
    """The function a job maps: ``function`` (MODULE:FUNCTION), or the native model ``native`` (LIBRARY:SYMBOL,
    checked as a run option already) writing ``outputs`` doubles per point; each way, one line for bad input."""
    if function is not None and native is not None:
        raise MpimapError(f"give either FUNCTION ({function}) or --native {native}, not both")
    if native is None:
        if function is None:
            raise MpimapError("missing FUNCTION: give MODULE:FUNCTION, or --native LIBRARY:SYMBOL --outputs NY "
                              "for a native model")
        return FunctionRef(function)
    from .native_models import native as load_native

    library, _, symbol = native.rpartition(":")
    try:
        return load_native(library, symbol, outputs=outputs)
    except ValueError as exc:  # mpimap.native's one line
        raise MpimapError(f"--native {native}: {exc}") from None


def load_points(spec: str) -> np.ndarray:
    """Read the points of a job: ``.npy``, ``.csv`` or ``FILE.h5:DATASET``; one point per row (or element)."""
    path, _, dataset = spec.partition(".h5:")
    if dataset:
        path += ".h5"
    if not os.path.exists(path):
        raise MpimapError(f"points file {path} does not exist")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block the read forever
        raise MpimapError(f"points file {path} is not a regular file: give a .npy, .csv or .h5 file")
    try:
        if dataset:
            import h5py

            with h5py.File(path, "r") as f:
                if dataset not in f:
                    raise MpimapError(f"{path} has no dataset {dataset!r} (it has: {', '.join(f) or 'nothing'})")
                points = f[dataset][()]
        elif path.endswith(".npy"):
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":  # else np.load takes it for a pickle and says so
                    raise MpimapError(f"points file {path} is not a valid .npy file (save it with numpy.save)")
            points = np.load(path, allow_pickle=False)
        elif path.endswith(".csv"):
            points = _load_csv(path)
        else:
            raise MpimapError(f"points file {path}: unknown format; use .npy, .csv or FILE.h5:DATASET")
    except MpimapError:
        raise
    except Exception as exc:
        raise MpimapError(f"cannot read points from {spec}: {type(exc).__name__}: {exc}") from None
    points = np.asarray(points)
    if points.dtype.kind not in "biuf":
        raise MpimapError(f"points in {spec} are of type {points.dtype}, not numbers")
    if points.ndim not in (1, 2):
        raise MpimapError(f"points in {spec} have shape {points.shape}: use one value per point (1-D) "
                          "or one row per point (2-D)")
    if len(points) == 0 or points.size == 0:
        raise MpimapError(f"points file {spec} holds no points")
    return points


def _load_csv(path: str) -> np.ndarray:
    with open(path) as f:
        first = f.readline()
    try:
        [float(x) for x in first.split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header line
    points = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    return points[:, 0] if points.shape[1] == 1 else points


def checksum(points: np.ndarray) -> str:
    """A digest of the points (values, type and shape), to tell whether a resume is of the same job."""
    digest = hashlib.sha256(f"{points.dtype.str}{points.shape}".encode())
    digest.update(np.ascontiguousarray(points).tobytes())
    return digest.hexdigest()
