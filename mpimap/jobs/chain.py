"""Jobs that span allocations: a chain of batch jobs, each resuming the same results file.

``mpimap submit --resubmit N`` (or ``--until-done``) makes every allocation
queue its own continuation as soon as it starts (:func:`start`, run by the job
script before ``mpiexec``): a batch job that may start only once this one has
ended, however it ends.  So the continuation exists even when the allocation is
killed without a warning.  At the end, the master records how the allocation
went (:func:`end`); a job that is over (done, failed, cancelled) removes the
queued continuation, and a continuation that starts anyway ends at once.

Everything is recorded in ``batch.json`` (one :class:`~.records.Submission`
per batch job), under the job's batch lock: the running job and the user's
commands both change it.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from ..errors import MpimapError
from .batch import scheduler
from .job import Job
from .records import SKIPPED, Submission

OVER = 10
"""Exit status of :func:`start` when the job is over: the job script then ends with exit status 0 without running
(never 99 or 100, which Grid Engine takes as "requeue" and "error")."""
OVER_STATES = ("done", "failed", "cancelled")


def this_batch_id() -> str:
    """The batch id of the allocation this process runs in (the job script exports it), '' outside one."""
    return os.environ.get("MPIMAP_BATCH_ID", "")


def start(job_dir: str) -> int:
    """The allocation starts: end at once (return :data:`OVER`) if the job is over; else record the allocation and
    queue its continuation if the chain has budget left and none is queued yet; return 0 (run the job)."""
    job = Job(job_dir)
    batch_id = this_batch_id()
    spec = job.spec()
    with job.batch_lock():
        subs = job.submissions()
        me = _find(subs, batch_id)
        if me is None:  # the script run by hand, not a submission of the job: no chain
            return 0
        try:
            status = job.status()
        except MpimapError:
            status = None
        now = time.time()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if me.started is None:  # a requeue keeps its first start's count
            me.done_at_start = status.done + status.failed if status is not None else 0
        why = _over(spec, subs, me, status, restarts)
        if why:
            _not_run(me, restarts, now)
            job.write_submissions(subs)
            print(f"mpimap: {why}: this allocation ({batch_id}) has nothing to do", file=sys.stderr, flush=True)
            return OVER
        holder = _holder(job, status, batch_id)
        if holder:
            # Another run of the job holds the results file (a run started by hand, a continuation that started
            # while this batch job was requeued): running now would fail.  The chain goes on after that run.
            _not_run(me, restarts, now)
            _queue(job, spec, subs, me, after=holder)
            job.write_submissions(subs)
            print(f"mpimap: the results file is in use by batch job {holder}: this allocation ends, the chain goes "
                  "on after it", file=sys.stderr, flush=True)
            return OVER
        earlier = me.points if restarts else None  # a Slurm requeue adds to what its earlier runs stored
        me.started, me.ended, me.points, me.state, me.restarts = now, None, earlier, "running", restarts
        _queue(job, spec, subs, me, after=batch_id)
        job.write_submissions(subs)
    return 0


def _not_run(me: Submission, restarts: int, now: float) -> None:
    """Record that this start of batch job ``me`` runs nothing: skipped, or, for a requeue of one that ran already,
    its earlier allocation's record is kept."""
    if me.started is None:
        me.state, me.started, me.ended = SKIPPED, now, now
    me.restarts = restarts


def end(job_dir: str, state: str, points: int | None) -> str:
    """The master ends this allocation in ``state`` having stored ``points``: record it; remove the queued
    continuation if the job is over or the chain stops.  Return what to add to the job's final message ('' if
    nothing).  A damaged batch.json is said in the log, and never keeps the master from recording its end."""
    try:
        return _end(job_dir, state, points)
    except MpimapError as exc:
        print(f"mpimap: cannot record this allocation's end in the job's chain: {exc}", file=sys.stderr, flush=True)
        return ""


def _end(job_dir: str, state: str, points: int | None) -> str:
    job = Job(job_dir)
    batch_id = this_batch_id()
    spec = job.spec()
    with job.batch_lock():
        subs = job.submissions()
        me = _find(subs, batch_id)
        if me is None:
            return ""
        me.ended, me.state = time.time(), state
        me.points = me.points if points is None else (me.points or 0) + points  # (me.points: a requeue's earlier)
        queued = [s for s in subs if s.after == batch_id and s.started is None and s.state != SKIPPED]
        batch = scheduler(spec.scheduler)
        for sub in [s for s in queued if batch.views([s])[s.batch_id].state == "gone"]:  # removed: qdel, scancel
            sub.state, sub.ended = SKIPPED, time.time()
            queued.remove(sub)
        stalled = state == "interrupted" and spec.until_done and _no_progress(subs, me)
        if stalled:
            note = "; the chain stops: two allocations in a row stored no new point (mpimap resubmit goes on)"
        elif state == "interrupted" and queued:
            note = f"; the chain goes on: batch job {queued[0].batch_id} is queued"
        elif state == "interrupted" and (spec.until_done or spec.resubmit):
            note = "; the chain ends here: no continuation is queued (mpimap resubmit goes on)"
        else:
            note = ""
        if state != "interrupted" or stalled:
            skip_queued(batch, subs, queued)
        job.write_submissions(subs)
    return note


