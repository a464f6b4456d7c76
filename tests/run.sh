#!/usr/bin/env bash
# The test command (README "Set up" step 2; .ci/run calls exactly this).
# Installs what the suite needs on a fresh Debian machine, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k model -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
# Debian packages for the SLURM and multi-node tests (slurm-wlm, munge, sshd, pdsh).
bash tests/system_deps.sh

export DS_ACCELERATOR=cpu WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# DeepSpeed's CPU ops, built once per machine under a lock before any rank starts.
python3 -m vilbert_ds.ops build

# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero.
timeout --kill-after=60 82m python3 -m pytest tests "$@"
