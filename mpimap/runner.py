"""What ``mpimap run`` does on rank 0: open the results file, stream the map into it, obey the control file, close.

The CLI's ``run`` (and ``run --job DIR``, which the job scripts of ``mpimap
submit`` call) is a thin shell over :func:`run`.  A job run also writes the
job's ``status.json`` and sends its notifications.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError
from dataclasses import dataclass, fields

from .errors import MpimapError

log = logging.getLogger("mpimap.run")
CHOICES = {"isolation": ("rank", "process", "fresh"), "on_error": ("record", "stop"),
           "keep_logs": (None, "failed", "slow", "always"), "log_level": ("DEBUG", "INFO", "WARNING", "ERROR")}
EXIT_STATUS = {"complete": 0, "interrupted": 3, "cancelled": 5}  # 2: bad input, 4: ranks lost (__main__)
JOB_STATE = {"complete": "done", "interrupted": "interrupted", "cancelled": "cancelled", "failed": "failed"}


@dataclass
class RunOptions:
    """Every option of ``mpimap run`` by its Python name (what ``run_options`` of a job spec holds)."""

    chunksize: int | None = None          # points per message (None: from the measured cost of a point)
    fresh: bool = False                   # start over, replacing an existing results file
    retry_failed: bool = False            # on resume, evaluate failed points again too
    flush_interval: float = 1.0           # seconds between flushes of the results file (inf: only at the end)
    progress: bool | None = None          # progress line (None: when the job runs in a terminal's foreground)
    isolation: str = "process"
    point_timeout: float | None = None
    max_points: int | None = None
    max_memory_mb: float | None = None
    scratch: bool = False
    on_error: str = "record"              # record, or stop the job at the first point failed for good
    retries: int = 0
    quarantine: int = 2
    keep_logs: str | None = None
    slow_seconds: float = 1.0
    debug_rerun: bool = False
    log_level: str = "WARNING"
    verify: float = 0.0
    host_failures: int = 3                # 0: never retire a host
    stall_timeout: float | None = None
    rank_timeout: float = 60.0
    walltime: str | float | None = None   # the allocation's length from the run's start (MPIMAP_DEADLINE too)
    seed: int | None = None               # row i's random stream is mpimap.point_rng(seed, i) (None: no seed)
    init: str | None = None               # MODULE:FUNCTION run once in every evaluating process (Pool initializer)
    ranks_per_task: int = 1               # k > 1: each point runs on k ranks with mpimap.task_comm() (isolation rank)
    native: str | None = None             # LIBRARY:SYMBOL of a native model, instead of a Python function
    outputs: int | None = None            # the doubles a native model writes per point (with native only)

    @classmethod
    def from_json(cls, body: dict, where: str) -> "RunOptions":
        """Options read from a file (``where`` names it in errors): unknown names and bad values get one line."""
        if not isinstance(body, dict):
            raise MpimapError(f"{where}: run_options must be a mapping of option names to values")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise MpimapError(f"{where}: unknown run option(s) {', '.join(unknown)}; known: {', '.join(names)}")
        options = cls(**body)
        problem = options.problem()
        if problem:
            raise MpimapError(f"{where}: {problem}; fix it, or submit the job again")
        return options

    def problem(self) -> str | None:
        """What is wrong with these options, in a few words, or None."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if (value.upper() if name == "log_level" and isinstance(value, str) else value) not in allowed:
                return f"run option {name} must be one of {', '.join(map(str, allowed))}, not {value!r}"
        checks = [("chunksize", int, 1, True), ("max_points", int, 1, True), ("retries", int, 0, False),
                  ("quarantine", int, 1, False), ("host_failures", int, 0, False),
                  ("flush_interval", float, 0, False), ("slow_seconds", float, 0, False),
                  ("point_timeout", float, None, True), ("max_memory_mb", float, None, True),
                  ("stall_timeout", float, None, True), ("rank_timeout", float, None, False),
                  ("verify", float, 0, False), ("ranks_per_task", int, 1, False)]
        for name, kind, low, optional in checks:
            value = getattr(self, name)
            if value is None and optional:
                continue
            number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            if not number or (value <= 0 if low is None else value < low) or (name == "verify" and value > 1):
                bound = "> 0" if low is None else "between 0 and 1" if name == "verify" else f">= {low}"
                what = "an integer" if kind is int else "a number"
                return f"run option {name} must be {what} {bound}{' or null' if optional else ''}, not {value!r}"
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            return f"run option seed must be a non-negative integer or null, not {self.seed!r}"
        if self.init is not None and (not isinstance(self.init, str) or not all(self.init.rpartition(":")[::2])):
            return f"run option init must be MODULE:FUNCTION (e.g. mymodel:setup), not {self.init!r}"
        if self.walltime is not None:
            from .walltime import parse_walltime

            try:
                parse_walltime(self.walltime)
            except MpimapError as exc:
                return f"run option {exc}"
        native = self._native_problem()
        if native:
            return native
        if self.ranks_per_task > 1 and self.isolation != "rank":
            return (f"run option ranks_per_task={self.ranks_per_task} needs isolation rank (--isolation rank): a "
                    "point's ranks share an MPI communicator, and evaluation processes are not MPI processes")
        if self.ranks_per_task > 1 and self.chunksize not in (None, 1):
            return f"run option chunksize cannot be used with ranks_per_task={self.ranks_per_task}: leave it out"
        for name in ("fresh", "retry_failed", "scratch", "debug_rerun", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "progress" and value is None):
                return f"run option {name} must be true or false, not {value!r}"
        return None

    def _native_problem(self) -> str | None:
        """What is wrong with ``native`` and ``outputs`` together (the library itself is checked where it is
        loaded: :func:`mpimap.inputs.function_of`)."""
        if self.native is None:
            if self.outputs is not None:
                return ("run option outputs (--outputs) goes with native (--native LIBRARY:SYMBOL): a Python "
                        "function's values are what it returns; leave --outputs out")
            return None
        library, sep, symbol = self.native.rpartition(":") if isinstance(self.native, str) else ("", "", "")
        if not (sep and library and symbol):
            return (f"run option native (--native) must be LIBRARY:SYMBOL, e.g. ./libmodel.so:chi2, "
                    f"not {self.native!r}")
        if self.outputs is None:
            return (f"run option native (--native {self.native}) needs outputs: add --outputs NY, the number of "
                    "doubles the function writes per point")
        if not isinstance(self.outputs, int) or isinstance(self.outputs, bool) or self.outputs < 1:
            return (f"run option outputs (--outputs) must be the number of doubles the function writes per point, "
                    f"1 or more, not {self.outputs!r}")
        if self.ranks_per_task != 1:
            return (f"run option ranks_per_task={self.ranks_per_task} (--ranks-per-task) needs a Python function "
                    "using mpimap.task_comm(); a native model is evaluated on one rank: leave it out")
        return None

    def map_options(self) -> dict:
        """The options each point's evaluation gets (``Pool.imap_chunks``); failures are always recorded."""
        return dict(isolation=self.isolation, point_timeout=self.point_timeout, max_points=self.max_points,
                    max_memory_mb=self.max_memory_mb, scratch=self.scratch, on_error="record", retries=self.retries,
                    quarantine=self.quarantine, keep_logs=self.keep_logs, slow_seconds=self.slow_seconds,
                    debug_rerun=self.debug_rerun, verify=self.verify, ranks_per_task=self.ranks_per_task)


