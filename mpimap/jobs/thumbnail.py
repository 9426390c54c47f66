"""A small image of a job's progress (PNG by default): points done and failed over time, and which points are done.

Drawn with matplotlib's Agg canvas (no display, no pyplot state), from the
job's files only; matplotlib is an optional extra (``mpimap-hpc[plot]``).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import MpimapError
from ..results import FAILED, write_atomically
from .files import DamagedFile
from .job import Job
from .records import JobStatus
from .views import reported

SIZE = (6.4, 2.6)   # inches at DPI: a 640 x 260 pixel image
DPI = 100
MAP_POINTS = 50_000  # more points than this are drawn as an even sample
COLORS = {"done": "#2ca02c", "failed": "#d62728", "pending": "#bbbbbb"}


def _figure_class():
    """matplotlib's Figure; one line saying how to install matplotlib if it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MpimapError("the thumbnail needs matplotlib: pip install mpimap-hpc[plot]") from None
    return Figure


def image_format(path: str) -> str:
    """The image format ``path``'s extension names (png without one); one line if matplotlib cannot write it."""
    formats = _figure_class()().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension and extension not in formats:
        raise MpimapError(f"-o {path}: matplotlib cannot write .{extension} files; use one of "
                          f"{', '.join(sorted(formats))}")
    return extension or "png"


def render(job: Job, path: str, points_and_status=None, image: str = "png") -> tuple[int, int]:
    """Draw the thumbnail of ``job`` into ``path`` (as ``image``: png, jpg, svg, ...); its size in pixels.

    ``points_and_status``: the points and their statuses if the caller has
    read them already (else they are read here from the job's files).
    """
    Figure = _figure_class()
    status = reported(job)
    history = _samples(job, status)
    points, states = points_and_status if points_and_status is not None else read_points_and_status(job)
    dims = {1: 1, 2: points.shape[1] if points.ndim == 2 else 0}.get(points.ndim, 0)
    drawn_map = len(points) > 0 and dims in (1, 2)
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, 2 if drawn_map else 1, squeeze=False)[0]
    total = status.total if status else len(states)
    done, failed = (status.done, status.failed) if status else _counts(states)
    figure.suptitle(f"{job.name}: {done} done, {failed} failed of {total}", fontsize=9)
    _draw_history(axes[0], history, total)
    if drawn_map:
        _draw_map(axes[1], points.reshape(len(points), -1), states)
    write_atomically(path, lambda tmp: figure.savefig(tmp, format=image))
    width, height = figure.canvas.get_width_height()
    return width, height


def read_points_and_status(job: Job):
    """The job's points and each one's status (pending, done, failed), from its results file or its points copy."""
    from ..store import read_results

    if os.path.exists(job.dir.results):
        data = read_results(job.dir.results)
        return data["points"], _simplified(data["status"])
    if os.path.exists(job.dir.points):
        points = np.load(job.dir.points, allow_pickle=False)
        return points, np.full(len(points), "pending", dtype=object)
    return np.empty((0, 1)), np.empty(0, dtype=object)


def _simplified(status: np.ndarray) -> np.ndarray:
    out = np.where(np.isin(status, FAILED), "failed", status)
    return out.astype(object)


def _counts(states) -> tuple[int, int]:
    return int(np.sum(states == "done")), int(np.sum(states == "failed"))


def _samples(job: Job, status: JobStatus | None) -> np.ndarray:
    """The status file's ``[time, done, failed]`` samples as rows; a damaged file (anything else) is one line."""
    history = status.history if status else []
    if all(isinstance(s, list) and len(s) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in s) for s in history):
        return np.array(history, dtype=float).reshape(-1, 3)
    raise DamagedFile(f"{job.dir.status} is damaged (not a {JobStatus.FORMAT} file: history holds something other "
                      f"than [time, done, failed] samples); restore it from a copy, or remove it if the job does not "
                      f"matter")


def _draw_history(ax, samples: np.ndarray, total: int) -> None:
    """Points done and failed against minutes since the first sample."""
    ax.set_title("over time", fontsize=8)
    ax.tick_params(labelsize=7)
    if not len(samples):
        ax.text(0.5, 0.5, "no progress reported yet", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        return
    minutes = (samples[:, 0] - samples[0, 0]) / 60
    ax.plot(minutes, samples[:, 1], color=COLORS["done"], label="done")
    ax.plot(minutes, samples[:, 2], color=COLORS["failed"], label="failed")
    if total:
        ax.axhline(total, color="#888888", linewidth=0.8, linestyle="--")
    ax.set_xlabel("minutes", fontsize=7)
    ax.legend(fontsize=7, loc="upper left")


def _draw_map(ax, points: np.ndarray, states: np.ndarray) -> None:
    """1-D: each point's position in a row per status; 2-D: the points coloured by status."""
    ax.set_title("points", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(points) > MAP_POINTS:
        keep = np.linspace(0, len(points) - 1, MAP_POINTS).astype(int)
        points, states = points[keep], states[keep]
    size = max(1.0, min(20.0, 4000 / len(points)))
    for row, name in enumerate(("pending", "failed", "done")):
        mine = states == name
        if not mine.any():
            continue
        if points.shape[1] == 1:
            ax.scatter(points[mine, 0], np.full(mine.sum(), row), s=size, color=COLORS[name], marker="|")
        else:
            ax.scatter(points[mine, 0], points[mine, 1], s=size, color=COLORS[name], label=name, linewidths=0)
    if points.shape[1] == 1:
        ax.set_yticks([0, 1, 2], ["pending", "failed", "done"])
        ax.set_ylim(-0.5, 2.5)
    else:
        ax.legend(fontsize=6, loc="upper right", markerscale=2)
