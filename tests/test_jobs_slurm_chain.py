"""Chains of allocations under a real Slurm (the ``slurm`` fixture): warning signal, requeue, kill -9.

A job of 2,000 points of 20 ms under a 1-minute walltime with ``--resubmit 5``: each allocation queues its
continuation (``--dependency=afterany``) as it starts, and the job goes on in it after whatever ends the
allocation.  The warning is sent for real with ``scancel -b -s USR1`` rather than waited for.
"""

import os
import signal
import subprocess

import numpy as np
import pytest

from test_jobs_slurm import User, points, reference, wait_for

N = 2000


@pytest.fixture
def campaign(slurm, tmp_path):
    """A user with 2,000 points of 20 ms; every Slurm job of theirs is cancelled at the end of the test."""
    u = User(slurm, tmp_path, sleep=0.02)
    np.save(tmp_path / "points.npy", points(N))
    yield u
    for line in slurm.command("squeue", "-h", "-o", "%i %Z", check=False).stdout.splitlines():
        batch_id, workdir = line.split(maxsplit=1)
        if workdir.startswith(str(tmp_path)):
            slurm.command("scancel", batch_id, check=False)
    subprocess.run(["pkill", "-9", "-f", f"mpimap run --job {tmp_path}/"], timeout=30)


def submit_chain(user: User, name: str, *options: str) -> str:
    """Submit the campaign on 3 ranks with a 1-minute walltime as a chain; return its first batch id."""
    user("submit", "jobfuncs:record", "--points", "points.npy", "--name", name, "--scheduler", "slurm",
         "--ranks", "3", "--walltime", "1", *options)
    return user.ls(name)["batch_id"]


def chain(user: User, name: str) -> list[dict]:
    return user.json("status", name)["chain"]


def storing(user: User, name: str, batch_id: str) -> None:
    """Wait until batch job ``batch_id`` runs the job's master and it has stored points."""
    wait_for(lambda: (s := user.json("status", name)["status"]) and s["batch_id"] == batch_id
             and s["state"] == "running" and s["done"] > 0, 90, f"batch job {batch_id} stores points")


def assert_finished(user: User, name: str, timeout: float = 150) -> list[dict]:
    """Done with the serial results, every point stored once and evaluated about once; the chain's records."""
    row = user.wait_state(name, "done", timeout=timeout)
    assert (row["done"], row["failed"], row["total"]) == (N, 0, N)
    r = user.results(name)
    assert set(r["status"]) == {"done"} and len(r["status"]) == N
    assert np.array_equal(r["value"], reference(points(N)))
    runs = user.evaluated()
    assert sorted(set(runs)) == list(range(N))
    assert len(runs) - N <= 150  # redone at most: the points in flight and those stored since the last flush (1 s)
    links = chain(user, name)
    for link in links:  # whatever is left of the chain leaves the queue
        wait_for(lambda: user.squeue(link["batch_id"]) == ("", ""), 60, f"batch job {link['batch_id']} ends")
    return links


def test_warning_signals_end_allocations_and_the_chain_finishes_the_job(campaign):
    first = submit_chain(campaign, "long", "--resubmit", "5")
    script = (campaign.job_dir("long") / "job.sh").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@20" in script  # a third of a minute
    storing(campaign, "long", first)
    [one, two] = wait_for(lambda: len(c := chain(campaign, "long")) == 2 and c, 30, "the continuation is queued")
    assert two["after"] == first and campaign.squeue(two["batch_id"])[0] == "PENDING"
    campaign.slurm.command("scancel", "-b", "-s", "USR1", first)  # the walltime's warning, now
    storing(campaign, "long", two["batch_id"])
    campaign.slurm.command("scancel", "-b", "-s", "USR1", two["batch_id"])
    links = assert_finished(campaign, "long")
    assert (campaign.job_dir("long") / "job.log").read_text().count("SIGUSR1: warning before the walltime") >= 2
    ran = [link for link in links if link["state"] not in ("skipped",)]
    assert [link["batch_id"] for link in ran[:2]] == [first, two["batch_id"]] and len(ran) >= 3
    assert all(link["started"] for link in ran) and ran[-1]["state"] == "done"
    assert sum(link["points"] or 0 for link in ran) <= N + 150 and ran[-1]["points"] > 0
    assert links[-1]["state"] == "skipped"  # the continuation queued by the last allocation: removed
    assert campaign.slurm_state(links[-1]["batch_id"]) == "CANCELLED"
    text = campaign("status", "long").stdout
    assert f"allocations of {len(links)} batch jobs (resubmit 5)" in text
    for link in ran:
        assert f"    {link['batch_id']}" in text


