#!/usr/bin/env bash
# grpo-ds on one machine: `grpo-ds train` with NPROC ranks under the DeepSpeed launcher. It
# validates the config and checks the port before any rank starts.
#
#   launch/local.sh                                    # the embedded default task
#   NPROC=8 CONFIG=my.yaml launch/local.sh --train.steps=500
#   DS_CONFIG=ds_configs/zero3.json launch/local.sh --output.run_dir=runs/b
#
# Environment (default):
#   NPROC        ranks on this machine (unset: every GPU, or 2 on a machine without GPUs)
#   CONFIG       training YAML (unset: the embedded default)
#   DS_CONFIG    DeepSpeed JSON preset, passed as --deepspeed.config
#   MASTER_PORT  rendezvous port (unset: a free one)
#   DRY_RUN=1    print the command instead of running it
# Arguments after the script name are passed on: --section.key=value overrides.
set -euo pipefail

args=()
if [[ -n ${CONFIG:-} ]]; then args+=("$CONFIG"); fi
if [[ -n ${NPROC:-} ]]; then args+=("--deepspeed.num_gpus=$NPROC"); fi
if [[ -n ${DS_CONFIG:-} ]]; then args+=("--deepspeed.config=$DS_CONFIG"); fi
if [[ -n ${MASTER_PORT:-} ]]; then args+=("--deepspeed.master_port=$MASTER_PORT"); fi
command=(grpo-ds train "${args[@]}" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"
