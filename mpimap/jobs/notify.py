"""Notifications rank 0 of a job sends when it starts and when it ends: a user's command, and an email.

Neither may stop or hang the job: a hook that fails or runs too long is
logged (in the job's log) and the job goes on.
"""

from __future__ import annotations

import getpass
import logging
import os
import smtplib
import socket
import subprocess
from dataclasses import dataclass
from email.message import EmailMessage

log = logging.getLogger("mpimap.notify")
TIMEOUT = 60.0  # seconds a notify command or an SMTP exchange may take


@dataclass(frozen=True)
class Event:
    """What a notification tells: which job, start or end, its state and counts."""

    name: str
    event: str          # start or end
    state: str          # running at start; done, failed, cancelled or interrupted at the end
    job_dir: str
    done: int
    failed: int
    total: int
    message: str = ""

    def environment(self) -> dict:
        return {"MPIMAP_JOB_NAME": self.name, "MPIMAP_JOB_STATE": self.state, "MPIMAP_JOB_DIR": self.job_dir,
                "MPIMAP_POINTS_DONE": str(self.done), "MPIMAP_POINTS_FAILED": str(self.failed),
                "MPIMAP_POINTS_TOTAL": str(self.total), "MPIMAP_EVENT": self.event}


def notify(event: Event, command: str | None, email: str | None, timeout: float = TIMEOUT) -> None:
    """Run the job's notify command and send its notify email, as configured; never raises."""
    if command:
        run_command(command, event, timeout)
    if email:
        send_email(email, event, timeout)


def run_command(command: str, event: Event, timeout: float = TIMEOUT) -> None:
    """Run ``command`` with a shell, the event in its environment; log what goes wrong."""
    try:
        proc = subprocess.run(command, shell=True, env={**os.environ, **event.environment()}, timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        log.warning("notify command %r (%s) did not finish within %g s: left behind", command, event.event, timeout)
        return
    except OSError as exc:
        log.warning("notify command %r (%s) could not run: %s", command, event.event, exc)
        return
    if proc.returncode != 0:
        log.warning("notify command %r (%s) exited %d: %s", command, event.event, proc.returncode,
                    (proc.stderr or proc.stdout).strip()[-500:])


def config_path() -> str:
    """The user's mpimap configuration: ``$MPIMAP_HOME/config.toml`` (default ``~/.mpimap/config.toml``)."""
    home = os.environ.get("MPIMAP_HOME") or os.path.join(os.path.expanduser("~"), ".mpimap")
    return os.path.join(home, "config.toml")


def smtp_config() -> dict | None:
    """``smtp_host``, ``smtp_port`` and ``from`` of the user's config; None (and a warning) if it lacks them."""
    path = config_path()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        log.warning("notify email needs Python 3.11 or newer (tomllib) to read %s: no email sent", path)
        return None
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        log.warning("notify email: %s does not exist; write smtp_host (and smtp_port, from) there: no email sent",
                    path)
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("notify email: cannot read %s (%s): no email sent", path, exc)
        return None
    if not config.get("smtp_host"):
        log.warning("notify email: %s has no smtp_host: no email sent", path)
        return None
    return config


def send_email(address: str, event: Event, timeout: float = TIMEOUT) -> None:
    """Mail ``address`` about ``event`` through the SMTP server of the user's config; log what goes wrong."""
    config = smtp_config()
    if config is None:
        return
    message = EmailMessage()
    message["Subject"] = f"mpimap job {event.name}: {event.state}"
    message["From"] = config.get("from") or f"{getpass.getuser()}@{socket.getfqdn()}"
    message["To"] = address
    message.set_content(
        f"mpimap job {event.name} {'started' if event.event == 'start' else 'ended'}: {event.state}\n"
        f"points done {event.done}, failed {event.failed}, of {event.total}\n"
        + (f"{event.message}\n" if event.message else "")
        + f"job directory: {event.job_dir}\n")
    try:
        with smtplib.SMTP(config["smtp_host"], int(config.get("smtp_port", 25)), timeout=timeout) as smtp:
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        log.warning("notify email to %s (%s) failed: %s", address, event.event, exc)
