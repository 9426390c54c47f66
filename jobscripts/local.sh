#!/bin/bash
# mpimap job {{name}} on this machine, rendered by `mpimap submit` from a template (jobscripts/local.sh).
# It runs detached, in a session of its own; its output goes to {{log}}.

cd {{workdir}} || exit 2
{{env_setup}}
{{environment}}
{{batch_env}}

# Open MPI's mpiexec refuses more ranks than cores, and refuses to run as root; MPICH's allows both, and this
# machine is the job's whole allocation.
export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy-:oversubscribe}"
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# Open MPI's mpiexec names its session directory after its pid and leaves it behind when killed; a later mpiexec
# that gets the same pid (this shell's: exec keeps it) ends at once, "The PMIx server's listener thread failed
# to start".  Remove this user's session directories whose mpiexec is gone, where Open MPI puts them.
stale=()
base="${PRTE_MCA_prte_local_tmpdir_base:-${PRTE_MCA_prte_tmpdir_base:-${TMPDIR:-${TMP:-${TEMP:-/tmp}}}}}"
for dir in "$base"/ompi.*; do
    pid="${dir##*/ompi.}"
    if [[ -d "$dir" && ! -L "$dir" && -O "$dir" && "$pid" =~ ^[0-9]+$ ]] &&
        { [ "$pid" -eq $$ ] || ! kill -0 "$pid" 2>/dev/null; }; then
        stale+=("$dir")
    fi
done
[ ${#stale[@]} -eq 0 ] || rm -rf -- "${stale[@]}"

# The chain step (submit --resubmit/--until-done): records this allocation and queues its continuation; exit
# status 10 means the job is over already (done, failed or cancelled): end here, running nothing.
{{python}} -m mpimap.jobs.chain {{job_dir}} || [ $? -ne 10 ] || exit 0

# exec: mpiexec takes the shell's place, so `mpimap cancel`'s SIGTERM reaches it, and through it rank 0.
exec {{mpiexec}} -n {{ranks}} {{python}} -m mpimap run --job {{job_dir}}
