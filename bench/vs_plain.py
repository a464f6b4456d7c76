"""Question 2 - vilbert-ds against a straightforward implementation of the same step, in the same
process, on the same batch, with the same initial weights.

    python bench/vs_plain.py --quick        # tiny + 2layer_2conect at both shapes (CPU)
    python bench/vs_plain.py                # + 6layer_6conect
    python bench/vs_plain.py --gpu          # CUDA; vilbert-ds in fp32 and bf16 against plain fp32

The plain step is what a direct port of the original does: eager attention with an explicit
additive mask, every head computed over every position (the 30522-way MLM decoder over all
tokens, the region classifier over all regions; at VQA shapes every task head too) and the losses
taken from those full logits, one optimizer parameter group per tensor, torch.optim.AdamW in its
single-tensor for-loop form, fp32, no DeepSpeed. vilbert-ds is the step `vilbert_ds.pretrain`
runs: SDPA, heads on masked positions only, parameter groups by (lr, decay), DeepSpeed FusedAdam,
gradient clipping 1.0 (the plain step does not clip, as the original did not).

Before timing, both steps compute the loss of the batch in eval mode (no dropout): the two
implementations must agree (`loss |diff|`), or the comparison is void.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

CPU_BATCH = {"tiny": 16, "base_2layer_2conect": 4, "base_6layer_6conect": 4}
GPU_BATCH = {"tiny": 128, "base_2layer_2conect": 64, "base_6layer_6conect": 64}


def eval_loss(step: C.Step, gpu: bool) -> float:
    import torch

    module = step.objective
    module.eval()
    try:
        with torch.no_grad():
            batch = step.batch.to(C.device_name(gpu), float_dtype=torch.float32)
            loss, _ = module(batch)
        return float(loss)
    finally:
        module.train()


def measure(config: str, shape: C.Shape, batch: int, *, gpu: bool, precisions: tuple[str, ...], warmup: int,
            rounds: int, budget_s: float) -> list[dict]:
    with C.quiet_output():
        plain = C.build_step(C.StepSpec(config=config, shape=shape, batch=batch, gpu=gpu, plain=True))
        ours = {p: C.build_step(C.StepSpec(config=config, shape=shape, batch=batch, gpu=gpu, precision=p))
                for p in precisions}
    plain_loss = eval_loss(plain, gpu)
    diffs = {p: abs(eval_loss(s, gpu) - plain_loss) if p == "fp32" else None for p, s in ours.items()}
    steps = {"plain": plain, **{f"vilbert-ds {p}": s for p, s in ours.items()}}
    t = C.time_interleaved(steps, warmup=warmup, rounds=rounds, gpu=gpu, budget_s=budget_s)
    mem = {name: C.step_peak_bytes(s, gpu)[1] for name, s in steps.items()}
    cfg = plain.objective.model.config
    flops_plain = C.flops_per_sample(cfg, shape, plain=True)
    flops_ours = C.flops_per_sample(cfg, shape)
    C.free(plain, *ours.values())
    rows = []
    for name, timing in t.items():
        is_plain = name == "plain"
        rows.append({
            "config": C.SHORT_NAMES[config], "shape": str(shape), "batch": batch, "step": name,
            "samples/s": batch / timing.wall_s, "speedup": t["plain"].wall_s / timing.wall_s,
            "speedup (cpu)": t["plain"].cpu_s / timing.cpu_s, "peak MiB": mem[name] / C.MiB,
            "mem x plain": mem[name] / mem["plain"],
            "GFLOP/sample": (flops_plain if is_plain else flops_ours) / 1e9,
            "loss |diff|": None if is_plain else diffs[name.split()[-1]],
        })
    return rows


def run(quick: bool = True, gpu: bool = False, *, configs=None, shapes=None, batch: int | None = None,
        budget_s: float | None = None) -> list[C.Table]:
    columns = ["config", "shape", "batch", "step", "samples/s", "speedup", "speedup (cpu)", "peak MiB",
               "mem x plain", "GFLOP/sample", "loss |diff|"]
    table = C.Table("Q2 vilbert-ds vs a straightforward implementation (same process, same batch, same weights)",
                    columns)
    if configs is None:
        configs = ("tiny", "base_2layer_2conect") if quick and not gpu else C.MODEL_CONFIGS
    precisions = ("fp32", "bf16") if gpu else ("fp32",)
    per_group = budget_s if budget_s is not None else (15.0 if quick and not gpu else 90.0)
    for config in configs:
        for shape in [C.SHAPES[s] for s in (shapes or ("pretrain", "vqa"))]:
            b = batch or (GPU_BATCH if gpu else CPU_BATCH)[config]
            if quick and not gpu and config != "tiny":
                b = 2
            rounds = 10 if config == "tiny" or gpu else (3 if quick else 6)
            start = time.perf_counter()
            table.rows.extend(measure(config, shape, b, gpu=gpu, precisions=precisions, warmup=1 if not gpu else 3,
                                      rounds=rounds, budget_s=per_group))
            print(f"[vs_plain] {C.SHORT_NAMES[config]} {shape} batch {b}: {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
    table.notes += [
        "speedup = plain step time / step time in the same interleaved rounds (>1: vilbert-ds is faster); "
        "(cpu) from process CPU time",
        "GFLOP/sample: analytic training FLOPs; the plain step's extra ones are the heads over unmasked positions",
        "loss |diff|: eval-mode loss of the same batch and weights, vilbert-ds fp32 vs plain (same model, same losses)",
    ]
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--configs", nargs="*", choices=C.MODEL_CONFIGS)
    parser.add_argument("--shapes", nargs="*", choices=sorted(C.SHAPES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--budget", type=float, help="seconds of timed rounds per group")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    C.setup_env(gpu=args.gpu)
    info = C.machine()
    tables = run(args.quick, args.gpu, configs=args.configs, shapes=args.shapes, batch=args.batch,
                 budget_s=args.budget)
    C.print_tables(tables, markdown=args.markdown, info=info)
    if args.json:
        C.save_json(args.json, tables, info, C.command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
