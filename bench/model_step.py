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
  bf16         DeepSpeed bf16 (bf16 weights/activations, fp32 master weights and grad accumulation):
               ZeRO-1 as ds_configs/zero1_bf16.json (BF16_Optimizer); until 2026-12-04 ZeRO-0
               (FP16_Optimizer: bf16 accumulation, a host sync per gradient tensor)
  compile      torch.compile of the model (DeepSpeed engine.compile)
The step is the one `vilbert_ds.pretrain` runs (DeepSpeed engine, ZeRO-0 (bf16: ZeRO-1), 1 rank, clipping 1.0);
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

Q1_VARIANTS = ("baseline", "eager", "torch_adamw", "ckpt", "bf16", "compile")
ALL_VARIANTS = Q1_VARIANTS + ("plain",)  # plain: the straightforward step of question 2 (bench/vs_plain.py)
SHARED = ("baseline", "eager", "ckpt")  # run on one engine, switched in place between steps
BASE_OPTIMIZERS = ("fused_adam", "torch_fused")  # the optimizer of every variant but torch_adamw

# CPU batches keep one base-config step to a few seconds on 2 cores; GPU batches are the
# original's per-GPU share of its global batch (512 / 8 GPUs = 64).
CPU_BATCH = {"tiny": 16, "base_2layer_2conect": 4, "base_6layer_6conect": 4}
GPU_BATCH = {"tiny": 128, "base_2layer_2conect": 64, "base_6layer_6conect": 64}


def plan(quick: bool, gpu: bool, configs=None, shapes=None, variants=None,
         skip: tuple[str, ...] = ()) -> list[tuple[str, C.Shape, tuple[str, ...]]]:
    """(config, shape, variants) groups to measure; `skip` names variants to leave out."""
    configs_default = configs is None
    if configs is None:
        if gpu:  # tiny says nothing about a GPU
            configs = ("base_2layer_2conect", "base_6layer_6conect")
        else:
            configs = ("tiny", "base_2layer_2conect") if quick else C.MODEL_CONFIGS
    shapes = [C.SHAPES[s] for s in (shapes or ("pretrain", "vqa"))]
    out = []
    for config in configs:
        for shape in shapes:
            if variants is not None:
                chosen = tuple(v for v in ALL_VARIANTS if v in variants)
            elif gpu:
                # compile costs a minute or two per model on GPU: the base pretraining step only in --quick
                chosen = Q1_VARIANTS if not quick or (config == "base_6layer_6conect" and shape.name == "pretrain") \
                    else tuple(v for v in Q1_VARIANTS if v != "compile")
                if quick and shape.name == "vqa":
                    chosen = ("baseline", "eager", "bf16")
            elif quick:
                # torch.compile on CPU spends minutes compiling (inductor C++): full run, tiny only.
                chosen = tuple(v for v in Q1_VARIANTS if v != "compile")
                if config != "tiny" and shape.name != "pretrain":
                    chosen = ("baseline", "eager", "bf16")
            else:
                chosen = Q1_VARIANTS if config == "tiny" else tuple(v for v in Q1_VARIANTS if v != "compile")
            out.append((config, shape, tuple(v for v in chosen if v not in skip)))
    if quick and not gpu and configs_default and C.PRETRAIN in shapes and (variants is None or "baseline" in variants):
        # One base-config step (the scaling question needs a measured single-device rate).
        out.append(("base_6layer_6conect", C.PRETRAIN, ("baseline",)))
    return out


