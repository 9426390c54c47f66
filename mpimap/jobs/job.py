"""A job as the commands see it: found by name or directory, read from its files, steered through its control file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

import numpy as np

from ..errors import MpimapError
from . import files
from .batch import BatchView, scheduler
from .records import FINAL_STATES, SKIPPED, JobSpec, JobStatus, Submission

NOT_SUBMITTED = BatchView("pending", reason="not submitted yet")  # submit records the batch id after it submits
NO_STATUS = JobStatus(state="", updated=0.0)  # what a master that has not reported yet said
CANCEL_GRACE = 30.0  # seconds a running job has to stop by itself after a cancel before its batch job is ended


class Job:
    """One job directory; every read goes to the files, so it is current and works from any machine."""

    def __init__(self, path: str):
        self.dir = files.JobDir(os.path.abspath(path))

    @classmethod
    def open(cls, name_or_dir: str) -> "Job":
        """The job with this name (in the user's registry) or in this directory; one-line error if neither."""
        if os.path.isfile(os.path.join(name_or_dir, "job.json")):
            return cls(name_or_dir)
        if os.sep in name_or_dir:
            raise MpimapError(f"{name_or_dir} is not a job directory (it has no job.json)")
        from .registry import DEFAULT_SCAN, Registry  # the registry knows names

        registry = Registry()
        if not registry.exists():
            registry.rebuild([DEFAULT_SCAN])
        path = registry.jobs().get(name_or_dir)
        if path is None and os.path.isdir(name_or_dir):  # a directory of that name, but no job (a name may be both)
            raise MpimapError(f"no job named {name_or_dir!r}, and the directory {name_or_dir} is not a job directory "
                              f"(it has no job.json): `mpimap ls` lists your jobs")
        return cls(path if path is not None else registry.find(name_or_dir))

    @property
    def name(self) -> str:
        return self.spec().name

    def spec(self) -> JobSpec:
        return JobSpec.from_json(files.read_json(self.dir.spec, JobSpec.FORMAT, JobSpec.VERSION))

    def status(self) -> JobStatus | None:
        """The master's last report, or None before it first wrote one."""
        if not os.path.exists(self.dir.status):
            return None
        body = files.read_json(self.dir.status, JobStatus.FORMAT, JobStatus.VERSION)
        with _damaged(self.dir.status, JobStatus.FORMAT):
            status = JobStatus.from_json(body)
            status.check()
        return status

    def current_status(self) -> JobStatus | None:
        """The master's last report if it speaks for the job's last run; None while a resubmitted job has not
        reported yet (status.json still holds the earlier run's last word)."""
        return self.last_run()[0]

    def last_run(self) -> tuple[JobStatus | None, Submission | None]:
        """The master's last report and the submission it speaks for: the last one in batch.json, or a run
        started after it by hand (``job.sh`` run again; status.json names its batch id).  A report of a run
        before the last submission is None: the job is judged from the batch system's view alone.  In a chain, a
        continuation waiting for its predecessor's allocation lets that allocation speak; submissions that never
        ran (skipped) do not count."""
        status, every = self.status(), self.submissions()
        subs = [s for s in every if s.state != SKIPPED]
        last = subs[-1] if subs else None
        if status is not None and status.state in FINAL_STATES and \
                any(s.batch_id == status.batch_id and s.state == SKIPPED for s in every):
            return status, last  # cancelled between two allocations: the report names the removed continuation
        if last is not None and last.after and last.started is None:  # a chain's continuation, waiting
            before = next((s for s in subs if s.batch_id == last.after), None)
            if before is not None and before.started is not None:
                last = before  # for its predecessor's allocation, which speaks for the job
            elif before is None and status is not None and status.batch_id == last.after:
                # for a run by hand that holds the results file: it speaks for the job
                return status, Submission(batch_id=status.batch_id, scheduler=last.scheduler,
                                          submitted=status.started or 0.0)
        if last is not None and last.after and last.started is not None and status is not None \
                and status.batch_id == last.after:
            return None, last  # a continuation runs; its master has not reported yet
        if status is None or not status.batch_id or last is None or status.batch_id == last.batch_id:
            return status, last
        if (status.started or 0.0) >= last.submitted:
            return status, Submission(batch_id=status.batch_id, scheduler=last.scheduler, submitted=status.started)
        return None, last

    def submissions(self) -> list[Submission]:
        if not os.path.exists(self.dir.batch):
            return []
        body = files.read_json(self.dir.batch, Submission.FORMAT, Submission.VERSION)
        with _damaged(self.dir.batch, Submission.FORMAT):
            subs = [Submission.from_json(s) for s in body["submissions"]]
            for sub in subs:
                sub.check()
        return subs

    def points_total(self) -> int:
        """How many points the job has (from its copy of them; 0 if that cannot be read)."""
        try:
            return len(np.load(self.dir.points, mmap_mode="r"))
        except (OSError, ValueError):
            return 0

    @contextlib.contextmanager
    def batch_lock(self):
        """Hold the job's ``batch.lock`` (flock): batch.json is changed by the user's commands and by the running
        job (its chain) alike, and each change reads, edits and writes the whole file.  Not re-entrant."""
        fd = os.open(os.path.join(self.dir.path, "batch.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add_submission(self, submission: Submission) -> None:
        """Append a submission to batch.json (hold :meth:`batch_lock`)."""
        self.write_submissions(self.submissions() + [submission])

    def write_submissions(self, subs: list[Submission]) -> None:
        """Replace batch.json's submissions (hold :meth:`batch_lock`)."""
        files.write_json(self.dir.batch, Submission.FORMAT, Submission.VERSION,
                         {"submissions": [s.to_json() for s in subs]})

    def continuation(self, batch_id: str) -> Submission | None:
        """The continuation queued after batch job ``batch_id`` that has not started, if any, and that the batch
        system still holds: one removed outside mpimap (qdel, scancel) never runs, so the job does not go on."""
        waiting = next((s for s in self.submissions() if s.after == batch_id and s.started is None
                        and s.state != SKIPPED), None)
        if waiting is None or scheduler(waiting.scheduler).views([waiting])[waiting.batch_id].state != "gone":
            return waiting
        # Gone: it ran meanwhile (its start is recorded by now), or it was removed.
        return next((s for s in self.submissions() if s.batch_id == waiting.batch_id and s.started is not None), None)

    def batch_id(self) -> str:
        """The id of the job's last submission ('' if it was never submitted)."""
        subs = self.submissions()
        return subs[-1].batch_id if subs else ""

    def batch_view(self) -> BatchView:
        """What the batch system says of the last submission: queued reason, nodes, time left (Slurm); alive (local)."""
        run = self.last_run()[1]
        if run is None:
            return NOT_SUBMITTED
        return scheduler(self.spec().scheduler).views([run])[run.batch_id]

    def state(self, view: BatchView | None = None) -> str:
        """One of records.STATES, from the master's last report and the batch system's view.

        ``view`` (from :func:`batch_views`) spares a query per job when many are listed.
        """
        status, run = self.last_run()
        if status is not None and status.state in FINAL_STATES:
            state = status.state
        else:
            view = view or self.batch_view()
            if status is not None:
                # The master said it runs, but its batch job is gone: it died without a final word (kill -9, ...).
                state = "interrupted" if view.state == "gone" else status.state
            else:
                state = {"pending": "queued", "running": "running", "gone": "failed"}.get(view.state, "queued")
        # An allocation of a chain that ended (interrupted, or gone before its master reported) while its
        # continuation waits in the queue: the job goes on.
        ended = state == "interrupted" or (status is None and state == "failed")
        return "queued" if ended and run is not None and self.continuation(run.batch_id) else state

    def results(self, as_frame: bool | None = None):
        """The results so far, in point order: :func:`mpimap.load` of this job."""
        from ..results import load

        return load(self.dir.path, as_frame)

    def wait(self, poll: float = 2.0) -> str:
        """Block until the job has ended; return its final state."""
        while True:
            state = self.state()
            if state in FINAL_STATES:
                return state
            time.sleep(poll)

    def pause(self) -> None:
        """Ask the running master to hand out no new points (in-flight ones finish and are stored)."""
        self._steer("pause")

    def resume(self) -> None:
        self._steer("resume")

    def set_log_level(self, level: str, ranks="all") -> None:
        """Set the running job's log level on ``ranks``: all, master, workers or a list of worker ranks."""
        if isinstance(ranks, list):
            size = self.spec().resources.ranks
            beyond = [r for r in ranks if not 1 <= r < size]
            if beyond:
                raise MpimapError(f"rank {beyond[0]} is not a worker of job {self.name}: it has ranks 0 (master) "
                                  f"to {size - 1}, workers 1 to {size - 1}")
        self._steer("loglevel", level=level.upper(), ranks=ranks)

    def cancel(self, grace: float = CANCEL_GRACE) -> str:
        """Cancel the job; return what was done, in a few words.

        A queued job leaves the queue (its status says cancelled).  A running one
        is asked to stop (it flushes, records ``cancelled`` and ends).  Its master
        has ``grace`` seconds to record that, and then its processes ``grace``
        seconds more to end; whatever is late, its batch job is cancelled.
        """
        check_owner(self.dir.path)
        state = self.state()
        if state in FINAL_STATES:
            raise MpimapError(f"job {self.name} is {state} already; nothing to cancel")
        batch = scheduler(self.spec().scheduler)
        if self.cancel_continuations(batch) and self.state() in FINAL_STATES:  # it was between two allocations
            self._final_status("cancelled", "cancelled between two allocations of its chain")
            return "its queued continuation was removed: cancelled; its results so far stay readable"
        status, run = self.last_run()
        view = self.batch_view()
        if view.state == "pending" or status is None:
            if run is not None:
                batch.cancel(run)
            self._final_status("cancelled", "cancelled before it started")
            return "removed from the queue" if view.state == "pending" else "stopped before its master started"
        self._send({"command": "cancel"})
        answered = _within(grace, lambda: (self.current_status() or NO_STATUS).state in FINAL_STATES)
        if answered:
            final = self.current_status().state
            if _within(grace, lambda: self.batch_view().state != "running"):
                return f"{final}: its results so far stay readable"
            batch.cancel(run)
            return (f"{final}: the master stopped ({final}) but its processes did not end within {grace:g} s: "
                    f"killing them (batch job {run.batch_id} cancelled); its results so far stay readable")
        batch.cancel(run)
        self._final_status("cancelled", f"its master did not answer the cancel within {grace:g} s; "
                                        f"its batch job {run.batch_id} was cancelled")
        return f"cancelled: the master did not answer within {grace:g} s, so its batch job was ended"

    def cancel_continuations(self, batch) -> list[Submission]:
        """Remove the chain's continuations that have not started from the queue (recorded as skipped); return them.
        One that cannot be removed ends at once when it starts: its chain step finds the job over."""
        from .chain import skip_queued

        with self.batch_lock():
            subs = self.submissions()
            removed = skip_queued(batch, subs, [s for s in subs if s.after and s.started is None and s.state != SKIPPED])
            self.write_submissions(subs)
        return removed

    def resubmit(self, retry_failed: bool = False, fresh: bool = False) -> Submission:
        """Run a stopped (interrupted, failed or cancelled) job again: submit its script once more.

        It goes on where it stopped (points already stored are kept);
        ``retry_failed`` evaluates failed points again, ``fresh`` starts over.
        The two are written into the job's spec (``run_options``) for this
        submission, so the next resubmission sets them anew.
        """
        check_owner(self.dir.path)
        view = self.batch_view()
        state = self.state(view)
        if state not in ("failed", "cancelled", "interrupted") and not (state == "done" and (fresh or retry_failed)):
            why = ("nothing is left to run (--retry-failed evaluates its failed points again, --fresh all points)"
                   if state == "done" else "it has not ended (cancel it first)")
            raise MpimapError(f"job {self.name} is {state}: {why}")
        if view.state in ("pending", "running"):  # its master has reported the end; its processes still end
            raise MpimapError(f"job {self.name} is {state}, but its batch job {self.last_run()[1].batch_id} has not "
                              "ended yet: wait a few seconds and resubmit again")
        spec = self.spec()
        batch = scheduler(spec.scheduler)
        batch.check()
        options = {k: v for k, v in spec.run_options.items() if k not in ("retry_failed", "fresh")}
        options.update({k: True for k, on in (("retry_failed", retry_failed), ("fresh", fresh)) if on})
        if options != spec.run_options:
            spec.run_options = options
            files.write_json(self.dir.spec, JobSpec.FORMAT, JobSpec.VERSION, spec.to_json())
        return self.submit_script(batch)

    def submit_script(self, batch) -> Submission:
        """Submit the job's script to its batch system and record the submission in batch.json."""
        spec = self.spec()
        with self.batch_lock():  # the job's chain step, if it starts at once, waits until its submission is recorded
            batch_id = batch.submit(self.dir.script, spec.workdir, self.dir.log)
            submission = Submission(batch_id=batch_id, scheduler=batch.name, submitted=time.time(),
                                    host=socket.gethostname(), leader=batch.leader(batch_id))
            self.add_submission(submission)
        return submission

    def _steer(self, command: str, **fields) -> None:
        """Send a command that only a running master can carry out."""
        check_owner(self.dir.path)
        state = self.state()
        if state not in ("running", "paused"):
            why = "has not started yet" if state == "queued" else f"is {state}"
            raise MpimapError(f"job {self.name} {why}: {command} works only on a running job")
        self._send({"command": command, **fields})

    def _send(self, command: dict) -> None:
        from ..control import send

        send(self.dir.control, command)

    def _final_status(self, state: str, message: str) -> None:
        """Record a final state on the master's behalf (it never started, or did not stop)."""
        status = self.current_status() or JobStatus(state=state, updated=0.0, total=self.points_total())
        status.state, status.updated, status.ended, status.message = state, time.time(), time.time(), message
        status.batch_id = status.batch_id or self.batch_id()  # of the run it speaks for
        status.host = status.host or socket.gethostname()
        files.write_json(self.dir.status, JobStatus.FORMAT, JobStatus.VERSION, status.to_json())

    def __repr__(self):
        return f"Job({self.dir.path!r})"


def batch_views(jobs: list[Job]) -> dict[str, BatchView]:
    """The batch view of each job's last submission, keyed by job directory: one query per batch system."""
    by_scheduler: dict[str, dict[str, Submission]] = {}
    for job in jobs:
        run = job.last_run()[1]
        if run is not None:
            by_scheduler.setdefault(job.spec().scheduler, {})[job.dir.path] = run
    views = {job.dir.path: NOT_SUBMITTED for job in jobs}
    for name, last in by_scheduler.items():
        answers = scheduler(name).views(list(last.values()))
        views.update({path: answers[sub.batch_id] for path, sub in last.items()})
    return views


@contextlib.contextmanager
def _damaged(path: str, kind: str):
    """Turn a record that is JSON but not ``kind`` (a field missing, of a wrong type) into one DamagedFile line."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise files.DamagedFile(f"{path} is damaged (not a {kind} file: {exc}); restore it from a copy, "
                                f"or remove it if the job does not matter") from None


def _within(seconds: float, condition) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (looked at twice a second)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def check_owner(path: str) -> None:
    """Refuse a job directory of another user: its files are theirs to change."""
    if os.stat(path).st_uid != os.getuid():
        raise MpimapError(f"{path} belongs to another user; you can steer jobs of your own only")
