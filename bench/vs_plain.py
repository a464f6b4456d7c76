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
import model_step  # noqa: E402 - measures the plain step with the others; this question reads its table

CPU_BATCH = {"tiny": 16, "base_2layer_2conect": 4, "base_6layer_6conect": 4}
GPU_BATCH = {"tiny": 128, "base_2layer_2conect": 64, "base_6layer_6conect": 64}
eval_loss = model_step.eval_loss  # the loss check, re-exported (tests/test_bench_smoke.py)


def run(quick: bool = True, gpu: bool = False, *, configs=None, shapes=None, batch: int | None = None,
        budget_s: float | None = None) -> list[C.Table]:
    if configs is None:
        if gpu:
            configs = ("base_2layer_2conect", "base_6layer_6conect")
        else:
            configs = ("tiny", "base_2layer_2conect") if quick else C.MODEL_CONFIGS
    variants = ("baseline", "bf16", "plain") if gpu else ("baseline", "plain")
    per_group = budget_s if budget_s is not None else (20.0 if quick and not gpu else 120.0)
    rows = []
    for config in configs:
        for shape in [C.SHAPES[s] for s in (shapes or ("pretrain", "vqa"))]:
            b = batch or (GPU_BATCH if gpu else CPU_BATCH)[config]
            if quick and not gpu and config != "tiny":
                b = 2
            rounds = 20 if gpu else (6 if config == "tiny" else 2) if quick else (10 if config == "tiny" else 5)
            start = time.perf_counter()
            rows += model_step.measure_group(config, C.SHAPES[shape.name], b, variants, gpu=gpu,
                                             warmup=5 if gpu else 2, rounds=rounds, budget_s=per_group,
                                             max_alive_params=1.2e9 if gpu else 4e8)
            print(f"[vs_plain] {C.SHORT_NAMES[config]} {shape} batch {b}: {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
    return [model_step.plain_table(rows, gpu)]


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
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
