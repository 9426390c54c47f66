"""Job commands that create or change a job: submit, cancel, pause, resume, log (levels), ls."""

from __future__ import annotations

COMMANDS: list = []
