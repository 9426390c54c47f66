#!/bin/bash
{{directives}}
# mpimap job {{name}}, rendered by `mpimap submit` from a template (jobscripts/slurm.sh).
# To change what every job of a site does, copy the template, edit it and pass --template.

cd {{workdir}} || exit 2
{{env_setup}}
{{environment}}
{{batch_env}}

# The chain step (submit --resubmit/--until-done): records this allocation and queues its continuation; exit
# status 10 means the job is over already (done, failed or cancelled): end here, running nothing.
{{python}} -m mpimap.jobs.chain {{job_dir}} || [ $? -ne 10 ] || exit 0

# exec: mpiexec takes the shell's place, so Slurm's signals (scancel, --signal=B:...) reach it, and
# through it rank 0, which stores everything before the job ends.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
