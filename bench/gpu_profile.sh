#!/usr/bin/env bash
# Where the bf16 step's fixed ~85 ms go, in one call on a lent GPU machine (one H200): torch.profiler
# over 2 steps of the base model (6layer_6conect, pretraining shapes) per engine variant, batch 64 and
# 512, before and after the changes of 2026-12-04 (bench/profile_step.py says what each variant is).
# At most ~145 s: wheel install ~10 s, then runs in priority order, none started after
# PROFILE_BUDGET_S (default 90 s) and all stopped at PROFILE_TIMEOUT_S (default 135 s). No DeepSpeed
# op is built: torch.optim.AdamW(fused=True) under DeepSpeed's wrappers, as at batch 256/512 then.
#
#   bash bench/gpu_profile.sh                       # THERE (device `run`, carry [".whl"], timeout_s 170)
#   PROFILE_RUNS="bf16@64 bf16@512" bash bench/gpu_profile.sh   # a subset (VARIANT@BATCH, bench/profile_step.py)
#   GPU_PROFILE_DRY=1 bash bench/gpu_profile.sh     # HERE on the CPU, tiny config: every run's code path
#
# .whl/ comes from `bash bench/gpu_session.sh prepare`. Results in $OUT: profile.txt (per run: step time,
# launches, host syncs, per-phase host ms, GPU idle share, top ops by device and host time; a summary
# table at the end), profile.json (the same figures), two gzipped Chrome traces (bf16 at ZeRO-0 and
# as shipped, batch 64; open in chrome://tracing or ui.perfetto.dev), gpu_profile.log.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
START=$(date +%s)
say() { echo "[gpu_profile $(($(date +%s) - START))s] $*" | tee -a "$OUT/gpu_profile.log"; }

if [ "${GPU_PROFILE_DRY:-0}" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_profile_dry/out}
    export DS_ACCELERATOR=cpu PYTHONPATH=$REPO
    ARGS="--config tiny --runs bf16_zero0@4 bf16_ar@4 bf16@4 bf16_pinned@4 fp32@4 fp32_tf32@4 --trace bf16@4 --timed 2"
    LIMIT=${PROFILE_TIMEOUT_S:-900}   # a shared 2-core VM is slow; no device time is at stake
    mkdir -p "$OUT" && rm -f "$OUT"/*
    say "DRY run on the CPU (DS_ACCELERATOR=cpu), tiny config; OUT=$OUT"
else
    OUT=${OUT:?set by the device tool}
    mkdir -p "$OUT" && rm -f "$OUT"/*
    say "installing the carried wheels (.whl/) into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$OUT/gpu_profile.log" 2>&1 || say "wheel install failed (see above)"
    if ! $PY -c 'import importlib.metadata as m, sys; sys.exit(tuple(map(int, m.version("typing_extensions").split(".")[:2])) < (4, 14))' 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fallback/*.whl \
            >>"$OUT/gpu_profile.log" 2>&1
    fi
    export PYTHONPATH=/tmp/site:$REPO TORCH_CUDA_ARCH_LIST=9.0
    ARGS="--gpu ${PROFILE_RUNS:+--runs $PROFILE_RUNS} --budget ${PROFILE_BUDGET_S:-90} --timed 6 --trace bf16_zero0@64 bf16@64"
    LIMIT=${PROFILE_TIMEOUT_S:-135}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader 2>/dev/null || true; } \
    | tee -a "$OUT/gpu_profile.log"
say "python bench/profile_step.py $ARGS --out \$OUT"
# shellcheck disable=SC2086
timeout -k 5 "$LIMIT" $PY bench/profile_step.py $ARGS --out "$OUT" >>"$OUT/gpu_profile.log" 2>&1
rc=$?
say "profile_step exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
if grep -q '^=== summary' "$OUT/profile.txt" 2>/dev/null; then
    sed -n '/^=== summary/,$p' "$OUT/profile.txt"
else  # cut short: the runs that finished (each one's block is in profile.txt and profile.json)
    grep -h '^===' "$OUT/profile.txt" 2>/dev/null
    tail -n 20 "$OUT/gpu_profile.log"
fi
say "done: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