def test_a_requeued_allocation_resumes_and_nothing_is_lost(campaign):
    first = submit_chain(campaign, "requeue", "--resubmit", "2")
    storing(campaign, "requeue", first)
    wait_for(lambda: len(chain(campaign, "requeue")) == 2, 30, "the continuation is queued")
    # Slurm holds the requeued job back until its first run's credential expires (10 s on the test cluster; it
    # must not be started earlier: Slurm then kills it as "non-startable"), then runs it again.  Its second run
    # resumes; or, if its continuation started first (Slurm may count the requeue as its end), it ends at once:
    # the job is done, or the continuation holds the results file.
    campaign.slurm.command("scontrol", "requeue", first)
    assert_finished(campaign, "requeue")  # the requeued batch job has left the queue too (it may have ended
    # interrupted: its 1-minute walltime's warning counts from its first start)
    links = chain(campaign, "requeue")
    mine = [link for link in links if link["batch_id"] == first]
    assert len(mine) == 1 and mine[0]["restarts"] == 1  # its second run, recorded on the same batch job
    assert len([link for link in links if link["after"] == first]) == 1  # which queued no second continuation
    assert sum(link["points"] or 0 for link in links) <= N + 150


def test_kill_9_of_mpiexec_the_continuation_finishes_the_job(campaign):
    first = submit_chain(campaign, "killed", "--resubmit", "2")
    storing(campaign, "killed", first)
    wait_for(lambda: len(chain(campaign, "killed")) == 2, 30, "the continuation is queued")
    job_dir = campaign.job_dir("killed")
    mpiexec = [int(pid) for pid in subprocess.run(["pgrep", "-f", f"mpiexec .*run --job {job_dir}$"],
                                                   capture_output=True, text=True, timeout=30).stdout.split()]
    assert len(mpiexec) == 1, mpiexec
    os.kill(mpiexec[0], signal.SIGKILL)
    links = assert_finished(campaign, "killed")
    # Its master either died with it (no end recorded) or got Slurm's SIGTERM to the job's other step first.
    assert links[0]["batch_id"] == first and links[0]["state"] in ("running", "interrupted"), links
    assert links[1]["after"] == first and links[1]["started"] and links[1]["points"] > 0, links  # it went on


def test_a_job_whose_points_would_not_fit_stops_handing_out_and_ends_before_the_limit(campaign, tmp_path):
    """The master stops by itself (exit status 3, interrupted, "walltime: ...") and Slurm never has to kill it.

    The deadline the job script tells the master is 16 s after the allocation starts: well before Slurm's own
    warning (``--signal=B:USR1@20`` of the 1-minute walltime comes 30-40 s in), so it is the master's own
    deadline that stops it."""
    from conftest import TESTS

    text = open(os.path.join(os.path.dirname(TESTS), "jobscripts", "slurm.sh")).read()
    step = text.index("{{python}} -m mpimap.jobs.chain")
    template = tmp_path / "short.sh"
    template.write_text(text[:step] + "export MPIMAP_DEADLINE=$(( $(date +%s) + 16 ))\n" + text[step:])
    campaign.env["MPIMAP_TEST_SLEEP"] = "0.5"  # 2,000 points of 0.5 s on 2 workers: far more than fits
    first = submit_chain(campaign, "short", "--template", str(template), "--chunksize", "1")
    row = campaign.wait_state("short", "interrupted", timeout=90)
    status = campaign.json("status", "short")["status"]
    assert status["message"].startswith("walltime: "), status["message"]
    assert status["ended"] - status["started"] < 16
    wait_for(lambda: campaign.squeue(first) == ("", ""), 60, f"batch job {first} ends")
    slurm_job = campaign.slurm.command("scontrol", "show", "job", first).stdout
    assert "ExitCode=3:0" in slurm_job and "JobState=TIMEOUT" not in slurm_job, slurm_job  # its own status
    r = campaign.results("short")
    done = r["status"] == "done"
    assert 0 < done.sum() == row["done"] < N and set(r["status"][~done]) == {"pending"}
    assert np.array_equal(r["value"][done], reference(points(N))[done])
    assert sorted(campaign.evaluated()) == sorted(np.flatnonzero(done))  # every point handed out came back, stored
