#!/usr/bin/env bash
# grpo-ds on several machines with the DeepSpeed launcher. Two ways to start it:
#
# 1. ssh mode (NODE_RANK unset): one command, on the first host of the hostfile. The launcher
#    starts every host's ranks over passwordless ssh with pdsh.
#      HOSTFILE=launch/hostfile launch/multinode.sh [CONFIG.yaml] [--section.key=value ...]
#    Needs pdsh on this host, passwordless ssh to every host (the launcher checks the first one),
#    and the repo at the same path with the same Python environment on every host: the launcher
#    runs `cd $PWD; python -m deepspeed.launcher.launch ...` there.
#
# 2. no_ssh mode (NODE_RANK set): one command per node, which you (or SLURM, see
#    slurm/grpo.sbatch, or Kubernetes) start on every node at about the same time:
#      on node A:  NNODES=2 NODE_RANK=0 MASTER_ADDR=nodeA launch/multinode.sh [args]
#      on node B:  NNODES=2 NODE_RANK=1 MASTER_ADDR=nodeA launch/multinode.sh [args]
#    Each launcher starts only its own node's ranks (`deepspeed --no_ssh --node_rank R`); no ssh.
#    Without HOSTFILE, a hostfile of NNODES lines with NPROC_PER_NODE slots is written for the
#    launcher: in this mode the names are labels (NODE_NAMES, else node0, node1, ...) and the
#    order of the lines is the node rank.
#
# Both modes: rank 0 writes the run directory, and every rank loads the warm-up model from it, so
# output.run_dir must be on a filesystem all nodes share. Before launching, launch/preflight.py
# checks the hostfile, the config for the whole world size, that MASTER_ADDR resolves and (on node
# rank 0) that MASTER_PORT is free, so these mistakes fail in seconds instead of in every rank.
#
# Environment (default):
#   NPROC_PER_NODE  ranks per node (the GPUs assigned, else every GPU; 2 on a machine without GPUs)
#   CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS  no_ssh mode: the node's ranks run on these GPUs, not
#                   on 0..N-1 (grpo_ds/launch_devices.py); a given HOSTFILE's slots on the node
#                   must then reach the highest index. ssh mode numbers every host 0..N-1.
#   NNODES          nodes to use (ssh mode: every host in HOSTFILE; no_ssh mode: required)
#   NODE_RANK       this node's rank, 0..NNODES-1; set it to choose no_ssh mode
#   MASTER_ADDR     address of node rank 0, reachable from every node (ssh mode: the first
#                   host's `hostname -I`; no_ssh mode: required)
#   MASTER_PORT     rendezvous port on MASTER_ADDR (29500); checked free before launch on node 0
#   HOSTFILE        MPI-style hostfile, `host slots=N` per line (see hostfile.example)
#   NODE_NAMES      no_ssh mode without HOSTFILE: space-separated host labels for the log
#   CONFIG          training YAML (unset: the embedded default); DS_CONFIG -> --deepspeed.config
#   RANK_LOG_DIR    each rank's stdout/stderr goes to DIR/<time>_rank<r>.log, not the console
#   BIND_CORES_TO_RANK  1: bind each rank to its share of this launcher's CPUs with numactl
#                   (error without numactl), auto: where numactl is installed, 0: no binding (0)
#   DEEPSPEED_TIMEOUT  minutes a rank waits for the others, at the rendezvous and in every
#                   collective (DeepSpeed's default 10), unless the config's
#                   deepspeed.timeout_minutes sets it. A node that never arrives fails the rest
#                   after this long; do not set it below your slowest generation phase.
#   DRY_RUN=1       run the checks, print the launcher command, do not launch
#   PYTHON          interpreter with grpo_ds and deepspeed installed (python)
#
# Environment variables on every node. ssh mode: the launcher exports this shell's NCCL*,
# PYTHON*, UCX*, MV2* and MLFLOW* variables, plus every KEY=VALUE line of ~/.deepspeed_env and
# then ./.deepspeed_env (the file name can be changed with DS_ENV_FILE). Those files take one
# KEY=VALUE per line, with no blank lines and no comments: the launcher splits every line at '='.
# no_ssh mode: the launcher reads no .deepspeed_env; every node's ranks inherit the environment
# of the command that started them (srun passes the job's environment on by default).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}