def spec_for(variant: str, base: C.StepSpec) -> C.StepSpec:
    return {
        "baseline": base, "eager": base, "ckpt": base,
        "torch_adamw": replace(base, optimizer="torch_adamw"),
        "bf16": replace(base, precision="bf16", zero_stage=1),  # the shipped zero1_bf16.json path (StepSpec)
        "compile": replace(base, compile=True),
        "plain": replace(base, plain=True),
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


def eval_loss(step: C.Step, gpu: bool) -> float:
    """The loss of the step's batch in eval mode (no dropout), in fp32."""
    import torch

    module = step.objective
    module.eval()
    try:
        with torch.no_grad():
            loss, _ = module(step.batch.to(C.device_name(gpu), float_dtype=torch.float32))
        return float(loss)
    finally:
        module.train()


def measure_group(config: str, shape: C.Shape, batch: int, variants: tuple[str, ...], *, gpu: bool, warmup: int,
                  rounds: int, budget_s: float, max_alive_params: float,
                  base_optimizer: str = "fused_adam") -> list[dict]:
    """Rows of one (config, shape, batch) group.

    Round 0 times the shared-engine variants (baseline, eager, ckpt) and the variants that need
    their own engine (torch_adamw, bf16, compile, plain), interleaved. When the model is large
    the own-engine variants are built one per round instead (at most two engines alive,
    `max_alive_params`), each round timing the (already warm) baseline again; a variant's ratio
    is always taken against the baseline of its own round. Each variant's first step after its
    build is untimed; the next one runs under the memory profiler (untimed); then `warmup - 2`
    more untimed steps (GPU) and the timed rounds.
    """
    base_spec = C.StepSpec(config=config, shape=shape, batch=batch, gpu=gpu, optimizer=base_optimizer)
    clock = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock
        clock = now

    with C.quiet_output():
        base = C.build_step(base_spec)
    base_loss = eval_loss(base, gpu) if "plain" in variants else None  # fresh weights, as the plain step's
    shared = SharedEngine(base)
    lap("build")
    cfg = base.objective.model.config
    n_params = sum(p.numel() for p in base.objective.parameters())
    own = [v for v in variants if v not in SHARED]
    together = n_params * (len(own) + 1) <= max_alive_params
    plan_rounds = [own] if together or not own else [own[:1]] + [[v] for v in own[1:]]
    timings: dict[str, C.Timing] = {}
    reference: dict[str, C.Timing] = {}
    memory: dict[str, tuple[int, int]] = {}
    extra: dict[str, dict] = {}
    extra_warmup = max(0, warmup - 2)
    warmed: set[str] = set()
    base.step()
    lap("warmup")
    for name in [v for v in variants if v in SHARED] or ["baseline"]:
        shared.switch(name)
        memory[name] = C.step_peak_bytes(base, gpu)
    shared.switch("baseline")
    lap("memory")
    for i, group in enumerate(plan_rounds):
        steps: dict[str, C.Step] = {name: base for name in ([v for v in variants if v in SHARED] if i == 0 else [])}
        steps.setdefault("baseline", base)
        for v in group:
            with C.quiet_output():
                steps[v] = C.build_step(spec_for(v, base_spec))
            if v == "plain":  # same initial weights and batch: the two losses must agree
                diff = abs(eval_loss(steps[v], gpu) - base_loss) / max(abs(base_loss), 1e-12)
                extra[v] = {"loss rel diff": diff}
            lap("build")
            steps[v].step()
            lap("warmup")
            memory[v] = C.step_peak_bytes(steps[v], gpu)
            lap("memory")
        t = C.time_interleaved(steps, warmup=extra_warmup, rounds=rounds, gpu=gpu, budget_s=budget_s,
                               warm=warmed & set(steps),
                               before=lambda name: shared.switch(name) if name in SHARED else None)
        lap("timed rounds")
        warmed |= set(steps)
        for name, timing in t.items():
            if name == "baseline" and i > 0:
                continue
            timings[name] = timing
            reference[name] = t["baseline"]
        for v in group:
            C.free(steps[v])
    C.free(base)
    lap("free")
    print(f"[model_step]   {C.SHORT_NAMES[config]} {shape.name}: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()), file=sys.stderr, flush=True)
    flops = C.flops_per_sample(cfg, shape)
    flops_plain = C.flops_per_sample(cfg, shape, plain=True)
    peaks = {}
    if gpu:
        from vilbert_ds.metrics import peak_tflops

        peaks = {"bf16": peak_tflops("bf16")}
    base_peak = memory.get("baseline", (0, 0))[1]
    rows = []
    for v in variants:
        if v not in timings:
            continue
        timing, ref = timings[v], reference[v]
        sps = batch / timing.wall_s
        f = flops_plain if v == "plain" else flops
        row = {
            "config": C.SHORT_NAMES[config], "shape": str(shape), "batch": batch, "variant": v,
            "samples/s": sps, "x base": ref.wall_s / timing.wall_s, "x base (cpu)": ref.cpu_s / timing.cpu_s,
            "step ms": timing.wall_s * 1e3, "peak MiB": memory[v][1] / C.MiB,
            "mem x base": memory[v][1] / base_peak if base_peak else None, "GFLOP/sample": f / 1e9,
            **extra.get(v, {}),
        }
        if gpu:
            row["TFLOP/s"] = sps * f / 1e12
            # MFU against the dense bf16 peak, for the bf16 step only (fp32 steps run without TF32).
            peak = peaks.get("bf16") if v == "bf16" else None
            row["MFU"] = row["TFLOP/s"] / peak if peak else None
        else:
            row["GFLOP/s"] = sps * f / 1e9
        rows.append(row)
    return rows


Q2_COLUMNS = ["config", "shape", "batch", "step", "samples/s", "speedup", "speedup (cpu)", "peak MiB", "mem x plain",
           "GFLOP/sample", "loss rel diff"]


def plain_table(rows: list[dict], gpu: bool) -> C.Table:
    """The question-2 table from `model_step.measure_group` rows that include the plain step.
    Ratios go through each variant's own-round baseline: speedup = x_base(variant) / x_base(plain)."""
    table = C.Table("Q2 vilbert-ds vs a straightforward implementation (same process, same batch, same weights)",
                    [c for c in Q2_COLUMNS if not (gpu and c == "speedup (cpu)")])
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["shape"], r["batch"]), {})[r["variant"]] = r
    names = {"plain": "plain", "baseline": "vilbert-ds fp32", "bf16": "vilbert-ds bf16"}
    for (config, shape, batch), by_variant in groups.items():
        plain = by_variant.get("plain")
        if plain is None:
            continue
        for v in ("plain", "baseline", "bf16"):
            r = by_variant.get(v)
            if r is None or (v == "bf16" and not gpu):
                continue
            table.add(**{"config": config, "shape": shape, "batch": batch, "step": names[v],
                         "samples/s": r["samples/s"],
                         "speedup": r["x base"] / plain["x base"],
                         "speedup (cpu)": r["x base (cpu)"] / plain["x base (cpu)"],
                         "peak MiB": r["peak MiB"], "mem x plain": r["peak MiB"] / plain["peak MiB"],
                         "GFLOP/sample": r["GFLOP/sample"],
                         "loss rel diff": plain.get("loss rel diff") if v == "baseline" else None})
    table.notes += [
        "speedup = plain step time / step time, interleaved in the same rounds (>1: vilbert-ds is faster); "
        "(cpu) from process CPU time",
        "GFLOP/sample: analytic training FLOPs; the plain step's extra ones are the heads over unmasked positions",
        "loss rel diff: eval-mode loss of the same batch and weights, plain vs vilbert-ds fp32 (same model, same "
        "losses: it must be ~1e-7)",
    ]
    return table


