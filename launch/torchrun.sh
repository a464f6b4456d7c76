#!/usr/bin/env bash
# torchrun with c10d rendezvous, for clusters without ssh between nodes: run the same command
# on every node (at the same time, or within the rendezvous timeout).
#
#   NNODES=2 RDZV_ENDPOINT=node1:29400 bash launch/torchrun.sh train.total_steps=1000
#
# Variables:
#   NNODES         number of nodes                            (default: 1)
#   NPROC_PER_NODE ranks per node                             (default: gpu = every GPU)
#   RDZV_ENDPOINT  host:port of the rendezvous, on one node   (default: 127.0.0.1:29400)
#   RDZV_ID        job id shared by the nodes                 (default: vilbert-ds)
#   NODE_ADDR      this node's address as the others reach it (default: torchrun's choice)
#   MAX_RESTARTS   worker-group restarts after a failure      (default: 0; each resumes)
#   ENTRY, CONFIG, DS_CONFIG, RESUME   as in launch/single_node.sh
#   VILBERT_DS_WATCHDOG_S  seconds of heartbeat silence that end the job (default: 120)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # paths stay relative to where you run it
ENTRY=${ENTRY:-pretrain}
config=()  # pretrain needs a config (its preset by default); the others have defaults
if [ -n "${CONFIG:-}" ]; then config=(--config "$CONFIG"); elif [ "$ENTRY" = pretrain ]; then config=(--config pretrain_cc); fi
# torch 2.13's agent-shared rendezvous store breaks --max-restarts: give workers their own store
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
args=(--nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-gpu}" --rdzv_backend c10d
      --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}" --rdzv_id "${RDZV_ID:-vilbert-ds}"
      --max_restarts "${MAX_RESTARTS:-0}")
[ -n "${NODE_ADDR:-}" ] && args+=(--local_addr "$NODE_ADDR")
exec torchrun "${args[@]}" --module "vilbert_ds.$ENTRY" \
  "${config[@]}" --deepspeed "${DS_CONFIG:-$REPO/ds_configs/zero2.json}" --resume "${RESUME:-auto}" "$@"
