"""Job commands that only read a job's files: status, attach, ps, results, thumbnail."""

from __future__ import annotations

COMMANDS: list = []
