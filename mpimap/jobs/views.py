"""What ``status`` and ``ps`` show, built from a job's files only (no port, no daemon): records, then lines.

The logic lives here, as plain records with ``to_json`` (for ``--json``) and
``lines`` (for people); the commands in :mod:`.commands_read` only print them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from ..progress import bar_line
from .batch import BatchView
from .job import Job
from .records import FINAL_STATES, SKIPPED, JobStatus

STALE_SECONDS = 30.0  # a running master reports every ~2 s: this long without a report deserves a word


def batch_json(view: BatchView) -> dict:
    """The batch system's view (state, queued reason, nodes, time left) as a dict for people and ``--json``."""
    return dataclasses.asdict(view)


def clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def duration(seconds: float | None) -> str:
    """``1:02:03``, or ``3.2 s`` below a minute."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def index_ranges(indices) -> str:
    """Point indices as compact ranges: ``3-6,9``."""
    out, run = [], None
    for i in sorted(int(i) for i in indices):
        if run and i == run[1] + 1:
            run[1] = i
        else:
            run = [i, i]
            out.append(run)
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "-"


@dataclass
class HostRow:
    """The ranks of a job on one host, as its master last reported them."""

    host: str
    ranks: int = 0
    alive: int = 0
    busy: int = 0
    idle: int = 0
    lost: int = 0      # lost or retired
    pids: list = field(default_factory=list)  # of the live ranks (of an ended job: of those live at its end)
    ended: bool = False  # the job has ended: none of its ranks is alive, whatever the last report said

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def host_rows(status: JobStatus | None, ended: bool = False) -> list[HostRow]:
    """Ranks alive / busy / idle per host, with the PIDs of the live ones; ``ended``: of a job that has ended."""
    hosts: dict[str, HostRow] = {}
    for rank in status.ranks if status else []:
        row = hosts.setdefault(rank.host, HostRow(rank.host, ended=ended))
        row.ranks += 1
        if rank.state in ("busy", "idle"):
            row.pids.append(rank.pid)
            if not ended:
                row.alive += 1
                setattr(row, rank.state, getattr(row, rank.state) + 1)
        else:
            row.lost += 1
    return sorted(hosts.values(), key=lambda r: r.host)


def reported(job: Job) -> JobStatus | None:
    """The master's last report, with the job's point count (from its points copy) if it never counted them:
    a job that failed before reading its points."""
    status = job.status()
    if status is not None and status.total == 0:
        total = job.points_total()
        status = dataclasses.replace(status, total=total, pending=total - status.done - status.failed)
    return status


def bar(status: JobStatus, ended: bool) -> str:
    """The progress bar of a report; of an ended job without rate and time left (they were about its run)."""
    line = bar_line(status.done + status.failed, status.total, status.failed, status.rate, status.eta_seconds)
    return line.rsplit(", ", 2)[0] if ended else line


@dataclass
class StatusReport:
    """Everything ``mpimap status`` shows about one job."""

    name: str
    directory: str
    state: str
    status: JobStatus | None
    hosts: list
    batch: dict
    thumbnail: str
    thumbnail_written: float | None    # mtime of the thumbnail, None if there is none
    now: float
    chain: list = field(default_factory=list)  # every submission (batch.json), the chain's allocations
    chain_limit: str = ""              # what bounds the chain: "resubmit N", "until done", or "" (no chain)

    @classmethod
    def of(cls, job: Job) -> "StatusReport":
        view = job.batch_view()
        state = job.state(view)  # before the report: a final state comes with the final report's counts (see ls)
        status = reported(job)
        ended = state in FINAL_STATES
        if ended and status is not None:
            status = dataclasses.replace(status, eta_seconds=None)  # a killed master's last report still has one
        thumb = job.dir.thumbnail
        spec = job.spec()
        limit = "until done" if spec.until_done else f"resubmit {spec.resubmit}" if spec.resubmit else ""
        return cls(name=job.name, directory=job.dir.path, state=state, status=status,
                   hosts=host_rows(status, ended), batch=batch_json(view), thumbnail=thumb,
                   thumbnail_written=os.path.getmtime(thumb) if os.path.exists(thumb) else None, now=time.time(),
                   chain=job.submissions(), chain_limit=limit)

    def to_json(self) -> dict:
        s = self.status
        return {"name": self.name, "directory": self.directory, "state": self.state,
                "last_heard_seconds": self.now - s.updated if s else None,
                "status": s.to_json() if s else None, "hosts": [h.to_json() for h in self.hosts],
                "batch": self.batch, "thumbnail": self.thumbnail if self.thumbnail_written else None,
                "thumbnail_written": self.thumbnail_written, "chain_limit": self.chain_limit or None,
                "chain": [sub.to_json() for sub in self.chain]}

    def lines(self) -> list[str]:
        s = self.status
        out = [f"job {self.name}: {self.state}", f"  directory  : {self.directory}"]
        if s is None:
            out.append("  progress   : not started yet (no status file)")
        else:
            out.append(f"  progress   : {s.done} done, {s.failed} failed, {s.pending} pending of {s.total}")
            out.append(f"               {bar(s, self.state in FINAL_STATES)}")
            out.append(f"  started    : {clock(s.started)}" + (f", ended {clock(s.ended)}" if s.ended else ""))
            age = self.now - s.updated
            stale = (f" (no report for {duration(age)}: is the job alive? the batch view below says)"
                     if age > STALE_SECONDS and self.state not in FINAL_STATES else "")
            out.append(f"  last heard : {duration(age)} ago, master {s.host} pid {s.pid}{stale}")
            if s.message:
                out.append(f"  message    : {s.message}")
            if self.hosts and self.state in FINAL_STATES:
                out.append(f"  ranks      : {sum(h.ranks for h in self.hosts)} on {len(self.hosts)} host(s) when "
                           "the job ended (none runs now)")
                for h in self.hosts:
                    lost = f" ({h.lost} lost)" if h.lost else ""
                    out.append(f"    {h.host}: {h.ranks} rank{'s' if h.ranks != 1 else ''}{lost}, pids were "
                               f"{' '.join(map(str, h.pids)) or '-'}")
            elif self.hosts:
                alive = sum(h.alive for h in self.hosts)
                out.append(f"  ranks      : {alive} alive, {sum(h.busy for h in self.hosts)} busy, "
                           f"{sum(h.idle for h in self.hosts)} idle on {len(self.hosts)} host(s)")
                for h in self.hosts:
                    lost = f", {h.lost} lost" if h.lost else ""
                    out.append(f"    {h.host}: {h.alive} alive ({h.busy} busy, {h.idle} idle{lost}), "
                               f"pids {' '.join(map(str, h.pids)) or '-'}")
            if s.failures:
                out.append("  failures   : " + ", ".join(f"{kind} {n}" for kind, n in
                                                          Counter(s.failures).most_common()))
        out += self.chain_lines()
        if self.batch:
            out.append("  batch      : " + ", ".join(f"{k} {v}" for k, v in self.batch.items()
                                                     if v not in (None, "", [], {})))
        if self.thumbnail_written:
            out.append(f"  thumbnail  : {self.thumbnail} (written {clock(self.thumbnail_written)})")
        else:
            out.append(f"  thumbnail  : none yet; mpimap thumbnail {self.directory} writes {self.thumbnail}")
        return out

    def chain_lines(self) -> list[str]:
        """The chain's batch jobs, one line each (none for a job submitted once without a chain)."""
        recorded = any(s.started is not None or s.state for s in self.chain)  # none: batch.json before chains
        if not self.chain_limit and (len(self.chain) < 2 or not recorded):
            return []
        ran = sum(s.started is not None and s.state != SKIPPED for s in self.chain)
        out = [f"  chain      : {ran} allocation{'s' if ran != 1 else ''} of {len(self.chain)} batch jobs"
               + (f" ({self.chain_limit})" if self.chain_limit else "")]
        for i, s in enumerate(self.chain):
            state = s.state or ("running" if s.started is not None else "queued" if i == len(self.chain) - 1
                                and self.state not in FINAL_STATES else f"submitted {clock(s.submitted)}")
            if state == "running" and (self.state in FINAL_STATES or any(t.started for t in self.chain[i + 1:])):
                state = "ended without a word"  # killed (kill -9, node lost): nothing recorded its end
            end = s.ended or self.now
            if state == "ended without a word":  # it lasted until the next link started, if one did
                end = next((t.started for t in self.chain[i + 1:] if t.started), None)
            when = "" if s.started is None or state == SKIPPED else f", {clock(s.started)}" + (
                f" for {duration(end - s.started)}" if end is not None else "")
            points = f", {s.points} points" if s.points is not None else ""
            after = f" after {s.after}" if s.after else ""
            restarts = f", requeued {s.restarts}x" if s.restarts else ""
            out.append(f"    {s.batch_id}{after}: {state}{points}{when}{restarts}")
        return out