# no_ssh mode: the GPUs SLURM or CUDA_VISIBLE_DEVICES gave this node ("4,5,6,7"; empty when none
# were assigned, or on CPU). The launcher would otherwise renumber the ranks onto GPUs 0..N-1.
devices=""
if [[ -n ${NODE_RANK:-} && -n ${CUDA_VISIBLE_DEVICES:-}${SLURM_JOB_GPUS:-} ]]; then
    devices=$("$python" -m grpo_ds.launch_devices ${NPROC_PER_NODE:+--num_gpus "$NPROC_PER_NODE"} \
        | tail -n1)
    if [[ -n $devices && -z ${NPROC_PER_NODE:-} ]]; then
        IFS=, read -r -a ids <<< "$devices"
        NPROC_PER_NODE=${#ids[@]}
    fi
fi
# (tail: DeepSpeed may log its accelerator choice on stdout first)
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$python" -c \
    'from grpo_ds.cli import default_num_ranks; print(default_num_ranks())' 2>/dev/null | tail -n1)}
if [[ -z $NPROC_PER_NODE ]]; then
    echo "multinode.sh: cannot import grpo_ds with '$python'; activate its environment" >&2
    exit 2
fi

train_args=()
if [[ -n ${CONFIG:-} ]]; then train_args+=("$CONFIG"); fi
if [[ -n ${DS_CONFIG:-} ]]; then train_args+=("--deepspeed.config=$DS_CONFIG"); fi
train_args+=("$@")

launcher=("$python" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")
preflight=("$python" "$here/preflight.py" --num_gpus "$NPROC_PER_NODE")
generated=""
trap '[[ -n $generated ]] && rm -f "$generated"' EXIT

if [[ -n ${NODE_RANK:-} ]]; then
    : "${NNODES:?no_ssh mode (NODE_RANK set) needs NNODES}"
    : "${MASTER_ADDR:?no_ssh mode (NODE_RANK set) needs MASTER_ADDR, the address of node rank 0}"
    if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
        echo "multinode.sh: NODE_RANK=$NODE_RANK is outside 0..$((NNODES - 1))" >&2
        exit 2
    fi
    if [[ -z ${HOSTFILE:-} ]]; then
        generated=$(mktemp "${TMPDIR:-/tmp}/grpo-ds-hostfile.XXXXXX")
        read -r -a names <<< "${NODE_NAMES:-}"
        # this node's slots must include the highest assigned device index
        here_slots=$NPROC_PER_NODE
        IFS=, read -r -a ids <<< "$devices"
        for id in "${ids[@]}"; do
            if (( id + 1 > here_slots )); then here_slots=$((id + 1)); fi
        done
        for ((i = 0; i < NNODES; i++)); do
            slots=$NPROC_PER_NODE
            if (( i == NODE_RANK )); then slots=$here_slots; fi
            echo "${names[i]:-node$i} slots=$slots" >> "$generated"
        done
        HOSTFILE=$generated
    fi
    launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    preflight+=(--master_addr "$MASTER_ADDR")
    # Only node rank 0 hosts the rendezvous; it probes the port on every interface.
    if (( NODE_RANK == 0 )); then preflight+=(--check_port "$MASTER_PORT"); fi
else
    : "${HOSTFILE:?ssh mode needs HOSTFILE (or set NODE_RANK for no_ssh mode)}"
    if [[ -n ${MASTER_ADDR:-} ]]; then
        launcher+=(--master_addr "$MASTER_ADDR")
        # The port is checked only if MASTER_ADDR is one of this machine's addresses.
        preflight+=(--master_addr "$MASTER_ADDR" --check_port "$MASTER_PORT"
                    --port_host "$MASTER_ADDR")
    fi
    if ! command -v pdsh > /dev/null; then
        echo "multinode.sh: ssh mode needs pdsh on this host (or use no_ssh mode: NODE_RANK)" >&2
        exit 2
    fi
fi
launcher+=(--hostfile "$HOSTFILE")
preflight+=(--hostfile "$HOSTFILE")
if [[ -n ${NNODES:-} ]]; then preflight+=(--num_nodes "$NNODES"); fi
if [[ -n $devices ]]; then
    # --include names every node's slots (it excludes --num_gpus and --num_nodes): this node's
    # assigned GPUs; for the others 0..N-1, which only count their ranks (each node's own
    # launcher picks its own devices).
    mapfile -t hosts < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
    include=""
    for ((i = 0; i < NNODES; i++)); do
        slots=$(seq -s, 0 $((NPROC_PER_NODE - 1)))
        if (( i == NODE_RANK )); then slots=$devices; fi
        include+="${include:+@}${hosts[i]}:$slots"
    done
    launcher+=(--include "$include")
else
    launcher+=(--num_gpus "$NPROC_PER_NODE")
    if [[ -n ${NNODES:-} ]]; then launcher+=(--num_nodes "$NNODES"); fi
fi
if [[ -n ${RANK_LOG_DIR:-} ]]; then launcher+=(--enable_each_rank_log "$RANK_LOG_DIR"); fi
# Per-rank CPU binding: the CPUs this launcher may use (its affinity: under srun --cpu-bind, the
# task's), split evenly over the node's ranks by numactl, each rank's OMP_NUM_THREADS set to its
# share (DeepSpeed's --bind_cores_to_rank). Without it every rank's threads roam all the CPUs.
case ${BIND_CORES_TO_RANK:-0} in
    0) ;;
    1 | auto)
        if command -v numactl > /dev/null; then
            cpus=$("$python" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))')
            launcher+=(--bind_cores_to_rank --bind_core_list "$cpus")
        elif [[ $BIND_CORES_TO_RANK == 1 ]]; then
            echo "multinode.sh: BIND_CORES_TO_RANK=1 needs numactl on this node" >&2
            exit 2
        else
            echo "multinode.sh: no numactl here: ranks are not bound to cores (BIND_CORES_TO_RANK=auto)"
        fi ;;
    *) echo "multinode.sh: BIND_CORES_TO_RANK=$BIND_CORES_TO_RANK: must be 0, 1 or auto" >&2
       exit 2 ;;
esac
launcher+=(--module grpo_ds.train "${train_args[@]}")

"${preflight[@]}" "${train_args[@]}"
if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${launcher[@]}"
    echo
    exit 0
fi
"${launcher[@]}"
