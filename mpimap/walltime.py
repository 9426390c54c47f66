"""Walltimes: the text forms users and batch systems write them in, as seconds and back."""

from __future__ import annotations

import math
import re

from .errors import MpimapError

# Slurm's forms: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_FORM = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


def parse_walltime(text) -> float:
    """Seconds in a walltime: a number of seconds, or MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if math.isfinite(text) and text > 0:
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
            if total > 0:
                return float(total)
    raise MpimapError(f"walltime {text!r}: use MINUTES, HH:MM:SS or D-HH:MM:SS (or seconds as a number), "
                      "more than zero")


def format_hms(seconds: float) -> str:
    """``HH:MM:SS`` (hours may exceed 24), rounded up to a whole second: what PBS and Grid Engine directives take."""
    whole = math.ceil(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"
