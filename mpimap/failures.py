"""How a failed point travels: a picklable record of the exception, and its rebuilding on the caller's side."""

from __future__ import annotations

import pickle
import signal
import traceback
from dataclasses import dataclass


def signal_name(number: int) -> str:
    """``SIGSEGV`` for 11; the number itself for a signal without a name (a real-time one)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class RemoteTraceback(Exception):
    """Carries the worker's traceback text; set as ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class RemoteError(Exception):
    """Stands in for a worker exception that could not be pickled back to the caller."""


class PointTimeout(RemoteError, TimeoutError):
    """A point's evaluation ran past ``point_timeout`` and was killed."""


class PointCrashed(RemoteError):
    """A point's evaluation process died (a segfault, ``os._exit``, the OOM killer)."""


@dataclass(frozen=True)
class Failure:
    """One point's failure: exception type, message and traceback, plus the pickled exception if it pickles.

    ``status`` is ``failed`` (the function raised), ``timeout`` (killed after
    ``point_timeout``) or ``crashed`` (its evaluation process died).
    """

    kind: str
    message: str
    traceback: str
    pickled: bytes | None = None
    status: str = "failed"

    @classmethod
    def from_exception(cls, exc: BaseException) -> "Failure":
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickled = pickle.dumps(exc, protocol=5)
            pickle.loads(pickled)
        except Exception:
            pickled = None
        return cls(type(exc).__qualname__, str(exc), tb, pickled)

    @property
    def text(self) -> str:
        """One line naming the error, as stored and shown in summaries."""
        return f"{self.kind}: {self.message}" if self.message else self.kind

    def exception(self) -> BaseException:
        """The worker's exception, rebuilt, with the remote traceback attached as its cause."""
        exc = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                exc = None
        if exc is None:
            exc = {"timeout": PointTimeout, "crashed": PointCrashed}.get(self.status, RemoteError)(self.text)
        exc.__cause__ = RemoteTraceback(f'\n"""\n{self.traceback}"""')
        return exc


def unpicklable_values(values, failures: dict, error: BaseException):
    """After pickling a chunk's results raised ``error``: its values and failures with the culprits failed.

    Each value is pickled on its own (large buffers are not copied) and those
    that raise fail their point with that error, as ``mpi4py.futures`` does;
    the hot path never pays this second pickle.  If no single value is to
    blame, every point without a failure fails with ``error``.
    """
    culprits = {}
    for k, value in enumerate(values):
        if k in failures:
            continue
        try:
            pickle.dumps(value, protocol=5, buffer_callback=_out_of_band)
        except (Exception, SystemExit) as exc:  # a __reduce__ may even call sys.exit
            culprits[k] = Failure.from_exception(exc)
    if not culprits:
        culprits = dict.fromkeys((k for k in range(len(values)) if k not in failures), Failure.from_exception(error))
    values = [None if k in culprits else value for k, value in enumerate(values)]
    return values, {**failures, **culprits}


def _out_of_band(buffer) -> bool:
    return False