def skip_queued(batch, subs: list[Submission], queued: list[Submission]) -> list[Submission]:
    """Cancel these queued continuations (records of ``subs``, changed in place to skipped); return them.  A cancel
    that fails is no harm: the continuation ends at once when it starts, as the job is over."""
    for sub in queued:
        try:
            batch.cancel(sub)
        except MpimapError as exc:
            print(f"mpimap: could not remove continuation {sub.batch_id} from the queue ({exc}); it ends at once "
                  "when it starts", file=sys.stderr, flush=True)
        sub.state, sub.ended = SKIPPED, time.time()
    return queued


def _find(subs: list[Submission], batch_id: str) -> Submission | None:
    return next((s for s in reversed(subs) if batch_id and s.batch_id == batch_id), None)


def _over(spec, subs: list[Submission], me: Submission, status, restarts: int) -> str:
    """Why this allocation must not run ('' if it must).  A continuation or a requeued batch job ends when the job
    is over; a first submission, or a resubmission, runs whatever the job's last word."""
    if status is not None and status.state in OVER_STATES and (me.after or restarts or status.batch_id == me.batch_id):
        return f"job {spec.name} is {status.state} already"
    before = _find(subs, me.after) if me.after else None
    if before is not None and spec.until_done and _no_progress(subs, before):
        return f"job {spec.name}: two allocations in a row stored no new point; the chain stops"
    return ""


def _no_progress(subs: list[Submission], last: Submission) -> bool:
    """Whether ``last`` and the allocation before it in the chain both stored no point."""
    before = _find(subs, last.after) if last.after else None
    return _stored(subs, last) == 0 and before is not None and _stored(subs, before) == 0


def _stored(subs: list[Submission], sub: Submission) -> int | None:
    """Points ``sub``'s allocation stored: as its master recorded at its end or, for one that died without a word
    (kill -9, a lost node), what the job had gained when the allocation after it started; None if unknown."""
    if sub.points is not None:
        return sub.points
    after = next((s for s in subs if s.after == sub.batch_id and s.done_at_start is not None), None)
    if sub.done_at_start is None or after is None:
        return None
    return after.done_at_start - sub.done_at_start


def _links(subs: list[Submission], me: Submission) -> int:
    """How many continuations led to ``me`` since its chain began (0 for the chain's first batch job)."""
    count, seen = 0, set()
    while me is not None and me.after and me.batch_id not in seen:
        seen.add(me.batch_id)
        count += 1
        me = _find(subs, me.after)
    return count


def _queue(job: Job, spec, subs: list[Submission], me: Submission, after: str) -> None:
    """Submit the continuation of ``me`` to start after batch job ``after``, if the chain has budget left and none
    is queued after it yet; append it to ``subs``.  A submission that fails is said in the log, never fatal."""
    if not (spec.until_done or _links(subs, me) < spec.resubmit):
        return
    if any(s.after == after and s.state != SKIPPED for s in subs):  # a requeued batch job queued it already
        return
    batch = scheduler(spec.scheduler)
    try:
        batch_id = batch.submit(job.dir.script, spec.workdir, job.dir.log, after=after)
    except MpimapError as exc:
        print(f"mpimap: could not queue the chain's continuation ({exc}); `mpimap resubmit {spec.name}` goes on "
              "where this allocation stops", file=sys.stderr, flush=True)
        return
    subs.append(Submission(batch_id=batch_id, scheduler=batch.name, submitted=time.time(), host=socket.gethostname(),
                           leader=batch.leader(batch_id), after=after))


def _holder(job: Job, status, batch_id: str) -> str:
    """The batch id of another live run that holds the job's results file ('' if none does)."""
    from ..runner import locked_elsewhere

    if status is None or not status.batch_id or status.batch_id == batch_id:
        return ""
    return status.batch_id if locked_elsewhere(job.dir.results) else ""


if __name__ == "__main__":  # python -m mpimap.jobs.chain JOB_DIR: the job script's chain step
    try:
        sys.exit(start(sys.argv[1]))
    except MpimapError as exc:  # never stops the job: `run --job` says what is wrong, if anything is
        print(f"mpimap: chain step: {exc}", file=sys.stderr, flush=True)
