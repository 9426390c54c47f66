"""What travels between the commands and the running master through the job directory: small named records.

Each record turns into the JSON body of its file (``to_json``) and back
(``from_json``); the file's format name and version are here too, so a
format change is one edit in this module (plus an upgrade function for the
old version in :func:`~mpimap.jobs.files.read_json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STATES = ("queued", "running", "paused", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
SKIPPED = "skipped"
"""A submission's state when it never ran: a continuation cancelled in the queue, or one that found the job over."""
EXIT_STATUS = {"done": 0, "failed": 1, "interrupted": 3, "cancelled": 5}
"""How a command that follows a job to its end (submit --wait, attach) exits for its final state, as `run` would."""


class _Record:
    """``to_json``/``from_json`` for a dataclass; unknown keys (from a newer minor writer) are ignored."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})

    def check(self) -> None:
        """Raise TypeError unless every field holds its annotated type (a file that is JSON but not this record)."""
        for f in fields(self):
            allowed = tuple(_TYPES[name] for name in f.type.split(" | ") if name in _TYPES)
            value = getattr(self, f.name)
            if allowed and (not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"{f.name} is {type(value).__name__}, not {f.type}")
            for item in value if isinstance(value, list) else ():
                if isinstance(item, _Record):
                    item.check()


_TYPES = {"int": int, "float": (int, float), "str": str, "list": list, "dict": dict, "bool": bool,
          "None": type(None)}


@dataclass
class Resources(_Record):
    """What the job asks of its batch system."""

    ranks: int = 2                      # MPI ranks in all (one master, the rest workers)
    nodes: int | None = None            # with ntasks_per_node instead of ranks
    ntasks_per_node: int | None = None
    walltime: str | None = None         # as the user gave it: MINUTES, HH:MM:SS or D-HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    priority: int | None = None         # higher runs sooner; mapped onto the batch system (Slurm: --nice)
    mail: str | None = None             # address for the batch system's own mail (begin, end, fail)


@dataclass
class JobSpec(_Record):
    """Everything needed to run the job again: written once by ``submit`` (``job.json``)."""

    FORMAT = "mpimap-job"
    VERSION = 1

    name: str
    function: str                       # MODULE:NAME or /abs/path/file.py:NAME
    points_source: str                  # what the user gave to --points (the job runs its copy, points.npy)
    run_options: dict                   # every `mpimap run` option by its Python name (e.g. point_timeout)
    resources: Resources
    scheduler: str                      # slurm, local (pbs, sge later)
    env_setup: str = ""                 # shell lines run before mpiexec (module load ..., source venv/bin/activate)
    template: str = ""                  # the template file the script was rendered from
    notify_command: str | None = None   # run by rank 0 when the job starts and ends
    notify_email: str | None = None     # mailed through the SMTP server of $MPIMAP_HOME/config.toml
    workdir: str = ""                   # where the job runs (submit's working directory)
    python: str = ""                    # the interpreter that runs mpimap in the job
    environment: dict = field(default_factory=dict)  # environment variables the job sets (PYTHONPATH, ...)
    user: str = ""
    created: float = 0.0                # unix time
    mpimap_version: str = ""
    resubmit: int = 0                   # continuations a chain may queue (0: none; see until_done)
    until_done: bool = False            # no limit, but stop after two allocations in a row that store nothing

    @classmethod
    def from_json(cls, body: dict):
        spec = super().from_json(body)
        spec.resources = Resources.from_json(spec.resources)
        return spec


@dataclass
class Submission(_Record):
    """One submission of the job to its batch system (a job may have several: resubmissions, requeues)."""

    FORMAT = "mpimap-batch"             # batch.json: {"submissions": [Submission, ...]}
    VERSION = 1

    batch_id: str                       # Slurm job id; for local: HOST:PID of the detached mpiexec's session
    scheduler: str
    submitted: float                    # unix time
    host: str = ""                      # where it was submitted from
    leader: str = ""                    # local: "BOOT_ID:START_TICKS" of the session leader, so a reused PID is not it
    # A chain's record of each allocation (mpimap.jobs.chain); absent from files of older mpimap: the defaults.
    after: str = ""                     # a continuation: the batch id it waits for (to end, however it ends)
    started: float | None = None        # unix time its allocation started (the chain step ran)
    ended: float | None = None          # unix time its master recorded the end
    points: int | None = None           # points stored in this allocation (None: unknown, e.g. killed)
    state: str = ""                     # running; how it ended (done, ..., interrupted); or skipped (never ran)
    restarts: int = 0                   # Slurm requeues of this batch job (SLURM_RESTART_COUNT)
    done_at_start: int | None = None    # points the job had stored (done + failed) when this allocation started


@dataclass
class RankRow(_Record):
    """One worker rank as the master sees it."""

    rank: int
    host: str
    pid: int
    state: str                          # busy, idle, lost or retired
    in_flight: int = 0                  # chunks sent and not yet back
    points_done: int = 0
    last_heard: float = 0.0             # seconds since the master last heard from it
    evaluating: list = field(default_factory=list)  # point indices (rows of the results file) it holds now
    frozen: float = 0.0                 # seconds its Python side has not moved while its native heartbeat goes on


@dataclass
class JobStatus(_Record):
    """What the running master reports (``status.json``, replaced every ~2 s and at every change of state)."""

    FORMAT = "mpimap-status"
    VERSION = 1

    state: str                          # one of STATES
    updated: float                      # unix time of this report ("last heard")
    total: int = 0
    done: int = 0
    failed: int = 0                     # failed for good: raised, timed out or crashed
    pending: int = 0
    started: float | None = None        # unix time the master started
    ended: float | None = None
    host: str = ""                      # the master's host and pid
    pid: int = 0
    batch_id: str = ""
    rate: float = 0.0                   # points per second over the last minute or so
    eta_seconds: float | None = None
    ranks: list = field(default_factory=list)      # RankRow bodies
    failures: dict = field(default_factory=dict)   # kind (raised, timeout, crashed, ...) -> count
    history: list = field(default_factory=list)    # [unix time, done, failed] samples, at most a few hundred
    message: str = ""                   # why it ended, for failed / cancelled / interrupted
    control_offset: int | None = None   # bytes of the control file the master has read (None: unknown)

    @classmethod
    def from_json(cls, body: dict):
        status = super().from_json(body)
        status.ranks = [RankRow.from_json(r) for r in status.ranks]
        return status