RUN_OPTIONS = tuple(f.name for f in fields(RunOptions))  # what run_options of a job spec may hold


@dataclass
class Outcome:
    """How a run ended: the state stored in the results file, a summary to show, the exit status."""

    state: str          # complete, interrupted or cancelled (a failed run raises)
    summary: str

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.state]


class _Interrupted(Exception):
    """SIGTERM (e.g. scancel), SIGINT or SIGUSR1 (the warning before the walltime) reached rank 0, or no more points
    fit before the deadline: stop, keeping everything stored so far."""


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT",
                signal.SIGUSR1: "SIGUSR1: warning before the walltime"}
GUARD_INTERVAL = 0.25  # seconds between the walltime guard's looks at the clock


def run(function: str | None, points: str, out: str, options: RunOptions = RunOptions()) -> Outcome:
    """Evaluate ``function`` (MODULE:NAME; None with ``options.native``, a native model) on every point of the file
    ``points``; results stream into ``out``.

    An existing ``out`` of the same function and points is resumed.  Commands
    appended to ``out + ".control"`` steer the run (see :mod:`mpimap.control`).
    Raises :class:`MpimapError` for bad input and when ``on_error="stop"`` stops it.
    """
    from .control import control_path

    return Runner(function, points, out, options, control_path(out)).run()


