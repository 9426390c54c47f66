#!/bin/bash
# mpimap job {{name}} on this machine, rendered by `mpimap submit` from a template (jobscripts/local.sh).
# It runs detached, in a session of its own; its output goes to {{log}}.

cd {{workdir}} || exit 2
{{env_setup}}
{{environment}}
{{batch_env}}

# exec: mpiexec takes the shell's place, so `mpimap cancel`'s SIGTERM reaches it, and through it rank 0.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
