"""Question 1 - the model step: samples/s and peak memory of a full training step (batch to
device, forward, backward, optimizer update) per model config, shape and kernel choice.

    python bench/model_step.py --quick                 # tiny + 2layer_2conect, CPU-sized batches
    python bench/model_step.py                         # + 6layer_6conect and torch.compile
    python bench/model_step.py --gpu                   # on a CUDA device: + TFLOP/s and MFU
    python bench/model_step.py --configs tiny --shapes vqa --batch 16

Variants, each against the baseline of its group (SDPA attention, DeepSpeed FusedAdam, fp32, no
activation checkpointing, eager PyTorch) measured in the same interleaved rounds:
  eager        the original's explicit masked softmax attention
  torch_adamw  torch.optim.AdamW (its default implementation) instead of DeepSpeed FusedAdam
  ckpt         activation checkpointing of every encoder layer (DeepSpeed's checkpoint function)
  bf16         DeepSpeed bf16 (bf16 weights/activations, fp32 master weights and grad accumulation)
  compile      torch.compile of the model (DeepSpeed engine.compile)
The step is the one `vilbert_ds.pretrain` runs (DeepSpeed engine, ZeRO-0, 1 rank, clipping 1.0);
at VQA shapes it is the VL-classifier fine-tuning step (task token, VQA head, BCE x 3129).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

ALL_VARIANTS = ("baseline", "eager", "torch_adamw", "ckpt", "bf16", "compile")
SHARED = ("baseline", "eager", "ckpt")  # run on one engine, switched in place between steps

# CPU batches keep one base-config step to a few seconds on 2 cores; GPU batches are the
# original's per-GPU share of its global batch (512 / 8 GPUs = 64).
CPU_BATCH = {"tiny": 16, "base_2layer_2conect": 4, "base_6layer_6conect": 4}
GPU_BATCH = {"tiny": 128, "base_2layer_2conect": 64, "base_6layer_6conect": 64}


def plan(quick: bool, gpu: bool, configs=None, shapes=None, variants=None) -> list[tuple[str, C.Shape, tuple[str, ...]]]:
    """(config, shape, variants) groups to measure."""
    if configs is None:
        configs = ("tiny", "base_2layer_2conect") if quick and not gpu else C.MODEL_CONFIGS
    shapes = [C.SHAPES[s] for s in (shapes or ("pretrain", "vqa"))]
    out = []
    for config in configs:
        for shape in shapes:
            if variants is not None:
                chosen = tuple(v for v in ALL_VARIANTS if v in variants)
            elif gpu:
                chosen = ALL_VARIANTS
            elif quick:
                # torch.compile on CPU spends minutes compiling (inductor C++): full run, tiny only.
                chosen = tuple(v for v in ALL_VARIANTS if v != "compile")
                if config != "tiny" and shape.name != "pretrain":
                    chosen = ("baseline", "eager", "bf16")
            else:
                chosen = ALL_VARIANTS if config == "tiny" else tuple(v for v in ALL_VARIANTS if v != "compile")
            out.append((config, shape, chosen))
    return out


def spec_for(variant: str, base: C.StepSpec) -> C.StepSpec:
    return {
        "baseline": base, "eager": base, "ckpt": base,
        "torch_adamw": replace(base, optimizer="torch_adamw"),
        "bf16": replace(base, precision="bf16"),
        "compile": replace(base, compile=True),
    }[variant]


class SharedEngine:
    """The baseline engine, switched in place between baseline / eager / ckpt before each step."""

    def __init__(self, step: C.Step):
        from vilbert_ds.engine import enable_activation_checkpointing, validate_ds_config

        self.step = step
        self.model = step.objective.model
        settings = validate_ds_config({**C.ds_config(step.spec), "activation_checkpointing": {}}, source="bench:ckpt",
                                      world_size=1)
        enable_activation_checkpointing(self.model, settings)
        self.switch("baseline")

    def switch(self, variant: str) -> None:
        C.set_attention_impl(self.model, "eager" if variant == "eager" else "sdpa")
        self.model.bert.encoder.gradient_checkpointing = variant == "ckpt"


def measure_group(config: str, shape: C.Shape, batch: int, variants: tuple[str, ...], *, gpu: bool, warmup: int,
                  rounds: int, budget_s: float, max_alive_params: float) -> list[dict]:
    """Rows of one (config, shape, batch) group.

    Round 0 times the shared-engine variants (baseline, eager, ckpt) and the variants that need
    their own engine, interleaved. When the model is large those own-engine variants are built
    one per round instead (at most two engines alive, `max_alive_params`), each round timing the
    baseline again; a variant's ratio is always taken against the baseline of its own round.
    """
    base_spec = C.StepSpec(config=config, shape=shape, batch=batch, gpu=gpu)
    with C.quiet_output():
        base = C.build_step(base_spec)
    shared = SharedEngine(base)
    cfg = base.objective.model.config
    n_params = sum(p.numel() for p in base.objective.parameters())
    own = [v for v in variants if v not in SHARED]
    together = n_params * (len(own) + 1) <= max_alive_params
    plan_rounds = [own] if together or not own else [own[:1]] + [[v] for v in own[1:]]
    timings: dict[str, C.Timing] = {}
    reference: dict[str, C.Timing] = {}
    memory: dict[str, tuple[int, int]] = {}
    for i, group in enumerate(plan_rounds):
        steps: dict[str, C.Step] = {}
        for name in ([v for v in variants if v in SHARED] if i == 0 else ["baseline"]):
            steps[name] = base
        if "baseline" not in steps:
            steps["baseline"] = base
        for v in group:
            with C.quiet_output():
                steps[v] = C.build_step(spec_for(v, base_spec))
        t = C.time_interleaved(steps, warmup=warmup, rounds=rounds, gpu=gpu, budget_s=budget_s,
                               before=lambda name: shared.switch(name) if name in SHARED else None)
        for name, timing in t.items():
            if name == "baseline" and i > 0:
                continue
            timings[name] = timing
            reference[name] = t["baseline"]
        if i == 0:
            for name in (v for v in variants if v in SHARED):
                shared.switch(name)
                memory[name] = C.step_peak_bytes(base, gpu)
            shared.switch("baseline")
        for v in group:
            memory[v] = C.step_peak_bytes(steps[v], gpu)
            C.free(steps[v])
    C.free(base)
    flops = C.flops_per_sample(cfg, shape)
    peaks = {}
    if gpu:
        from vilbert_ds.metrics import peak_tflops

        peaks = {"fp32": peak_tflops("fp32"), "bf16": peak_tflops("bf16")}
    base_peak = memory.get("baseline", (0, 0))[1]
    rows = []
    for v in variants:
        if v not in timings:
            continue
        timing, ref = timings[v], reference[v]
        sps = batch / timing.wall_s
        row = {
            "config": C.SHORT_NAMES[config], "shape": str(shape), "batch": batch, "variant": v,
            "samples/s": sps, "x base": ref.wall_s / timing.wall_s, "x base (cpu)": ref.cpu_s / timing.cpu_s,
            "step ms": timing.wall_s * 1e3, "peak MiB": memory[v][1] / C.MiB,
            "mem x base": memory[v][1] / base_peak if base_peak else None,
        }
        if gpu:
            row["TFLOP/s"] = sps * flops / 1e12
            peak = peaks.get("bf16" if v == "bf16" else "fp32")
            row["MFU"] = row["TFLOP/s"] / peak if peak else None
        else:
            row["GFLOP/s"] = sps * flops / 1e9
        rows.append(row)
    return rows


def run(quick: bool = True, gpu: bool = False, *, configs=None, shapes=None, variants=None, batch: int | None = None,
        budget_s: float | None = None) -> list[C.Table]:
    """The question-1 table. `budget_s` bounds the timed rounds of each group."""
    columns = ["config", "shape", "batch", "variant", "samples/s", "x base", "x base (cpu)", "step ms", "peak MiB",
               "mem x base"] + (["TFLOP/s", "MFU"] if gpu else ["GFLOP/s"])
    table = C.Table("Q1 model step: samples/s and peak memory of a full training step", columns)
    warmup, rounds = (1, 3) if quick and not gpu else (2, 10) if not gpu else (3, 20)
    per_group = budget_s if budget_s is not None else (12.0 if quick and not gpu else 60.0)
    max_alive = 5e7 if not gpu else 2e9  # CPU: only tiny keeps every variant's engine at once
    for config, shape, chosen in plan(quick, gpu, configs, shapes, variants):
        b = batch or (GPU_BATCH if gpu else CPU_BATCH)[config]
        if quick and not gpu and config != "tiny":
            b = 2
        start = time.perf_counter()
        table.rows.extend(measure_group(config, shape, b, chosen, gpu=gpu, warmup=warmup, rounds=rounds,
                                        budget_s=per_group, max_alive_params=max_alive))
        print(f"[model_step] {C.SHORT_NAMES[config]} {shape} batch {b}: {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    flops_note = ", ".join(
        f"{C.SHORT_NAMES[c]} {C.flops_per_sample(C.model_config(c, C.PRETRAIN), C.PRETRAIN) / 1e9:.2f}"
        for c in C.MODEL_CONFIGS)
    table.notes += [
        "x base = baseline step time / variant step time, same interleaved rounds (>1: faster); "
        "x base (cpu) = the same from process CPU time (robust when other jobs share the cores)",
        "peak = weights + gradients + optimizer state + the step's allocation peak "
        + ("(torch.cuda.max_memory_allocated)" if gpu else "(profiler allocation events; CPU)"),
        f"training FLOP per pretraining sample (analytic, docs/PERFORMANCE.md): {flops_note} GFLOP",
    ]
    if not gpu:
        table.notes.append("torch.compile is measured in the full run on tiny only: on CPU its first step "
                           "compiles C++ for minutes")
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU batches, no 6layer_6conect, no compile")
    parser.add_argument("--gpu", action="store_true", help="run on the CUDA device (adds TFLOP/s and MFU)")
    parser.add_argument("--configs", nargs="*", choices=C.MODEL_CONFIGS)
    parser.add_argument("--shapes", nargs="*", choices=sorted(C.SHAPES))
    parser.add_argument("--variants", nargs="*", choices=ALL_VARIANTS)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per group")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    C.setup_env(gpu=args.gpu)
    info = C.machine()
    tables = run(args.quick, args.gpu, configs=args.configs, shapes=args.shapes, variants=args.variants,
                 batch=args.batch, budget_s=args.budget)
    C.print_tables(tables, markdown=args.markdown, info=info)
    if args.json:
        C.save_json(args.json, tables, info, C.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
