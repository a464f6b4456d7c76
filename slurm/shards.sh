#!/usr/bin/env bash
# Submit the shard build as a job array plus the manifest job that waits for it (afterok).
#
#   SLICES=16 bash slurm/shards.sh --format tsv --input feats/*.tsv --captions cc.tsv --output OUT
#
# Variables:
#   SLICES       array size = number of slices                (default: 8)
#   SBATCH_ARGS  extra sbatch flags for both jobs, e.g. "--partition=cpu --cpus-per-task=8"
# Prints the two job ids: "ARRAY_JOB_ID MANIFEST_JOB_ID".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=${SLICES:-8}
array=$(sbatch --parsable --array="0-$((n - 1))" ${SBATCH_ARGS:-} "$here/shards.sbatch" "$@")
array=${array%%;*}
manifest=$(sbatch --parsable --dependency="afterok:${array}" --kill-on-invalid-dep=yes \
  --job-name=vilbert-shards-manifest --output="%x-%j.out" ${SBATCH_ARGS:-} "$here/shards.sbatch" "$@")
echo "${array} ${manifest%%;*}"
