"""Walltimes: the text forms users and batch systems write them in, as seconds and back."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from .errors import MpimapError

# Slurm's forms: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_FORM = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


MAX_WALLTIME = 365 * 86400  # seconds: more is a typo, and would overflow the job script's shell arithmetic


def parse_walltime(text) -> float:
    """Seconds in a walltime: a number of seconds, or MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; minutes
    and seconds after the leading field are below 60, and the whole is at most :data:`MAX_WALLTIME`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if math.isfinite(text) and 0 < text <= MAX_WALLTIME:
            return float(text)
    elif isinstance(text, str):
        found = _FORM.match(text.strip())
        if found:
            days, first, second, third = found.groups()
            parts = [int(p) for p in (first, second, third) if p is not None]
            if days is not None:
                # D-HH, D-HH:MM, D-HH:MM:SS
                hours, minutes, seconds = (parts + [0, 0])[:3]
                total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
            elif len(parts) == 1:
                total = parts[0] * 60                       # MINUTES
            elif len(parts) == 2:
                total = parts[0] * 60 + parts[1]            # MM:SS
            else:
                total = (parts[0] * 60 + parts[1]) * 60 + parts[2]  # HH:MM:SS
            if 0 < total <= MAX_WALLTIME and all(p < 60 for p in parts[1:]):  # after the leading field: MM, SS
                return float(total)
    raise MpimapError(f"walltime {text!r}: use MINUTES, HH:MM:SS or D-HH:MM:SS (or seconds as a number), "
                      "more than zero, at most 365 days, minutes and seconds below 60")


def format_hms(seconds: float) -> str:
    """``HH:MM:SS`` (hours may exceed 24), rounded up to a whole second: what PBS and Grid Engine directives take."""
    whole = math.ceil(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


# -- the allocation's end, and whether one more chunk fits before it ------------------------------------------
MARGIN = 1.5        # a chunk is expected to take this many times its measured cost
MIN_RESERVE = 10.0  # seconds kept, at least, for the last flush, closing the results file and stopping the ranks
AHEAD = 2           # chunks a rank may hold (the scheduler's prefetch): one handed out now may wait behind another
DEADLINE_ENV = "MPIMAP_DEADLINE"  # unix seconds of the allocation's end, exported by mpimap's job scripts


def reserve(flush_interval: float) -> float:
    """Seconds kept before the deadline to flush and shut down: ``max(10 s, 2 x flush_interval)``.

    Points stored between two flushes are flushed at the end, so a long flush
    interval means a longer last flush; ``inf`` (flush only at the end) keeps 10 s.
    """
    return max(MIN_RESERVE, 2 * flush_interval) if math.isfinite(flush_interval) else MIN_RESERVE


def fits(deadline: float, now: float, point_seconds: float | None, chunk_points: int, spare: float) -> bool:
    """Whether a chunk of ``chunk_points`` points handed out at ``now`` is expected back before ``deadline``
    with ``spare`` seconds left to shut down.

    ``point_seconds`` is the measured cost of a point (None: nothing measured
    yet, so hand out while the time left exceeds ``spare``: a run must not stall
    at its start).  The chunk may wait behind one already on its rank, and is
    given ``MARGIN`` times its cost.
    """
    left = deadline - now - spare
    if left <= 0:
        return False
    return point_seconds is None or MARGIN * AHEAD * chunk_points * point_seconds <= left


@dataclass(frozen=True)
class Deadline:
    """When the allocation ends (unix seconds), and what said so (for messages)."""

    at: float
    source: str


def deadline(env_value: str | None, walltime, started: float) -> Deadline | None:
    """The earlier of ``MPIMAP_DEADLINE`` (``env_value``; empty or 0: unknown) and ``started`` + ``walltime``
    (None: no walltime); None if neither is known.  A bad ``env_value`` raises :class:`MpimapError`, one line."""
    known = []
    if env_value is not None and env_value.strip():
        try:
            at = float(env_value)
        except ValueError:
            at = math.nan
        if not math.isfinite(at) or not 0 <= at < 2 ** 31 * 100:  # (beyond: no time the platform can print)
            raise MpimapError(f"{DEADLINE_ENV}={env_value!r} is not a time in unix seconds: set it to the "
                              "allocation's end (date +%s), or leave it empty")
        if at > 0:  # 0 is what some batch systems report for "no limit"
            known.append(Deadline(at, f"{DEADLINE_ENV} {time.strftime('%H:%M:%S', time.localtime(at))}"))
    if walltime is not None:
        seconds = parse_walltime(walltime)
        known.append(Deadline(started + seconds, f"--walltime {format_hms(seconds)}"))
    return min(known, key=lambda d: d.at, default=None)


@dataclass
class Budget:
    """A map against its deadline: the measured cost of its points, and whether one more chunk fits."""

    deadline: Deadline
    spare: float                    # seconds kept to shut down (see ``reserve``)
    chunksize: int | None = None    # points per chunk if fixed; else the largest chunk seen is assumed
    seconds: float = 0.0            # evaluation seconds of the points measured
    points: int = 0                 # points measured
    largest: int = 1                # points in the largest chunk seen

    def measured(self, durations, chunk_points: int) -> None:
        """A chunk came back: its points' durations (seconds each) and how many points it held."""
        self.seconds += float(sum(durations))
        self.points += len(durations)
        self.largest = max(self.largest, chunk_points)

    @property
    def point_seconds(self) -> float | None:
        """Mean seconds per point so far (None before the first)."""
        return self.seconds / self.points if self.points else None

    def fits(self, now: float) -> bool:
        return fits(self.deadline.at, now, self.point_seconds, self.chunksize or self.largest, self.spare)

    def why_not(self, now: float) -> str:
        """One line: why no more points are handed out (for the log, status.json and the user)."""
        left = self.deadline.at - now
        if left <= 0:
            return f"walltime: the deadline ({self.deadline.source}) passed {-left:.0f} s ago"
        cost = "" if self.point_seconds is None else f"; a point takes {self.point_seconds:.3g} s"
        return (f"walltime: {left:.0f} s left before the deadline ({self.deadline.source}), {self.spare:.0f} s "
                f"of them kept to shut down{cost}: no more points fit")