def run(quick: bool = True, gpu: bool = False, *, configs=None, shapes=None, variants=None, batch: int | None = None,
        budget_s: float | None = None, with_plain: bool = False, skip: tuple[str, ...] = (),
        base_optimizer: str = "fused_adam") -> list[C.Table]:
    """The question-1 table; with `with_plain` every group also times the plain step and the
    question-2 table (bench/vs_plain.py) is returned after it, from the same rounds. `skip`
    leaves variants out of the plan; `base_optimizer` torch_fused replaces DeepSpeed FusedAdam in
    every variant but torch_adamw (for a machine where FusedAdam cannot be built)."""
    # Process CPU time says nothing about a GPU step: its ratio column is CPU-only.
    columns = (["config", "shape", "batch", "variant", "samples/s", "x base"] + ([] if gpu else ["x base (cpu)"])
               + ["step ms", "peak MiB", "mem x base"] + (["TFLOP/s", "MFU"] if gpu else ["GFLOP/s"]))
    table = C.Table("Q1 model step: samples/s and peak memory of a full training step", columns)
    per_group = budget_s if budget_s is not None else (20.0 if quick and not gpu else 120.0)
    # Engines alive at once: CPU keeps every variant of tiny only; GPU those of 2layer_2conect.
    max_alive = 5e7 if not gpu else 1.2e9
    rows = []
    for config, shape, chosen in plan(quick, gpu, configs, shapes, variants, skip):
        scaling_only = quick and not gpu and config == "base_6layer_6conect"  # one baseline step for Q6
        if with_plain and "plain" not in chosen and not scaling_only:
            chosen = tuple(chosen) + ("plain",)
        b = batch or (GPU_BATCH if gpu else CPU_BATCH)[config]
        if quick and not gpu and config != "tiny":
            b = 2
        if gpu:
            warmup, rounds = 5, 20
        else:
            warmup, rounds = 2, (6 if config == "tiny" else 2) if quick else (10 if config == "tiny" else 5)
        start = time.perf_counter()
        rows += measure_group(config, shape, b, chosen, gpu=gpu, warmup=warmup, rounds=rounds, budget_s=per_group,
                              max_alive_params=max_alive, base_optimizer=base_optimizer)
        print(f"[model_step] {C.SHORT_NAMES[config]} {shape} batch {b}: {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
    table.rows = [r for r in rows if r["variant"] != "plain"]
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
    if base_optimizer != "fused_adam":
        table.notes.append(f"every variant but torch_adamw ran {base_optimizer} (torch.optim.AdamW(fused=True)) "
                           "instead of DeepSpeed FusedAdam")
    tables = [table]
    if with_plain:
        tables.append(plain_table(rows, gpu))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU batches, no 6layer_6conect, no compile")
    parser.add_argument("--gpu", action="store_true", help="run on the CUDA device (adds TFLOP/s and MFU)")
    parser.add_argument("--configs", nargs="*", choices=C.MODEL_CONFIGS)
    parser.add_argument("--shapes", nargs="*", choices=sorted(C.SHAPES))
    parser.add_argument("--variants", nargs="*", choices=ALL_VARIANTS)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per group")
    parser.add_argument("--base-optimizer", choices=BASE_OPTIMIZERS, default="fused_adam",
                        help="torch_fused: torch.optim.AdamW(fused=True) where DeepSpeed FusedAdam cannot be built")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    C.setup_env(gpu=args.gpu)
    info = C.machine()
    tables = run(args.quick, args.gpu, configs=args.configs, shapes=args.shapes, variants=args.variants,
                 batch=args.batch, budget_s=args.budget,
                 with_plain=bool(args.variants and "plain" in args.variants), base_optimizer=args.base_optimizer)
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
