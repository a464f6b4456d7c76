"""Question 6 - scaling on paper: bytes communicated per optimizer step per ZeRO stage, and the
expected weak-scaling efficiency at 1, 2, 8 and 32 nodes of 8 GPUs.

    python bench/scaling.py                          # H100 step time ASSUMED (45% MFU), + a CPU step measured here
    python bench/scaling.py --gpu-samples-per-s 8000 # a measured GPU rate instead of the assumption
    python bench/scaling.py --no-measure             # the assumption only, no CPU step

Model (ring collectives, data parallel over N = 8 x nodes GPUs, P parameters, per optimizer step):
  ZeRO-0  all-reduce of the gradients                          2 (N-1)/N P g
  ZeRO-1  reduce-scatter of gradients + all-gather of params     (N-1)/N P (g + p)
  ZeRO-2  as ZeRO-1, but the reduce-scatter runs every micro-batch (N-1)/N P (A g + p)
  ZeRO-3  all-gather of params in forward and backward and a
          reduce-scatter of gradients, every micro-batch          (N-1)/N P A (2p + g)
with g, p the bytes per gradient / parameter element on the wire and A the gradient-accumulation
steps. A collective's time is its bytes over the per-GPU bus bandwidth: NVLink/NVSwitch inside
one node; across nodes each GPU's own InfiniBand port (8 per node) is the bottleneck.
Efficiency = compute / (compute + exposed communication); "overlapped" lets the backward pass
(2/3 of the compute; all of it for ZeRO-3, whose all-gathers are prefetched) hide communication.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PARAMS = 268_028_859  # base 6layer_6conect + task tokens (the 268M; q_dense* included)
NODES = (1, 2, 8, 32)
GPUS_PER_NODE = 8
H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM data sheet
ASSUMED_MFU = 0.45  # the goal of the performance issue, not a measurement


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float  # achievable per-GPU bus bandwidth, one direction
    source: str


# Published per-direction line rates, times an assumed 80% achievable NCCL bus bandwidth.
NVLINK = Link("NVLink4/NVSwitch", 450.0 * 0.8, "H100 SXM: 900 GB/s bidirectional NVLink per GPU")
NDR = Link("IB NDR 400G", 50.0 * 0.8, "InfiniBand NDR 400 Gb/s = 50 GB/s per port, one port per GPU (DGX H100)")
HDR = Link("IB HDR 200G", 25.0 * 0.8, "InfiniBand HDR 200 Gb/s = 25 GB/s per port, one port per GPU (DGX A100)")


def bytes_per_step(stage: int, n: int, params: int, *, grad_bytes: float, param_bytes: float,
                   accumulation: int) -> float:
    """Bytes each GPU sends (= receives) per optimizer step for ZeRO `stage` over `n` GPUs."""
    if n <= 1:
        return 0.0
    f = (n - 1) / n * params
    if stage == 0:
        return 2 * f * grad_bytes
    if stage == 1:
        return f * (grad_bytes + param_bytes)
    if stage == 2:
        return f * (accumulation * grad_bytes + param_bytes)
    if stage == 3:
        return f * accumulation * (2 * param_bytes + grad_bytes)
    raise ValueError(f"ZeRO stage {stage}")


def comm_seconds(stage: int, nodes: int, link: Link, **kw) -> float:
    n = nodes * GPUS_PER_NODE
    bw = NVLINK.gbytes_per_s if nodes == 1 else min(NVLINK.gbytes_per_s, link.gbytes_per_s)
    return bytes_per_step(stage, n, **kw) / (bw * 1e9)


def efficiency(compute_s: float, comm_s: float, stage: int, overlap: bool) -> float:
    window = (compute_s if stage == 3 else compute_s * 2 / 3) if overlap else 0.0
    return compute_s / (compute_s + max(0.0, comm_s - window))


def samples_for(target: float, stage: int, nodes: int, link: Link, sps: float, micro_batch: int,
                kw: dict) -> str:
    """Samples per GPU per optimizer step (micro-batches of `micro_batch` accumulated) for which
    the non-overlapped efficiency reaches `target`; ZeRO-2/3 communicate every micro-batch, so
    accumulation cannot always get there."""
    for accumulation in range(1, 4097):
        args = {**kw, "accumulation": accumulation}
        compute = accumulation * micro_batch / sps
        if efficiency(compute, comm_seconds(stage, nodes, link, **args), stage, False) >= target:
            return f"{accumulation * micro_batch:,} (A={accumulation})"
    limit = efficiency(4096 * micro_batch / sps, comm_seconds(stage, nodes, link, **{**kw, "accumulation": 4096}),
                       stage, False)
    return f"never (at most {limit:.0%})"


def h100_assumed_samples_per_s() -> float:
    """Samples/s of one H100 at the assumed MFU on the base model's pretraining step."""
    cfg = C.model_config("base_6layer_6conect", C.PRETRAIN)
    return ASSUMED_MFU * H100_BF16_PEAK_TFLOPS * 1e12 / C.flops_per_sample(cfg, C.PRETRAIN)


