"""A point's own log: the records its evaluation emitted, kept only when a condition holds.

Capture costs a handler swap per point, so it is off unless a map asks for it
(``keep_logs=``).  ``debug_rerun`` evaluates a point whose function raised
once more with DEBUG logging captured, and keeps that log with the failure.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

KEEP = ("failed", "slow", "always")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class PointLogs:
    """Which points keep their captured log records."""

    keep: object = None  # None, "failed", "slow", "always", or a function (point, value, seconds) -> bool
    slow_seconds: float = 1.0  # what "slow" means
    debug_rerun: bool = False  # re-run a point whose function raised, with DEBUG logging captured

    def __post_init__(self):
        if self.keep is not None and not callable(self.keep) and self.keep not in KEEP:
            raise ValueError(f"keep_logs must be one of {', '.join(KEEP)} or a function (point, value, seconds) "
                             f"-> bool, not {self.keep!r}")

    @property
    def active(self) -> bool:
        return self.keep is not None or self.debug_rerun

    def wanted(self, point, value, seconds: float, failed: bool) -> bool:
        """Whether this point's captured log is kept."""
        if self.keep == "always" or (self.keep == "failed" and failed):
            return True
        if self.keep == "slow":
            return seconds > self.slow_seconds
        if callable(self.keep):
            return bool(self.keep(point, value, seconds))
        return False


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@contextmanager
def captured(level: int):
    """Collect the log records of everything run inside, at ``level`` and above, as formatted lines."""
    root = logging.getLogger()
    recorder = _Recorder()
    old = root.level
    root.addHandler(recorder)
    root.setLevel(level)
    try:
        yield recorder.lines
    finally:
        root.removeHandler(recorder)
        root.setLevel(old)


def capture_level() -> int:
    """The level points are captured at: what the program logs, and at least INFO."""
    return min(logging.getLogger().getEffectiveLevel(), logging.INFO)
