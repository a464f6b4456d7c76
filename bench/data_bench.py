"""Data pipeline benchmark: where a loader worker's time goes, stage by stage, and what the whole
pretraining pipeline delivers per worker from local shards and from a local S3 endpoint, beside
the raw read of the same bytes.

    python bench/data_bench.py --quick            # 256 CC-sized samples, about 1-2 minutes
    python bench/data_bench.py                    # 512 samples, 3 repeats
    python bench/data_bench.py --no-s3 --json out.json

What is measured (rates in samples/s; the shards' mean sample size converts byte rates):

Stages, one thread in this process, on the same bytes (each stage's input prepared beforehand):
- read (page cache): `storage.RangeReader` over every shard, chunks of `read_chunk_bytes`
- read (cold): the same after evicting the shard files from the page cache
  (`posix_fadvise(DONTNEED)` per file: the bench's own files only; `echo 3 >
  /proc/sys/vm/drop_caches` works too as root but empties every other process's cache)
- tarfile: Python's `tarfile` splitting the same tars into members (reference only)
- split: `tario.parse_sample` (tar headers, checksums) over every sample's bytes
- decode: `sample.decode` (JSON, .npy headers, dtype/shape checks, NaN/Inf check)
- text: `PretrainCollate.text` (per-sample generators, tokenization, BERT masking)
- regions: `PretrainCollate.regions` (region copy into the batch, masking, global region, IoU)
- collate: the whole `PretrainCollate` call (text + regions + batch assembly)

Pipelines (`build_pretrain_loader`, real code path, steady state: from the first batch on), in
each sample order: `windows` (shuffle windows of `--shuffle-buffer` samples, contiguous reads:
pretraining) and `uniform` (one permutation of the epoch, one ranged read per sample: task loaders):
- workers 0: the loader in this process (its window reader thread overlaps the decode)
- workers 1, 2: DataLoader worker processes, as training runs it; "per worker" = rate / workers
- CPU ms/sample: CPU time of this process + its workers over the epoch, per sample
- requests/sample, KB read/sample: ranged reads (GETs on S3) and bytes read per sample delivered
- cold: 1 worker, shard files evicted first (one pass)
Epoch start (1 worker): seconds from the start of an epoch to its first batch when the loader's
workers live on from the previous epoch (what the loader does) and when they are started anew
for it (a fork per epoch, as before); `--parent-gib` makes the forking process larger.
S3: the same shards on moto (Python, in a subprocess on the same cores) read with ranged GETs,
`readahead_chunks` in flight; client and server CPU seconds per GB show who limits the rate.

`run(...)` returns the figures as a dict (`bench/data_wait.py` builds its tables from it):
`local`/`s3` hold `raw_read` (page cache / S3 raw read), `pipeline` (samples/s of ONE
DataLoader worker process: the per-worker figure), ratios, and the detailed `stages` and
`workers` figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUCKET = "vilbert-bench"
KEY, SECRET = "bench-access-key", "bench-secret"
WAIT_GOAL = 0.05  # data waits under 5% of the step (performance issue)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """moto's S3 server (package moto[server]) in a subprocess on 127.0.0.1."""

    def __init__(self):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto server exited; install the test extra: pip install -e '.[test]'")
                time.sleep(0.2)
        else:
            self.close()
            raise RuntimeError("moto server did not start within 60 s")
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict:
        return {"key": KEY, "secret": SECRET, "endpoint_url": self.endpoint, "client_kwargs": {"region_name": "us-east-1"}}

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have exited (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _best(fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall s, CPU s) of the fastest of `repeats` runs: the least disturbed by other load."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        if before is not None:
            before()
        t0, c0 = time.perf_counter(), _cpu_s()
        fn()
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def evict(paths: list[Path]) -> None:
    """Drops the files' pages from the page cache (written data is synced first, or it stays)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# stages


def _read_all(urls: list[str], sizes: list[int], storage_options: dict, chunk: int, parallel: int) -> list:
    from vilbert_ds.data.storage import RangeReader

    return [list(RangeReader(u, 0, n, storage_options=storage_options, chunk_bytes=chunk, parallel=parallel))
            for u, n in zip(urls, sizes)]


def _tarfile(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with tarfile.open(p, "r|") as tf:  # streaming mode: sequential read + member split
            for member in tf:
                f = tf.extractfile(member)
                if f is not None:
                    f.read()
                    n += 1
    return n


def stage_rates(manifest, collate, *, chunk: int, parallel: int, batch: int, repeats: int,
                tars: list[Path]) -> dict[str, dict[str, float]]:
    """samples/s of each stage alone, one thread (see the module docstring)."""
    import numpy as np

    from vilbert_ds.data.sample import decode
    from vilbert_ds.data.tario import parse_sample, split_name

    shards = manifest.shards
    urls, sizes = [s.url for s in shards], [s.offsets[-1] for s in shards]
    n = sum(s.count for s in shards)
    total = sum(sizes)
    out: dict[str, dict[str, float]] = {}

    def put(name, wall_cpu, count=n, nbytes=total):
        wall, cpu = wall_cpu
        out[name] = {"samples_per_s": count / wall, "MBps": nbytes / wall / 1e6, "us_per_sample": 1e6 * wall / count,
                     "cpu_us_per_sample": 1e6 * cpu / count}

    _read_all(urls, sizes, {}, chunk, parallel)  # warm the page cache
    put("read (page cache)", _best(lambda: _read_all(urls, sizes, {}, chunk, parallel), repeats))
    put("read (cold)", _best(lambda: _read_all(urls, sizes, {}, chunk, parallel), repeats,
                             before=lambda: evict(tars)))
    put("tarfile", _best(lambda: _tarfile(tars), repeats))
    data = [np.concatenate(chunks) for chunks in _read_all(urls, sizes, {}, chunk, parallel)]
    spans = [(memoryview(d)[s.offsets[i]:s.offsets[i + 1]], s.name) for s, d in zip(shards, data) for i in range(s.count)]
    members: list = []

    def split():
        members[:] = [parse_sample(span, name) for span, name in spans]
    put("split", _best(split, repeats))
    samples: list = []

    def dec():
        samples[:] = [decode(split_name(m[0].name)[0], {split_name(x.name)[1]: x.data for x in m}, "bench",
                             num_classes=manifest.num_classes) for m in members]
    put("decode", _best(dec, repeats))
    batches = [samples[k:k + batch] for k in range(0, len(samples) - batch + 1, batch)]
    used = len(batches) * batch
    drawn: list = []

    def text():
        drawn[:] = [collate.text(b, 0).region_draws for b in batches]
    put("text", _best(text, repeats), used, total * used / n)
    put("regions", _best(lambda: [collate.regions(b, d) for b, d in zip(batches, drawn)], repeats), used,
        total * used / n)
    put("collate", _best(lambda: [collate(b, 0) for b in batches], repeats), used, total * used / n)
    per_sample = sum(out[k]["us_per_sample"] for k in ("read (page cache)", "split", "decode", "collate"))
    out["sum of stages"] = {"samples_per_s": 1e6 / per_sample, "MBps": total / n * 1e6 / per_sample / 1e6,
                            "us_per_sample": per_sample, "cpu_us_per_sample": float("nan")}
    return out


# ---------------------------------------------------------------------------------------------
# pipelines


def pipeline_rate(cfg, *, batch: int, epoch: int, before: Callable[[], None] | None = None) -> dict[str, float]:
    """One epoch of the pretraining loader: steady samples/s (first to last batch: the start-up
    before it and the workers' exit after it are left out), seconds to the first batch, CPU ms
    per sample (this process + its workers, whole epoch: the workers are ended to count them)."""
    from vilbert_ds.data.cc_batches import build_pretrain_loader

    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=batch, seed=0)
    loader.set_epoch(epoch)
    if before is not None:
        before()
    t0, c0 = time.perf_counter(), _cpu_s()
    first = None
    n = 0
    for b in loader:
        n += b.size
        last = time.perf_counter()  # the workers' exit after the last batch is not the pipeline's rate
        if first is None:
            first = (last, n)
    end = time.perf_counter()
    requests, nbytes = loader.last_report["requests"], loader.last_report["bytes"]
    loader.close()  # the workers exit: their CPU time joins RUSAGE_CHILDREN
    cpu = _cpu_s() - c0
    steady = (n - first[1]) / (last - first[0]) if n > first[1] else n / (end - t0)
    return {"samples_per_s": steady, "first_batch_s": first[0] - t0, "cpu_ms_per_sample": 1e3 * cpu / n, "samples": n,
            "requests_per_sample": requests / n, "read_bytes_per_sample": nbytes / n}


def epoch_start(cfg, *, batch: int, repeats: int) -> dict[str, float]:
    """Seconds from an epoch's start to its first batch, 1 worker: with the workers living on
    from the previous epoch, and with new workers for the epoch (closed before it: a fork)."""
    from vilbert_ds.data.cc_batches import build_pretrain_loader

    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=batch, seed=0)
    out = {"live workers": float("inf"), "new workers": float("inf")}
    epoch = 0
    for _ in range(repeats):
        for case in ("live workers", "new workers"):
            for _ in loader:  # finish the epoch (the first: the workers start)
                pass
            epoch += 1
            loader.set_epoch(epoch)
            if case == "new workers":
                loader.close()
            t0 = time.perf_counter()
            next(iter(loader))
            out[case] = min(out[case], time.perf_counter() - t0)
    loader.close()
    return out


def pipelines(make_cfg, *, n: int, batch: int, repeats: int, workers: tuple[int, ...],
              cold: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    out = {}
    for w in (0,) + tuple(workers):
        # enough batches per worker for a steady rate: the epoch cycles through the shards again
        epoch_samples = max(n, 12 * batch * max(w, 1))
        cfg = make_cfg(num_workers=w, epoch_samples=epoch_samples)
        best = None
        for r in range(repeats):
            got = pipeline_rate(cfg, batch=batch, epoch=r)
            if best is None or got["samples_per_s"] > best["samples_per_s"]:
                best = got
        best["per_worker"] = best["samples_per_s"] / max(w, 1)
        out[f"workers {w}"] = best
    if cold is not None:
        got = pipeline_rate(make_cfg(num_workers=1, epoch_samples=None), batch=batch, epoch=repeats + 1, before=cold)
        got["per_worker"] = got["samples_per_s"]
        out["workers 1, cold"] = got
    return out


def gpu_goal(per_worker: float, cpu_ms: float, sample_bytes: float) -> dict[str, float]:
    """Workers, cores and read bandwidth per GPU that keep data waits under 5% at the assumed
    H100 rate of the base model (bench/scaling.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scaling

    rate = scaling.h100_assumed_samples_per_s()
    need = rate / (1 - WAIT_GOAL)
    return {"gpu_samples_per_s": rate, "workers_per_gpu": math.ceil(need / per_worker),
            "cores_per_gpu": need * cpu_ms / 1e3, "read_MBps_per_gpu": rate * sample_bytes / 1e6}


# ---------------------------------------------------------------------------------------------


def run(images: int = 256, boxes: int = 36, batch: int = 32, repeats: int = 3, s3: bool = True,
        workdir: str | None = None, parallel_reads: int = 4, shuffle_buffer: int = 240, chunk: str = "8MiB",
        workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Builds synthetic CC-sized shards (4 shards), measures and returns the figures."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # what a DataLoader worker process runs with
    from vilbert_ds.assets import minilm_dir
    from vilbert_ds.data.config import DataConfig, parse_bytes
    from vilbert_ds.data.formats import Captions, TsvInput
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.cc_batches import PretrainCollate
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv
    from vilbert_ds.data.writer import BuildConfig, build

    root = Path(workdir or tempfile.mkdtemp(prefix="vilbert-data-bench-"))
    chunk_bytes = parse_bytes(chunk)
    out: dict[str, Any] = {"images": images, "boxes": boxes, "batch": batch, "repeats": repeats,
                           "shuffle_buffer": shuffle_buffer, "read_chunk_bytes": chunk, "parallel_reads": parallel_reads,
                           "workers": list(workers)}
    try:
        inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=images, num_boxes=boxes, seed=0))
        shard_dir = root / "shards"
        build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
              BuildConfig(output=str(shard_dir), prefix="cc", max_count=math.ceil(images / 4), progress=False,
                          rebuild=True))  # inputs rewritten on every run
        shutil.rmtree(root / "in")
        manifest = load_source(str(shard_dir / "manifest.json"), {})
        tars = [shard_dir / s.name for s in manifest.shards]
        sizes = [s.bytes for s in manifest.shards]
        n = manifest.num_samples
        total_bytes = sum(sizes)
        sample_bytes = total_bytes / n
        out.update(samples=n, shard_bytes=total_bytes, sample_bytes=round(sample_bytes))
        vocab = str(minilm_dir())

        def make_cfg(url, opts=None, order="windows"):
            def cfg(**kw):
                return DataConfig(train=url, storage_options=opts or {}, vocab=vocab, max_regions=boxes,
                                  shuffle_buffer=shuffle_buffer if order == "windows" else None, read_chunk_bytes=chunk,
                                  readahead_chunks=parallel_reads, **kw)
            return cfg

        local_cfg = make_cfg(str(shard_dir / "manifest.json"))
        collate = PretrainCollate(local_cfg(), 0, manifest.caption_pool, manifest.num_classes)
        collate.setup()
        stages = stage_rates(manifest, collate, chunk=chunk_bytes, parallel=parallel_reads, batch=batch,
                             repeats=repeats, tars=tars)
        pipes = pipelines(local_cfg, n=n, batch=batch, repeats=repeats, workers=workers, cold=lambda: evict(tars))
        uniform = pipelines(make_cfg(str(shard_dir / "manifest.json"), order="uniform"), n=n, batch=batch,
                            repeats=repeats, workers=workers, cold=lambda: evict(tars))
        one = pipes["workers 1"] if "workers 1" in pipes else pipes["workers 0"]
        raw = stages["read (page cache)"]["samples_per_s"]
        local = out["local"] = {
            "raw_read": raw, "raw_read_MBps": stages["read (page cache)"]["MBps"],
            "raw_read_cold": stages["read (cold)"]["samples_per_s"], "raw_read_cold_MBps": stages["read (cold)"]["MBps"],
            "raw_tar": stages["tarfile"]["samples_per_s"], "pipeline": one["per_worker"],
            "pipeline_in_process": pipes["workers 0"]["samples_per_s"], "stages": stages, "workers": pipes,
            "orders": {"windows": pipes, "uniform": uniform},
            "pipeline_uniform": (uniform["workers 1"] if "workers 1" in uniform else uniform["workers 0"])["per_worker"],
            "epoch_start": epoch_start(local_cfg(num_workers=1), batch=batch, repeats=repeats),
        }
        local["pipeline_vs_raw_read"] = local["pipeline"] / raw
        local["pipeline_vs_raw_read_cold"] = local["pipeline"] / local["raw_read_cold"]
        local["pipeline_vs_raw_tar"] = local["pipeline"] / local["raw_tar"]
        local["in_process_vs_raw_read"] = local["pipeline_in_process"] / raw
        local["gpu_goal"] = gpu_goal(one["per_worker"], one["cpu_ms_per_sample"], sample_bytes)
        if s3:
            server = LocalS3()
            try:
                opts = server.storage_options()
                import s3fs

                fs = s3fs.S3FileSystem(**opts)
                for p in shard_dir.iterdir():
                    fs.put_file(str(p), f"{BUCKET}/cc/{p.name}")
                urls = [f"s3://{BUCKET}/cc/{t.name}" for t in tars]
                _read_all(urls, sizes, opts, chunk_bytes, parallel_reads)  # connections, credentials
                s0 = server.cpu_s()
                wall, cpu = _best(lambda: _read_all(urls, sizes, opts, chunk_bytes, parallel_reads), repeats)
                server_cpu = (server.cpu_s() - s0) / repeats
                remote = make_cfg(f"s3://{BUCKET}/cc/manifest.json", opts)
                s3_pipes = pipelines(remote, n=n, batch=batch, repeats=repeats, workers=workers)
                s3_uniform = pipelines(make_cfg(f"s3://{BUCKET}/cc/manifest.json", opts, order="uniform"), n=n,
                                       batch=batch, repeats=repeats, workers=workers)
                one_s3 = s3_pipes["workers 1"] if "workers 1" in s3_pipes else s3_pipes["workers 0"]
                r = out["s3"] = {"raw_read": n / wall, "raw_read_MBps": total_bytes / wall / 1e6,
                                 "client_cpu_s_per_GB": cpu / total_bytes * 1e9,
                                 "server_cpu_s_per_GB": server_cpu / total_bytes * 1e9,
                                 "pipeline": one_s3["per_worker"],
                                 "pipeline_in_process": s3_pipes["workers 0"]["samples_per_s"], "workers": s3_pipes,
                                 "orders": {"windows": s3_pipes, "uniform": s3_uniform},
                                 "pipeline_uniform": (s3_uniform["workers 1"] if "workers 1" in s3_uniform
                                                      else s3_uniform["workers 0"])["per_worker"]}
                r["pipeline_vs_raw_read"] = r["pipeline"] / r["raw_read"]
                r["pipeline_vs_local_pipeline"] = r["pipeline"] / local["pipeline"]
                r["raw_read_vs_local_raw_read"] = r["raw_read"] / raw
                r["gpu_goal"] = gpu_goal(one_s3["per_worker"], one_s3["cpu_ms_per_sample"], sample_bytes)
            finally:
                server.close()
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return out


def _f(x: float, digits: int = 0) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def table(r: dict[str, Any]) -> str:
    loc = r["local"]
    lines = [f"data pipeline: {r['samples']} samples x {r['boxes']} regions ({r['sample_bytes'] / 1e3:.0f} KB/sample) "
             f"in 4 shards, micro-batch {r['batch']}, shuffle windows of {r['shuffle_buffer']} samples, reads of "
             f"{r['read_chunk_bytes']} x{r['parallel_reads']} in flight, best of {r['repeats']}",
             "", "stages, one thread (each alone, on the same bytes):",
             f"  {'stage':<18} {'samples/s':>10} {'MB/s':>8} {'us/sample':>10}"]
    for name, s in loc["stages"].items():
        lines.append(f"  {name:<18} {_f(s['samples_per_s']):>10} {_f(s['MBps']):>8} {_f(s['us_per_sample'], 1):>10}")
    lines += ["", "pipeline (build_pretrain_loader, steady state):",
              f"  {'source':<6} {'order':<8} {'workers':<10} {'samples/s':>10} {'per worker':>11} {'CPU ms/sample':>14} "
              f"{'requests/sample':>16} {'KB read/sample':>15} {'1st batch s':>12}"]
    for src in ("local", "s3"):
        if src not in r:
            continue
        for order, pipes in r[src]["orders"].items():
            for name, p in pipes.items():
                lines.append(f"  {src:<6} {order:<8} {name[8:] or '0':<10} {_f(p['samples_per_s']):>10} "
                             f"{_f(p['per_worker']):>11} {_f(p['cpu_ms_per_sample'], 2):>14} "
                             f"{_f(p['requests_per_sample'], 2):>16} {_f(p['read_bytes_per_sample'] / 1e3):>15} "
                             f"{_f(p['first_batch_s'], 2):>12}")
    e = loc["epoch_start"]
    lines += ["", "epoch start, 1 worker (seconds to the first batch of a new epoch):",
              f"  workers living on from the last epoch {e['live workers']:.3f}   new workers (fork) {e['new workers']:.3f}"]
    g = loc["gpu_goal"]
    lines += ["", "ratios (per worker = one DataLoader worker process):",
              f"  local pipeline / raw read, page cache  {loc['pipeline_vs_raw_read']:.2f}   (goal >= 0.80)",
              f"  local pipeline / raw read, cold cache  {loc['pipeline_vs_raw_read_cold']:.2f}   (goal >= 0.80)",
              f"  local pipeline / tarfile split         {loc['pipeline_vs_raw_tar']:.2f}",
              f"  in-process pipeline / raw read         {loc['in_process_vs_raw_read']:.2f}",
              f"  uniform / windows order, per worker    {loc['pipeline_uniform'] / loc['pipeline']:.2f}"]
    if "s3" in r:
        s = r["s3"]
        lines += [f"  S3 pipeline / local pipeline           {s['pipeline_vs_local_pipeline']:.2f}   (goal >= 0.90)",
                  f"  S3 uniform / windows order, per worker {s['pipeline_uniform'] / s['pipeline']:.2f}",
                  f"  S3 raw read / local raw read           {s['raw_read_vs_local_raw_read']:.2f}",
                  f"  S3 raw read {s['raw_read_MBps']:.0f} MB/s: client {s['client_cpu_s_per_GB']:.2f} CPU-s/GB, "
                  f"moto server {s['server_cpu_s_per_GB']:.2f} CPU-s/GB (same cores)"]
    lines += ["", f"GPU goal (data waits < 5% at {g['gpu_samples_per_s']:,.0f} samples/s per GPU, H100 ASSUMED 45% MFU):"]
    for src in ("local", "s3"):
        if src in r:
            g = r[src]["gpu_goal"]
            lines.append(f"  {src:<6} {g['workers_per_gpu']} workers/GPU at this machine's per-worker rate, "
                         f"{g['cores_per_gpu']:.1f} cores/GPU by CPU time, {g['read_MBps_per_gpu']:,.0f} MB/s read per GPU")
    return "\n".join(lines)


def _ballast(gib: float) -> list:
    """`gib` GiB of written (resident) float32 tensors in 256 MiB pieces."""
    import torch

    pieces, left = [], int(gib * 2**30) // 4
    while left > 0:
        n = min(left, 2**26)
        pieces.append(torch.ones(n))
        left -= n
    return pieces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 images, 2 repeats")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shuffle-buffer", type=int, default=240,
                   help="data.shuffle_buffer of the windows order (240 samples = 64 MB at 36 regions; the next window "
                        "is read while one is processed)")
    p.add_argument("--chunk", default="8MiB", help="data.read_chunk_bytes")
    p.add_argument("--reads", type=int, default=4, help="data.readahead_chunks: ranged reads in flight")
    p.add_argument("--no-s3", action="store_true", help="skip the local S3 endpoint")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--parent-gib", type=float, default=0.0,
                   help="hold this many GiB of tensors in the measuring process while the loader workers fork from "
                        "it, as a trainer holding a model does (0: none)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 256, 2
    ballast = _ballast(args.parent_gib)  # noqa: F841 - held until the figures are taken
    r = run(images=args.images, boxes=args.boxes, batch=args.batch, repeats=args.repeats, s3=not args.no_s3,
            shuffle_buffer=args.shuffle_buffer, chunk=args.chunk, parallel_reads=args.reads)
    r["command"] = "python bench/data_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
