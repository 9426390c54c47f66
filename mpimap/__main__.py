"""``python -m mpimap``: run a script with a pool of worker ranks, or a CLI command.

Under ``mpiexec -n N``, rank 0 runs the script (or the command) and the other
ranks serve as workers until it ends.  Worker ranks import the script as module
``__worker__`` (so functions defined in it can be found), which runs its
unguarded top-level code there too: keep the script's work under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import traceback
import types


EXIT_RANKS_LOST = 4  # the run finished, but some ranks were lost on the way
CANCEL_GRACE = 5.0  # seconds a cancelled `mpimap run` waits for its worker ranks to stop before ending the MPI job
MIN_STOP_GRACE = 10.0  # at the end, a worker not stopped within max(rank_timeout, this) seconds ends the MPI job


def _serve_script(path: str, comm) -> None:
    """Worker side of script mode: load the script's definitions as ``__main__`` and ``__worker__``, then serve.

    Classes and functions defined in the script belong to module ``__worker__``
    here; under both names, instances pickle on this rank and arguments sent as
    ``__main__.X`` resolve.
    """
    module = types.ModuleType("__main__")
    module.__dict__.update(runpy.run_path(path, run_name="__worker__"))
    sys.modules["__main__"] = sys.modules["__worker__"] = module
    from .worker import serve

    serve(comm)


def _alias_worker_module() -> None:
    """Rank 0 of script mode: what a worker pickled as ``__worker__.X`` is the script's ``__main__.X`` here."""
    alias = types.ModuleType("__worker__")
    alias.__getattr__ = lambda name: getattr(sys.modules["__main__"], name)  # the script's module while it runs
    sys.modules["__worker__"] = alias


def _workers_stopped(grace: float | None) -> bool:
    """Wait for every worker rank to have stopped serving; whether they did within ``grace`` seconds of waiting
    (None: for as long as it takes; time this process was suspended does not count).

    A cancelled run does not wait long: a point in user code under
    ``isolation="rank"`` cannot be stopped, and MPI_Finalize would wait for it.
    """
    from mpi4py import MPI

    request = MPI.COMM_WORLD.Ibarrier()
    waited, last = 0.0, time.monotonic()
    while not request.Test():
        now = time.monotonic()
        waited += min(now - last, 0.1)  # not the time this process did not run (a suspended job)
        last = now
        if grace is not None and waited > grace:
            return False
        time.sleep(0.01)
    return True


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .orphans import die_with_parent, outlive_parent

    # Before MPI starts: a launcher that dies after this kills the rank; one that died before it (the rank's
    # parent is its PMI server in MPICH, Open MPI and Slurm) fails MPI's start-up.
    die_with_parent()
    from mpi4py import MPI

    from . import world

    script = argv[0] if argv and argv[0].endswith(".py") else None
    size = MPI.COMM_WORLD.Get_size()
    if size == 1:  # not started by a launcher: a plain run may outlive the shell that started it (nohup)
        outlive_parent()
    comm = MPI.COMM_WORLD.Dup() if size > 1 else None
    if comm is not None and comm.Get_rank() > 0:
        # A signal to the whole job (scancel, Ctrl-C, the warning before the walltime: mpiexec forwards SIGUSR1,
        # Grid Engine signals the job's process group) is rank 0's to handle: it flushes the results and
        # then stops the workers.  A worker that died of it would take the job down before the flush.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        status = 0
        try:
            if script is not None:
                _serve_script(script, comm)
            else:
                from .worker import serve

                serve(comm)
        except Exception:  # the script failed to load here (rank 0 usually fails the same way): say why, end
            traceback.print_exc()
            sys.stderr.flush()
            status = 1
        MPI.COMM_WORLD.Ibarrier().Wait()  # rank 0 learns that the workers have stopped (see _workers_stopped)
        return status
    if script is None:
        # SIGUSR1 would end rank 0 by default: `mpimap run` handles it while its map runs, and a warning that
        # comes before or after that must not kill the master (its deadline, if known, still stops it in time).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if comm is not None:
        world.start(comm)
    status = 1
    try:
        if script is not None:
            _alias_worker_module()
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
            status = 0
        else:
            from .cli import main as cli_main

            status = cli_main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        # Work still queued when the script ends is finished first, as concurrent.futures does at exit;
        # after an error it is dropped.
        rank_timeout = world.master().rank_timeout if world.active() else None
        stop_grace = None if rank_timeout is None else max(rank_timeout, MIN_STOP_GRACE)
        lost = world.end(cancel=status != 0)
        if lost:
            # MPI_Finalize would wait for ever on a lost rank: everything is stored, so end the job here.
            sys.stdout.flush()
            sys.stderr.write(f"mpimap: ranks {sorted(lost)} were lost during the run; ending the MPI job "
                             f"with exit status {EXIT_RANKS_LOST}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(EXIT_RANKS_LOST if status == 0 else status)
        if comm is not None:
            from .runner import EXIT_STATUS

            cancelled = script is None and status == EXIT_STATUS["cancelled"]
            if not _workers_stopped(CANCEL_GRACE if cancelled else stop_grace):
                # The results are flushed and the status says cancelled: end the job (and its allocation) now.
                # Otherwise a rank went silent after the last map (stopped, or stuck in a point): MPI_Finalize
                # would wait for it for ever.
                if cancelled:
                    why = f"cancelled: worker ranks still evaluating points after {CANCEL_GRACE:g} s"
                else:
                    status = EXIT_RANKS_LOST if status == 0 else status
                    why = f"worker ranks did not stop within {stop_grace:g} s of the end (rank_timeout, at least " \
                          f"{MIN_STOP_GRACE:g} s): silent, or still inside a point"
                sys.stdout.flush()
                sys.stderr.write(f"mpimap: {why}; ending the MPI job with exit status {status}\n")
                sys.stderr.flush()
                MPI.COMM_WORLD.Abort(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
