#!/usr/bin/env bash
# Several nodes from a hostfile, through the deepspeed launcher's pdsh/ssh runner. Run it on the
# first node of the hostfile; every node needs passwordless ssh, this checkout at the same path
# and the same Python environment.
#
#   HOSTFILE=hosts MASTER_ADDR=node1 bash launch/multi_node.sh train.total_steps=1000
#
# The hostfile has one line per node: `node1 slots=8` (slots = GPUs).
# Variables:
#   HOSTFILE       the hostfile                               (required)
#   MASTER_ADDR    address of the first node, reachable from all (required)
#   MASTER_PORT    rendezvous port                            (default: 29500)
#   SSH_PORT       sshd port on the nodes                     (default: ssh's own)
#   ENTRY          pretrain | multitask | finetune            (default: pretrain)
#   CONFIG         training YAML or packaged preset           (default: pretrain_cc for pretrain)
#   DS_CONFIG      DeepSpeed JSON                             (default: ds_configs/zero2.json)
#   RESUME         none | auto | PATH                         (default: auto)
#   TORCH_EXTENSIONS_DIR  where DeepSpeed's built ops live, the same on every node
#                  (default: `python -m vilbert_ds.ops where`)
#   PDSH_SSH_ARGS_APPEND  extra ssh options (identity file, known-hosts policy)
#   LAUNCHER_ARGS  extra deepspeed launcher flags, e.g. "--no_ssh_check" (its check uses plain ssh)
# Variables that must reach the other nodes (DS_ACCELERATOR, TORCH_EXTENSIONS_DIR, NCCL_*,
# GLOO_*, WANDB_*, VILBERT_DS_*, ...) go into a generated .deepspeed_env, and a generated
# venv script puts this Python's bin directory first on PATH over ssh, so the nodes use this
# environment's ninja and never rebuild the ops.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)  # paths stay relative to where you run it
ENTRY=${ENTRY:-pretrain}
config=()  # pretrain needs a config (its preset by default); the others have defaults
if [ -n "${CONFIG:-}" ]; then config=(--config "$CONFIG"); elif [ "$ENTRY" = pretrain ]; then config=(--config pretrain_cc); fi
: "${HOSTFILE:?set HOSTFILE}" "${MASTER_ADDR:?set MASTER_ADDR}"
PYTHON=${PYTHON:-python3}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -m vilbert_ds.ops where)}
export DS_ENV_FILE=${DS_ENV_FILE:-$PWD/.deepspeed_env}
venv=$("$PYTHON" -m vilbert_ds.distributed hostfile-env --env-file "$DS_ENV_FILE")
args=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
      --launcher pdsh --venv_script "$venv")
[ -n "${SSH_PORT:-}" ] && args+=(--ssh_port "$SSH_PORT")
# shellcheck disable=SC2206 # word splitting of LAUNCHER_ARGS is intended
args+=(${LAUNCHER_ARGS:-})
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module "vilbert_ds.$ENTRY" \
  "${config[@]}" --deepspeed "${DS_CONFIG:-$REPO/ds_configs/zero2.json}" --resume "${RESUME:-auto}" "$@"
