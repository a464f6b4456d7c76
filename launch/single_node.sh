#!/usr/bin/env bash
# One node, several GPUs (or CPU ranks), through the deepspeed launcher.
#
#   bash launch/single_node.sh train.total_steps=1000          # pretraining on every GPU
#   NUM_GPUS=4 ENTRY=multitask CONFIG=multitask_12in1 bash launch/single_node.sh
#
# Variables (all optional):
#   ENTRY          pretrain | multitask | finetune            (default: pretrain)
#   CONFIG         training YAML or packaged preset           (default: pretrain_cc for pretrain)
#   DS_CONFIG      DeepSpeed JSON                             (default: ds_configs/zero2.json)
#   NUM_GPUS       ranks on this node                         (default: every visible GPU)
#   MASTER_PORT    rendezvous port                            (default: 29500)
#   RESUME         none | auto | PATH                         (default: auto)
#   VILBERT_DS_WATCHDOG_S  seconds of heartbeat silence that end the job (default: 120)
#   DS_ACCELERATOR cpu to run CPU ranks (then NUM_GPUS is the number of CPU ranks)
# Arguments: extra entry-point arguments and section.key=value overrides.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # paths stay relative to where you run it
ENTRY=${ENTRY:-pretrain}
config=()  # pretrain needs a config (its preset by default); the others have defaults
if [ -n "${CONFIG:-}" ]; then config=(--config "$CONFIG"); elif [ "$ENTRY" = pretrain ]; then config=(--config pretrain_cc); fi
args=(--master_port "${MASTER_PORT:-29500}")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
exec deepspeed "${args[@]}" --module "vilbert_ds.$ENTRY" \
  "${config[@]}" --deepspeed "${DS_CONFIG:-$REPO/ds_configs/zero2.json}" --resume "${RESUME:-auto}" "$@"