def run_job(job_dir: str) -> Outcome:
    """Run the job in ``job_dir`` as its ``job.json`` says: status.json, control file and notifications included."""
    from .jobs.files import JobDir
    from .jobs.job import Job

    spec = Job(job_dir).spec()
    jobdir = JobDir(job_dir)
    # A native model's job has no Python function (function ""): its run options name the model.
    if not isinstance(spec.function, str) or (spec.function and ":" not in spec.function):
        raise MpimapError(f"{jobdir.spec}: function must be MODULE:NAME (or empty, with run option native), "
                          f"not {spec.function!r}; submit the job again")
    options = RunOptions.from_json(spec.run_options, jobdir.spec)
    offset = _control_offset(job_dir)
    runner = Runner(spec.function or None, jobdir.points, jobdir.results, options, jobdir.control, jobdir=jobdir, spec=spec,
                    control_offset=offset)
    try:
        return runner.run()
    except BaseException as exc:
        # It failed before its first report (bad points, say): say so, unless another run of the job holds the
        # results file and reports for it.
        if runner.status is None and not locked_elsewhere(jobdir.results):
            from .jobs.chain import end
            from .jobs.status import StatusWriter, Tally

            message = (str(exc) or type(exc).__name__) + end(job_dir, "failed", 0)
            StatusWriter(jobdir.status, Tally(0), control_offset=lambda: offset).finish("failed", message)
        raise


def _control_offset(job_dir: str) -> int | None:
    """Where a run of the job starts reading its control file: where the previous run stopped (0 for the first
    run); None (the file's end) when that is unknown (a status.json of an older mpimap, or a damaged one)."""
    from .jobs.job import Job

    try:
        status = Job(job_dir).status()
    except MpimapError:
        return None
    return 0 if status is None else status.control_offset


