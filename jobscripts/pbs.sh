#!/bin/bash
{{directives}}
# mpimap job {{name}}, rendered by `mpimap submit` from a template (jobscripts/pbs.sh: PBS Pro, OpenPBS, Torque).
# To change what every job of a site does, copy the template, edit it and pass --template.

# PBS copies a job's own output back only when it ends, and over the old file: the job appends to its
# log itself, so that `mpimap log -f` follows it and a requeued or continued job keeps what came before.
exec >>{{log}} 2>&1
cd {{workdir}} || exit 2
{{env_setup}}
{{environment}}
{{batch_env}}

# The chain step (submit --resubmit/--until-done): records this allocation and queues its continuation; exit
# status 10 means the job is over already (done, failed or cancelled): end here, running nothing.
{{python}} -m mpimap.jobs.chain {{job_dir}} || [ $? -ne 10 ] || exit 0

# exec: mpiexec takes the shell's place, so PBS's signals (qdel's SIGTERM, then SIGKILL) reach it, and
# through it rank 0, which stores everything before the job ends.  mpiexec finds the nodes in $PBS_NODEFILE.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
