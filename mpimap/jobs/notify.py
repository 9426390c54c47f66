"""Notifications rank 0 of a job sends when it starts and when it ends: a user's command, and an email.

Neither may stop or hang the job: a hook that fails or runs too long is
logged (in the job's log) and the job goes on.  A notify command runs in a
process group of its own, killed whole when it overruns: the start notice
while the job still runs it, the end notice after :data:`END_TIMEOUT`
seconds, so a finished job releases its allocation promptly.
"""

from __future__ import annotations

import getpass
import logging
import os
import smtplib
import socket
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from email.message import EmailMessage

log = logging.getLogger("mpimap.notify")
TIMEOUT = 60.0  # seconds the start notice's command or SMTP exchange may take (the job runs meanwhile)
END_TIMEOUT = 10.0  # seconds the end notice's may take: the job waits for it before it ends


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


class Notifier:
    """Sends a job's notifications: the start notice in the background, the end notice within END_TIMEOUT.

    The start notice's command, if still running when the job ends, is killed
    (its whole process group): nothing of it outlives the job unnoticed.
    """

    def __init__(self, command: str | None, email: str | None):
        self.command, self.email = command, email
        self._running: set = set()  # notify commands running now (Popen)
        self._lock = threading.Lock()
        self._ended = False
        self._start: threading.Thread | None = None

    def start(self, event: Event) -> None:
        if self.command or self.email:
            self._start = threading.Thread(target=self._notify, args=(event, TIMEOUT), name="mpimap-notify",
                                           daemon=True)
            self._start.start()

    def end(self, event: Event) -> None:
        """Stop what is left of the start notice, then send the end notice (bounded by END_TIMEOUT)."""
        with self._lock:
            self._ended = True
            for proc in self._running:
                log.warning("notify command %r (start) still running at the job's end: killed", self.command)
                _kill_group(proc)
        if self._start is not None:
            self._start.join(1.0)  # the start notice goes first, unless its email hangs
        self._notify(event, END_TIMEOUT)

    def _notify(self, event: Event, timeout: float) -> None:
        if self.command:
            self._run_command(event, timeout)
        if self.email:
            send_email(self.email, event, timeout)

    def _run_command(self, event: Event, timeout: float) -> None:
        """Run the command with a shell, the event in its environment; log what goes wrong."""
        with tempfile.TemporaryFile() as output:  # a file, not a pipe: a child left behind holds no pipe open
            with self._lock:
                if self._ended and event.event == "start":
                    return
                try:
                    proc = subprocess.Popen(self.command, shell=True, env={**os.environ, **event.environment()},
                                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                except OSError as exc:
                    log.warning("notify command %r (%s) could not run: %s", self.command, event.event, exc)
                    return
                self._running.add(proc)
            try:
                status = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("notify command %r (%s) did not finish within %g s: killed", self.command, event.event,
                            timeout)
                _kill_group(proc)
                return
            finally:
                with self._lock:
                    self._running.discard(proc)
            if status not in (0, -signal.SIGKILL):  # killed: said by whoever killed it
                output.seek(0)
                log.warning("notify command %r (%s) exited %d: %s", self.command, event.event, status,
                            output.read().decode(errors="replace").strip()[-500:])


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the notify command and every process it started (its session's process group), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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


def send_email(address: str, event: Event, timeout: float) -> None:
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