class Runner:
    """One run of a map into a results file; a job's (``jobdir``, ``spec``) adds status.json and notifications."""

    def __init__(self, function: str | None, points: str, out: str, options: RunOptions, control: str, *,
                 jobdir=None, spec=None, control_offset: int | None = None):
        self.function, self.points_spec, self.out, self.options = function, points, out, options
        self.control = control
        self.control_offset = control_offset  # where to start reading the control file (None: at its end)
        self.watcher = None
        self.jobdir, self.spec = jobdir, spec
        self.pool = None
        self.status = None  # the StatusWriter of a job
        self._cancel = threading.Event()
        self.guard = None  # the _WalltimeGuard of a run with a deadline, while its map runs
        self._stopping = False  # a stop signal came: later ones (SGE signals every process twice) are ignored

    def _interrupt(self, signum, frame):
        """A stop signal: the first one raises :class:`_Interrupted` in the main thread; later ones do nothing, so
        the flush and close it leads to are never cut short."""
        if not self._stopping:
            self._stopping = True
            raise _Interrupted(STOP_SIGNALS[signum])

    def run(self) -> Outcome:
        from .control import Watcher, paused_before
        from .inputs import FunctionRef, function_of, load_points
        from . import world
        from .groups import split_options
        from .isolation import Isolation
        from .pool import Pool, map_settings
        from .scheduler import too_wide_message
        from .progress import Progress
        from .store import RESUME_FIX, ResultStore
        from .walltime import DEADLINE_ENV, Budget, deadline, reserve
        from .watchdog import bounded_read

        o = self.options
        problem = o.problem()
        if problem:
            raise MpimapError(problem)
        if o.ranks_per_task > world.workers():
            raise MpimapError(f"run option {too_wide_message(o.ranks_per_task, world.workers())}")
        end = deadline(os.environ.get(DEADLINE_ENV), o.walltime, started=time.time())
        budget = None if end is None else Budget(end, reserve(o.flush_interval), o.chunksize)
        logging.basicConfig(level=o.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Made first: commands sent from now on are this run's (a job's run also obeys those its previous run
        # did not read, and starts paused if that run was paused).
        watcher = self.watcher = Watcher(self.control, self.apply, offset=self.control_offset)
        paused = self.control_offset is not None and paused_before(self.control, self.control_offset)
        fn = function_of(self.function, o.native, o.outputs)
        init = None if o.init is None else FunctionRef(o.init)
        points = load_points(self.points_spec)
        try:
            map_settings(split_options(o.map_options(), Isolation(), o.chunksize)[0])
        except ValueError as exc:
            raise MpimapError(str(exc)) from None
        with bounded_read(self.out, RESUME_FIX):  # a damaged file can make HDF5 loop for ever while resuming it
            store = ResultStore.open(self.out, points, fn.spec, fresh=o.fresh, flush_interval=o.flush_interval,
                                     seed=o.seed)
            if o.fresh and self.jobdir is not None:
                self._fresh_done()
            try:
                todo = store.todo(o.retry_failed)
                counts = store.counts()
            except BaseException:
                store.close("failed")
                raise
        state, message, notifier = "failed", "", None
        old_handlers = {s: signal.signal(s, self._interrupt) for s in STOP_SIGNALS}
        meter = Progress(len(todo), already=len(points) - len(todo), enabled=o.progress)
        per_rank: Counter = Counter()
        try:
            notifier = self._start_job(counts, todo)
            if len(todo) and budget is not None and not budget.fits(time.time()):
                raise _Interrupted(budget.why_not(time.time()))
            if len(todo):
                with Pool(rank_timeout=o.rank_timeout, stall_timeout=o.stall_timeout,
                          host_failures=o.host_failures or None, initializer=init) as pool:
                    pool.set_log_level(o.log_level, "workers")
                    self.pool = pool
                    if paused:
                        self.apply({"command": "pause"})
                    try:
                        watcher.poll()  # the commands sent while no run was reading, in order
                        if self._cancel.is_set():
                            raise CancelledError
                        # A row's random stream is its row number, whichever rows this run maps.
                        chunks = pool.imap_chunks(fn, points[todo], chunksize=o.chunksize, seed=o.seed, keys=todo,
                                                  **o.map_options())
                        watcher.start()  # once the map exists: a cancel reaches it
                        if budget is not None:
                            self.guard = _WalltimeGuard(pool, budget, self._report)
                            self.guard.start()
                        self._stream(chunks, todo, store, meter, per_rank)
                    except CancelledError:
                        if self._cancel.is_set():
                            state = "cancelled"
                        elif self.guard is not None and self.guard.reason:
                            self._stopping = True  # a stop signal from now on would cut the flush short
                            raise _Interrupted(self.guard.reason) from None
                        else:
                            raise
                    finally:
                        watcher.stop()
                        if self.guard is not None:
                            self.guard.stop()
                        if self.status is not None:
                            self.status.keep_ranks()
                    pool.shutdown(wait=True)  # verifications may still be running
                    _store_verification(store, todo, pool.verification())
            if state == "failed":
                state = "complete"
        except _Interrupted as why:
            state = "interrupted"
            message = f"{why}: stopped; results so far are kept"
            resume = "run the same command to resume" if self.spec is None else \
                f"the chain's queued continuation resumes the job, if it has one; else mpimap resubmit {self.spec.name}"
            print(f"\nmpimap: {why}: stopping; results so far are kept in {self.out}; {resume}", file=sys.stderr,
                  flush=True)
        except BaseException as exc:
            message = str(exc) or type(exc).__name__
            raise
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            try:
                store.close(state)
            finally:
                self._end_job(state, message, notifier)
        if state == "cancelled":
            print(f"mpimap: cancelled through the control file; results so far are kept in {self.out}",
                  file=sys.stderr, flush=True)
        meter.close()
        return Outcome(state, meter.summary(out=self.out, state=state, per_rank=per_rank))

    def _stream(self, chunks, todo, store, meter, per_rank: Counter) -> None:
        """Write each chunk's results to the store as it arrives (``todo`` maps map positions to file rows)."""
        for chunk in chunks:
            host = chunk.host or socket.gethostname()
            kept = chunk.delivered()  # without the points that went to another attempt
            indices = todo[chunk.start:chunk.stop][list(chunk.offsets())]
            if self.guard is not None:
                self.guard.budget.measured(kept.durations, chunk.stop - chunk.start)
            misfits = store.write(indices, kept.values, kept.failures, kept.durations, chunk.rank, host,
                                  kept.attempts, kept.logs)
            per_rank[f"{host}/{chunk.rank}"] += len(indices)
            # A value the results file cannot hold fails its point there: count it as failed here too.
            meter.update(len(indices), [f.text for f in kept.failures.values()] + list(misfits.values()))
            if self.status is not None:
                self.status.tally.add(len(indices), [f.status for f in kept.failures.values()]
                                      + ["failed"] * len(misfits))
            if self.options.on_error == "stop" and kept.failures:
                offset, failure = next(iter(kept.failures.items()))
                again = (f"mpimap resubmit {self.spec.name} --retry-failed" if self.spec is not None else
                         "run the same command again with --retry-failed")
                raise MpimapError(f"point {indices[offset]} failed ({failure.text}); stopped by --on-error stop. "
                                  f"Results so far are in {store.path}: fix the cause, then {again}")

    def _fresh_done(self) -> None:
        """A job started over once: drop ``fresh`` from its spec, so a requeue or restart of the same batch job
        resumes what this run stores instead of starting over again."""
        from .jobs import files
        from .jobs.records import JobSpec

        self.spec.run_options = {k: v for k, v in self.spec.run_options.items() if k != "fresh"}
        files.write_json(self.jobdir.spec, JobSpec.FORMAT, JobSpec.VERSION, self.spec.to_json())

    # -- the control file (the watcher's thread) -----------------------------------
    def apply(self, command: dict) -> None:
        """Carry out one command from the control file: pause, resume, cancel, loglevel."""
        said = logging.getLogger("mpimap.control").warning  # in the job's log whatever its level
        name = command.get("command")
        if name == "loglevel":
            ranks = command.get("ranks", "all")
            self.pool.set_log_level(command["level"], ranks)
            said("log level of %s set to %s", ranks, command["level"])
        elif name == "pause" and not self._cancel.is_set():
            self.pool.pause()
            self._report("paused")
            said("paused: no new points are handed out; those being evaluated finish")
        elif name == "resume" and self.guard is not None and self.guard.reason:
            said("resume ignored: %s", self.guard.reason)
        elif name == "resume" and not self._cancel.is_set():
            self.pool.resume()
            self._report("running")
            said("resumed: handing out points again")
        elif name == "cancel":
            said("cancel: stopping; points being evaluated are abandoned")
            self._cancel.set()
            self.pool.cancel_all()
        elif name not in ("pause", "resume"):
            raise ValueError(f"unknown command {name!r}")

    def _report(self, state: str, message: str = "") -> None:
        if self.status is not None:
            self.status.set_state(state, message)

    # -- a job's status file and notifications ----------------------------------------
    def _start_job(self, counts: dict, todo):
        """Start the status writer and send the start notifications (in the background: a slow hook must not hold
        the job up); return the job's Notifier, or None for a plain run."""
        if self.jobdir is None:
            return None
        from .jobs.notify import Event, Notifier
        from .jobs.status import StatusWriter, Tally, rank_rows

        jobdir, spec = self.jobdir, self.spec
        tally = Tally.from_counts(counts, retry_failed=self.options.retry_failed)
        self.status = StatusWriter(jobdir.status, tally,
                                   lambda: rank_rows(self.pool.status(), lambda a, b: todo[a:b]) if self.pool else [],
                                   control_offset=lambda: self.watcher.offset)
        self.status.write()
        self.status.start()
        notifier = Notifier(spec.notify_command, spec.notify_email)
        notifier.start(Event(spec.name, "start", "running", jobdir.path, tally.done, tally.failed, tally.total))
        return notifier

    def _end_job(self, state: str, message: str, notifier) -> None:
        """The final status report, then the end notifications (what is left of the start ones is stopped)."""
        if self.status is None:
            return
        from .jobs.chain import end
        from .jobs.notify import Event

        job_state = JOB_STATE[state]
        t = self.status.tally
        first = self.status.history[0] if self.status.history else [0, t.done, t.failed]  # the run's first report
        # The allocation's record in the job's chain (queued continuation removed if the job is over).
        message += end(self.jobdir.path, job_state, t.done + t.failed - first[1] - first[2])
        self.status.finish(job_state, message)
        notifier.end(Event(self.spec.name, "end", job_state, self.jobdir.path, t.done, t.failed, t.total, message))


class _WalltimeGuard(threading.Thread):
    """Watches the clock for a run with a deadline: once the next chunk would not fit, it pauses the pool (no more
    points go out); once the points out are back, it cancels the map, which the run ends as interrupted.  Points
    not back when half the time kept to shut down is left are abandoned: nothing else may end the run in time
    (the local scheduler; PBS, which warns nobody before its kill)."""

    def __init__(self, pool, budget, report):
        super().__init__(name="mpimap-walltime", daemon=True)
        self.pool, self.budget, self.report = pool, budget, report
        self.reason = ""  # set when no more points are handed out: why (a "walltime: ..." line)
        self._stopped = threading.Event()

    def run(self):
        while not self._stopped.wait(GUARD_INTERVAL):
            now = time.time()
            if not self.reason and not self.budget.fits(now):
                self.reason = self.budget.why_not(now)  # first: from now on a resume command is ignored
                log.warning("%s; waiting for the points being evaluated", self.reason)
                self.report("paused", self.reason)
            if not self.reason:
                continue
            if not self.pool.paused:  # (again, if a resume command slipped in just before the reason was set)
                self.pool.pause()
            elif self.pool.drained():
                self.pool.cancel_all()  # nothing is out: every point computed has been delivered
                return
            elif self.budget.deadline.at - now < self.budget.spare / 2:
                self.reason += "; the points being evaluated were abandoned at the deadline"
                log.warning("walltime: %.0f s left: the points being evaluated are abandoned",
                            self.budget.deadline.at - now)
                self.pool.cancel_all()
                return

    def stop(self) -> None:
        self._stopped.set()


def locked_elsewhere(results: str) -> bool:
    """Whether a running job holds the lock of ``results`` (a lock file left by a kill is not held)."""
    import fcntl

    try:
        with open(f"{results}.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def _store_verification(store, todo, verification) -> None:
    """Record which points a second host agreed on (``--verify``) and say how many did not."""
    checks = [(todo[v["index"]], v["same"]) for v in verification]
    if checks:
        store.mark_verified(*zip(*checks))
        print(f"mpimap: verified {len(checks)} points on a second host: "
              f"{sum(not same for _, same in checks)} mismatches (column 'verified')", file=sys.stderr)