@dataclass
class ProcessRow:
    """One process of a running job, as ``mpimap ps`` lists it."""

    job: str
    host: str
    rank: int
    pid: int
    state: str          # master, busy, idle, lost or retired
    evaluating: list    # point indices it holds now
    frozen: float = 0.0  # seconds its Python side has not moved while it is alive (a C call holding the GIL)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def processes(job: Job, view: BatchView | None = None) -> list[ProcessRow]:
    """The processes of a running (or paused) job from its status file; [] if it does not run.

    ``view``: the batch system's view of the job, if the caller asked for many jobs at once.
    """
    status = job.status()
    if status is None or job.state(view) not in ("running", "paused"):
        return []
    name = job.name
    rows = [ProcessRow(name, status.host, 0, status.pid, "master", [])]
    rows += [ProcessRow(name, r.host, r.rank, r.pid, r.state, list(r.evaluating), r.frozen) for r in status.ranks]
    return rows


def idle_summary(rows: list[ProcessRow]) -> list[str]:
    """Which ranks are idle, and which hosts have no busy rank at all."""
    idle = [r for r in rows if r.state == "idle"]
    hosts = sorted({r.host for r in rows if r.state in ("busy", "idle")})
    quiet = [h for h in hosts if not any(r.host == h and r.state == "busy" for r in rows)]
    workers = [r for r in rows if r.state in ("busy", "idle")]
    out = [f"{len(idle)} of {len(workers)} live worker ranks idle"
           + (": " + ", ".join(f"{r.job} rank {r.rank} on {r.host}" for r in idle[:20]) if idle else "")
           + (" ..." if len(idle) > 20 else "")]
    out.append("hosts with no busy rank: " + (", ".join(quiet) if quiet else "none"))
    return out


def ps_table(rows: list[ProcessRow]) -> list[str]:
    header = ("JOB", "HOST", "RANK", "PID", "STATE", "EVALUATING")
    table = [header] + [(r.job, r.host, str(r.rank), str(r.pid), r.state + (f" (frozen {r.frozen:.0f}s)" if r.frozen >= 0.5 else ""),
                         index_ranges(r.evaluating) if r.evaluating else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
