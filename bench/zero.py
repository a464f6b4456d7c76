"""Question 3 - ZeRO: per-rank memory of parameters, gradients and optimizer state for ZeRO-0/1/2/3
with 2 ranks (deepspeed launcher, gloo on CPU), against the theoretical partitioning; step time
per stage.

    python bench/zero.py --quick            # a 15.8M-parameter ViLBERT (full vocab), fp32, one launch
    python bench/zero.py                    # 2layer_2conect (161M parameters), one launch per stage
    python bench/zero.py --config base_6layer_6conect --ranks 2

Launches of 2 ranks (one for the small model, one per stage for larger ones) build one engine
per stage from the shipped `ds_configs/zero{0,1,2,3}.json` `zero_optimization` sections (batch
sizes replaced), run a step, and classify every tensor storage reachable from the engine right
after the next backward (when gradients peak):
  params     module parameters (ZeRO-3: each rank's partition), DeepSpeed's flat parameter groups
  optimizer  the optimizer's state (Adam moments) and fp32 master partitions
  grads+buf  everything else: gradients, reduction buckets, gradient partitions
Theory (fp32 Adam, P parameters of which T train, N ranks; DeepSpeed keeps an fp32 master
partition beside the parameters from ZeRO-1 on): params 4P (ZeRO-3: 4P/N); grads 4T (ZeRO-2/3:
4T/N); optimizer 8T (ZeRO-0: moments only) or 12T/N (master + moments). In mixed precision the
ZeRO paper's 2P + 2T + 12T (ZeRO-0) shrink the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

STAGES = (0, 1, 2, 3)
# A model big enough that partitioning dominates DeepSpeed's fixed buffers, small enough that
# 4 engines x 2 ranks step in well under a second on CPU: the full 30522 vocabulary, narrow streams.
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             v_hidden_size=256, v_num_hidden_layers=2, v_num_attention_heads=4, v_intermediate_size=256,
             bi_hidden_size=256, bi_num_attention_heads=4, v_biattention_id=[0, 1], t_biattention_id=[2, 3])


def shipped_zero_section(stage: int) -> dict:
    path = C.REPO / "ds_configs" / f"zero{stage}.json"
    section = dict(json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {}))
    section["stage"] = stage
    return section


# ====================================================================== inside each rank
def _classify(engine) -> dict[str, int]:
    """Bytes per category of the storages reachable from `engine` (this rank)."""
    module = engine.module
    opt = engine.optimizer
    params = []
    for p in module.parameters():
        params.append(p.data)
        if getattr(p, "ds_tensor", None) is not None:
            params.append(p.ds_tensor)
    for name in ("bit16_groups_flat", "fp16_partitioned_groups_flat", "bf16_groups_flat"):
        params.append(getattr(opt, name, None))
    base = getattr(opt, "optimizer", opt)
    optim = [base.state] if hasattr(base, "state") else []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        optim.append(getattr(opt, name, None))
    p_st = C.tensor_storages(params, follow_grad=False)
    o_st = {k: v for k, v in C.tensor_storages(optim, follow_grad=False).items() if k not in p_st}
    all_st = C.tensor_storages([engine])
    rest = {k: v for k, v in all_st.items() if k not in p_st and k not in o_st}
    return {"params": sum(p_st.values()), "optimizer": sum(o_st.values()), "grads": sum(rest.values()),
            "total": sum(all_st.values())}


def worker(args: argparse.Namespace) -> int:
    C.setup_env()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = SMALL if args.config == "small" else {}
    config = "tiny" if args.config == "small" else args.config
    results: dict[int, dict] = {}
    for stage in args.stages:
        spec = C.StepSpec(config=config, batch=args.batch)
        with C.quiet_output():
            step = _build(spec, overrides, stage)
        engine = step.holder
        batch = step.batch.to(engine.device, float_dtype=step.float_dtype)

        def fwd_bwd():
            loss, _ = engine(batch)
            engine.backward(loss)

        fwd_bwd()
        engine.step()  # optimizer state exists from here on
        fwd_bwd()
        mem = _classify(engine)
        engine.step()
        times = []
        for _ in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd()
            engine.step()
            times.append(time.perf_counter() - t0)
        n_all = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in step.objective.parameters())
        n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in step.objective.parameters()
                      if p.requires_grad)
        results[stage] = {**mem, "step_s": C.median(times), "params_all": n_all, "params_trainable": n_train}
        del engine, batch, fwd_bwd
        C.free(step)
        del step
        if args.verbose:
            print(f"[zero] rank {rank} after ZeRO-{stage}: max RSS {_rss_gib():.2f} GiB, now {_now_rss_gib():.2f} GiB",
                  file=sys.stderr, flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "ranks": gathered}), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _now_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _build(spec: C.StepSpec, overrides: dict, stage: int) -> C.Step:
    """`common.build_step` with model-config overrides (the small model)."""
    if not overrides:
        return C.build_step(spec, zero_options=shipped_zero_section(stage))
    original = C.model_config
    C.model_config = lambda name, shape, **kw: original(name, shape, **{**overrides, **kw})
    try:
        return C.build_step(spec, zero_options=shipped_zero_section(stage))
    finally:
        C.model_config = original


# ============================================================================ the launch
def launch(config: str, ranks: int, batch: int, steps: int, timeout_s: float, stages=STAGES,
           verbose: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="vilbert-ds-zero-") as tmp:
        out = Path(tmp) / "zero.json"
        with C.socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(port), str(Path(__file__).resolve()), "--worker", "--out", str(out), "--config", config,
               "--batch", str(batch), "--steps", str(steps), "--stages", *map(str, stages)]
        if verbose:
            cmd.append("--verbose")
        env = C.child_env(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
                          PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            log, _ = proc.communicate()
            raise RuntimeError(f"ZeRO bench launch timed out after {timeout_s:.0f}s:\n{log[-3000:]}") from None
        if verbose:
            for line in log.splitlines():
                if "[zero] rank" in line:
                    print(line, file=sys.stderr)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"ZeRO bench launch failed ({proc.returncode}):\n{log[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def theory(stage: int, n_all: int, n_train: int, world: int) -> dict[str, float]:
    """fp32 bytes per rank by category (see the module docstring)."""
    return {
        "params": 4 * n_all / (world if stage == 3 else 1),
        "grads": 4 * n_train / (world if stage >= 2 else 1),
        "optimizer": 8 * n_train if stage == 0 else 12 * n_train / world,
    }


def run(quick: bool = True, *, config: str | None = None, ranks: int = 2, batch: int = 2, steps: int | None = None,
        timeout_s: float = 900.0, stages=STAGES, verbose: bool = False) -> list[C.Table]:
    config = config or ("small" if quick else "base_2layer_2conect")
    steps = steps or (3 if quick else 5)
    start = time.perf_counter()
    if config == "small":
        data = launch(config, ranks, batch, steps, timeout_s, stages, verbose)
    else:
        # One launch per stage: engines of a large model built one after another in the same
        # processes keep too much host memory alive (DeepSpeed state and a fragmented heap).
        data = {"world": ranks, "ranks": [{} for _ in range(ranks)]}
        for stage in stages:
            part = launch(config, ranks, batch, steps, timeout_s, [stage], verbose)
            for mine, theirs in zip(data["ranks"], part["ranks"]):
                mine.update(theirs)
    print(f"[zero] {config} x {ranks} ranks: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    world = data["world"]
    columns = ["ZeRO", "rank", "params MiB", "params theory", "grads+buf MiB", "grads theory", "optim MiB",
               "optim theory", "total MiB", "total x ZeRO-0", "step s", "step x ZeRO-0"]
    any_stage = next(iter(data["ranks"][0].values()))
    n_all, n_train = any_stage["params_all"], any_stage["params_trainable"]
    table = C.Table(f"Q3 ZeRO per-rank memory and step time, {ranks} CPU ranks (gloo), {config} "
                    f"({n_all / 1e6:.1f}M params, {n_train / 1e6:.1f}M trainable), fp32, micro-batch {batch}", columns)
    for rank, by_stage in enumerate(data["ranks"]):
        z0 = by_stage.get("0")
        for key in sorted(by_stage, key=int):
            r = by_stage[key]
            th = theory(int(key), n_all, n_train, world)
            table.add(**{"ZeRO": f"ZeRO-{key}", "rank": rank, "params MiB": r["params"] / C.MiB,
                         "params theory": th["params"] / C.MiB, "grads+buf MiB": r["grads"] / C.MiB,
                         "grads theory": th["grads"] / C.MiB, "optim MiB": r["optimizer"] / C.MiB,
                         "optim theory": th["optimizer"] / C.MiB, "total MiB": r["total"] / C.MiB,
                         "total x ZeRO-0": r["total"] / z0["total"] if z0 else None, "step s": r["step_s"],
                         "step x ZeRO-0": r["step_s"] / z0["step_s"] if z0 else None})
    table.notes += [
        "measured right after a backward (gradients alive), from the tensor storages each rank's engine holds; "
        "ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every rank",
        "theory: fp32 Adam as DeepSpeed runs it (module docstring); grads+buf = gradients as DeepSpeed holds them "
        "after the backward (ZeRO-1 at an accumulation boundary already keeps little beyond its partition) plus "
        "its reduction buckets (reduce_bucket_size of the shipped configs)",
        "step s: median over timed steps, both ranks stepping together; 2 ranks share 2 cores here",
    ]
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", help="small | tiny | base_2layer_2conect | base_6layer_6conect")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--stages", type=int, nargs="*", default=list(STAGES))
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--verbose", action="store_true", help="ranks print their memory after each stage")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.steps = args.steps or 3
        return worker(args)
    C.setup_env()
    info = C.machine()
    tables = run(args.quick, config=args.config, ranks=args.ranks, batch=args.batch, steps=args.steps,
                 timeout_s=args.timeout, stages=args.stages, verbose=args.verbose)
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
