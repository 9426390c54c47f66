"""What a long run shows: a live progress line on a terminal, and a summary at the end."""

from __future__ import annotations

import os
import stat as stat_module
import sys
import time
from collections import Counter


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bar_line(done: int, total: int, failed: int, rate: float, eta: float | None, width: int = 24) -> str:
    """The progress line: a bar of ``done`` out of ``total``, failures, rate and time left (None: unknown)."""
    filled = min(width, int(width * done / total)) if total else width
    bar = "#" * filled + "-" * (width - filled)
    eta_text = _duration(eta) if eta is not None and eta == eta else "?"
    return f"[{bar}] {done}/{total} points, {failed} failed, {rate_text(rate)} points/s, ETA {eta_text}"


def rate_text(rate: float) -> str:
    """A rate readable at any size: 12,345 or 0.031 (slow points must not show as 0)."""
    return f"{rate:,.0f}" if rate >= 10 or rate == 0 else f"{rate:.2g}"


def user_terminal():
    """The terminal this job's output goes to, if the job runs in its foreground; else None.

    Under mpiexec rank 0's stderr is a pipe to the launcher, which relays it,
    so follow stderr up the ancestors while it is a pipe: the first one whose
    stderr is not decides.  It counts if that is a terminal which is its
    controlling terminal, with its process group in the foreground.  A batch
    job (output to a file, no terminal), a job in the background (``&``) or
    detached from the terminal (``setsid``) shows nothing.
    """
    if sys.stderr.isatty():
        return sys.stderr
    pid = os.getpid()
    for _ in range(32):  # the chain is short: rank, launcher proxy, mpiexec, maybe a wrapper
        try:
            mode = os.stat(f"/proc/{pid}/fd/2").st_mode
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return None
        # after "pid (command)": state, ppid, pgrp, session, tty_nr, tpgid
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, pgrp, tty, foreground = int(fields[1]), int(fields[2]), int(fields[4]), int(fields[5])
        if not (stat_module.S_ISFIFO(mode) or stat_module.S_ISSOCK(mode)):
            return _open_terminal(pid, tty) if tty and foreground == pgrp else None
        if ppid <= 1:
            return None
        pid = ppid
    return None


def _open_terminal(pid: int, tty: int):
    """Process ``pid``'s stderr opened for writing, if it is the terminal ``tty`` (a device number)."""
    try:
        fd = os.open(f"/proc/{pid}/fd/2", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return None
    if os.isatty(fd) and os.fstat(fd).st_rdev == tty:
        return os.fdopen(fd, "w")
    os.close(fd)
    return None


class Progress:
    """Counts points as they finish; redraws one line (at most ``rate`` times a second) when enabled."""

    def __init__(self, total: int, *, already: int = 0, enabled: bool | None = None, stream=None, rate: float = 5.0):
        """``enabled=None``: show the line when the job runs in the foreground of a terminal (:func:`user_terminal`)."""
        terminal = user_terminal() if stream is None and enabled is not False else None
        self._own = terminal is not None and terminal is not sys.stderr
        self.stream = stream or terminal or sys.stderr
        self.enabled = (terminal is not None if stream is None else self.stream.isatty()) if enabled is None \
            else enabled
        self.total = total  # points to evaluate in this run
        self.already = already  # points done in earlier runs
        self.done = 0
        self.failed = 0
        self.errors: Counter = Counter()
        self.start = time.monotonic()
        self._interval = 1.0 / rate
        self._last_draw = 0.0

    def update(self, done: int, failed_texts=()) -> None:
        self.done += done
        self.failed += len(failed_texts)
        self.errors.update(failed_texts)
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= self._interval or self.done >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return bar_line(self.done, self.total, self.failed, rate, eta)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        if self._own:
            self.stream.close()

    def summary(self, *, out: str, state: str, per_rank: dict) -> str:
        """A one-screen summary of the run."""
        elapsed = time.monotonic() - self.start
        lines = [
            f"mpimap: job {state} in {_duration(elapsed)} ({elapsed:.2f} s)",
            f"  points evaluated now : {self.done} of {self.total}"
            + (f" (plus {self.already} from earlier runs)" if self.already else ""),
            f"  succeeded / failed   : {self.done - self.failed} / {self.failed}",
            f"  rate                 : {self.done / elapsed if elapsed > 0 else 0:,.0f} points/s",
        ]
        if per_rank:
            busiest = ", ".join(f"{where}: {n}" for where, n in sorted(per_rank.items())[:8])
            lines.append(f"  points per rank      : {busiest}" + (" ..." if len(per_rank) > 8 else ""))
        for text, count in self.errors.most_common(5):
            lines.append(f"  error x{count:<6}: {text[:100]}")
        if len(self.errors) > 5:
            lines.append(f"  ... {len(self.errors) - 5} more distinct errors (mpimap show {out} --errors)")
        lines.append(f"  results              : {out}")
        return "\n".join(lines)
