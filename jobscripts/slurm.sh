#!/bin/bash
{{directives}}
# mpimap job {{name}}, rendered by `mpimap submit` from a template (jobscripts/slurm.sh).
# To change what every job of a site does, copy the template, edit it and pass --template.

cd {{workdir}} || exit 2
{{env_setup}}
{{environment}}
{{batch_env}}

# exec: mpiexec takes the shell's place, so Slurm's signals (scancel, --signal=B:...) reach it, and
# through it rank 0, which stores everything before the job ends.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