def run(*, step_s: dict[str, float] | None = None, samples_per_s: dict[str, float] | None = None,
        samples_per_gpu: int = 64, micro_batch: int = 64, grad_bytes: float = 2.0, param_bytes: float = 2.0,
        params: int = PARAMS) -> list[C.Table]:
    """Tables for the given single-device rates (label -> samples/s), plus the H100 assumption.
    `step_s` (label -> seconds per sample) is accepted for callers that hold times."""
    rates: dict[str, float] = {f"H100 ASSUMED ({ASSUMED_MFU:.0%} MFU bf16, not measured)": h100_assumed_samples_per_s()}
    rates.update(samples_per_s or {})
    for label, s in (step_s or {}).items():
        rates[label] = 1.0 / s
    accumulation = max(1, samples_per_gpu // micro_batch)
    kw = dict(params=params, grad_bytes=grad_bytes, param_bytes=param_bytes, accumulation=accumulation)

    vol = C.Table(f"Q6a bytes per GPU per optimizer step, {params / 1e6:.0f}M parameters "
                  f"(grads {grad_bytes:g} B, params {param_bytes:g} B on the wire, accumulation {accumulation})",
                  ["ZeRO", "collectives per step", "GB at 8 GPUs", "GB at 256 GPUs", "x ZeRO-0",
                   "ms at 8 GPUs (NVLink)", "ms at 256 GPUs (NDR)"])
    names = {0: "all-reduce(grads)", 1: "reduce-scatter(grads) + all-gather(params)",
             2: "reduce-scatter(grads) per micro-batch + all-gather(params)",
             3: "2 x all-gather(params) + reduce-scatter(grads), per micro-batch"}
    z0 = bytes_per_step(0, 256, **kw)
    for stage in range(4):
        vol.add(**{"ZeRO": f"ZeRO-{stage}", "collectives per step": names[stage],
                   "GB at 8 GPUs": bytes_per_step(stage, 8, **kw) / 1e9,
                   "GB at 256 GPUs": bytes_per_step(stage, 256, **kw) / 1e9,
                   "x ZeRO-0": bytes_per_step(stage, 256, **kw) / z0,
                   "ms at 8 GPUs (NVLink)": comm_seconds(stage, 1, NDR, **kw) * 1e3,
                   "ms at 256 GPUs (NDR)": comm_seconds(stage, 32, NDR, **kw) * 1e3})
    vol.notes += [f"{link.name}: {link.gbytes_per_s:.0f} GB/s per GPU assumed achievable ({link.source}; "
                  "80% of the line rate)" for link in (NVLINK, NDR, HDR)]

    cols = (["device step", "link", "ZeRO", "compute ms"] + [f"{n} node{'s' if n > 1 else ''}" for n in NODES]
            + ["samples/GPU/step for 90% at 32 nodes"])
    eff = C.Table(f"Q6b expected weak-scaling efficiency, {samples_per_gpu} samples per GPU per optimizer step "
                  "(no overlap / overlapped)", cols)
    for label, sps in rates.items():
        compute = samples_per_gpu / sps
        for link in (NDR, HDR) if label.startswith("H100") or label.startswith("GPU") else (NDR,):
            for stage in range(4):
                row = {"device step": label, "link": link.name, "ZeRO": f"ZeRO-{stage}", "compute ms": compute * 1e3}
                for nodes in NODES:
                    comm = comm_seconds(stage, nodes, link, **kw)
                    row[cols[4 + NODES.index(nodes)]] = (f"{efficiency(compute, comm, stage, False):.0%} / "
                                                         f"{efficiency(compute, comm, stage, True):.0%}")
                row[cols[-1]] = samples_for(0.9, stage, 32, link, sps, micro_batch, kw)
                eff.add(**row)
    h100 = h100_assumed_samples_per_s()
    eff.notes += [
        f"H100 ASSUMED: {h100:,.0f} samples/s per GPU = {ASSUMED_MFU:.0%} x {H100_BF16_PEAK_TFLOPS:.0f} TFLOP/s / "
        f"{C.flops_per_sample(C.model_config('base_6layer_6conect', C.PRETRAIN), C.PRETRAIN) / 1e9:.1f} GFLOP per "
        "sample; replace it with a measured rate (bench/model_step.py --gpu) when a GPU is lent",
        "weak scaling: every GPU keeps its samples per step, the global batch grows with the GPU count; "
        "1 node communicates over NVLink only",
        "samples/GPU/step for 90%: gradient accumulation of micro-batches (a larger global batch) amortizes "
        "ZeRO-0/1 communication; ZeRO-2/3 communicate per micro-batch",
        "no overlap: communication after the backward (DeepSpeed ZeRO-0's bucketed all-reduce); overlapped: "
        "ZeRO-1/2 overlap_comm hides it behind the backward, ZeRO-3 prefetches all-gathers",
    ]
    return [vol, eff]


def measure_cpu_rate(batch: int = 2) -> float:
    """Samples/s of the base config's pretraining step on this machine's CPU (few steps)."""
    spec = C.StepSpec(config="base_6layer_6conect", batch=batch)
    with C.quiet_output():
        step = C.build_step(spec)
    t = C.time_interleaved({"base": step}, warmup=1, rounds=2)
    C.free(step)
    return batch / t["base"].wall_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-samples-per-s", type=float, help="measured base-config samples/s of one GPU")
    parser.add_argument("--cpu-samples-per-s", type=float,
                        help="measured base-config samples/s on CPU (skips measuring)")
    parser.add_argument("--no-measure", action="store_true", help="do not measure the CPU step here")
    parser.add_argument("--samples-per-gpu", type=int, default=64, help="samples per GPU per optimizer step (512/8)")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--grad-bytes", type=float, default=2.0, help="bytes per gradient element on the wire")
    parser.add_argument("--param-bytes", type=float, default=2.0, help="bytes per parameter element on the wire")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    C.setup_env()
    info = C.machine()
    rates: dict[str, float] = {}
    if args.gpu_samples_per_s:
        rates["GPU measured (bench/model_step.py --gpu)"] = args.gpu_samples_per_s
    cpu = args.cpu_samples_per_s or (None if args.no_measure else measure_cpu_rate())
    if cpu:
        rates["CPU measured here (fp32, this machine)"] = cpu
    tables = run(samples_per_s=rates, samples_per_gpu=args.samples_per_gpu, micro_batch=args.micro_batch,
                 grad_bytes=args.grad_bytes, param_bytes=args.param_bytes)
    C.report(tables, info, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
