#!/bin/bash
{{directives}}
# mpimap job {{name}}, rendered by `mpimap submit` from a template (jobscripts/sge.sh).
# To change what every job of a site does, copy the template, edit it and pass --template.

cd {{workdir}} || exit 2
# Grid Engine makes a per-job directory and names it in TMP, but TMPDIR does not always reach the job.
export TMPDIR="${TMPDIR:-$TMP}"
{{env_setup}}
{{environment}}
{{batch_env}}

# The chain step (submit --resubmit/--until-done): records this allocation and queues its continuation; exit
# status 10 means the job is over already (done, failed or cancelled): end here, running nothing.
{{python}} -m mpimap.jobs.chain {{job_dir}} || [ $? -ne 10 ] || exit 0

# exec: mpiexec takes the shell's place.  Grid Engine signals the job's process group, which holds mpiexec but
# not the ranks (MPICH starts them in sessions of their own): the s_rt warning SIGUSR1 reaches rank 0 because
# mpiexec passes it on; qmod -s (SIGSTOP) stops mpiexec only; qdel is SIGKILL (use mpimap cancel to stop the
# job cleanly).  mpiexec finds the slots in $PE_HOSTFILE.  Never end this script with status 99 (Grid Engine requeues the job) or
# 100 (it holds it in error, and its dependents with it): mpimap's own statuses are 0 to 5.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
