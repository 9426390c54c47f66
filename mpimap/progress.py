"""What a long run shows: a live progress line on a terminal, and a summary at the end."""

from __future__ import annotations

import sys
import time
from collections import Counter


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts points as they finish; redraws one line (at most ``rate`` times a second) when enabled."""

    def __init__(self, total: int, *, already: int = 0, enabled: bool | None = None, stream=None, rate: float = 5.0):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
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
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        eta_text = _duration(eta) if eta == eta else "?"
        return (f"[{bar}] {self.done}/{self.total} points, {self.failed} failed, "
                f"{rate:,.0f} points/s, ETA {eta_text}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

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
