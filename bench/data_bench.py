"""Data pipeline benchmark: samples/s of the full pretraining pipeline (read, decode, mask,
collate) per worker, from local shards and from a local S3 endpoint, beside the raw read of the
same bytes as the ceiling.

    python bench/data_bench.py --quick            # ~100 CC-sized samples, about a minute
    python bench/data_bench.py --images 512       # more samples, steadier figures

Figures (one worker = the loader's per-worker work run in this process, `num_workers=0`):
- raw_read:  plain reads of the tar bytes in 8 MiB blocks (local file / S3 ranged reads)
- raw_tar:   the same bytes split into tar members (Python `tarfile`): the ceiling for any
             reader that has to separate samples
- pipeline:  `build_pretrain_loader` batches (ranged reads, sample decode + checks, token and
             region masking, global region, collate to PretrainBatch)
All rates are samples/s (the shards' mean sample size converts byte rates). Ratios are taken
within one run, so the load of a shared machine moves them much less than the absolute rates.
`run(...)` returns the figures as a dict for `bench/run.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUCKET = "vilbert-bench"
KEY, SECRET = "bench-access-key", "bench-secret"


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

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _best(fn, repeats: int) -> float:
    """Best (shortest) of `repeats` timings, seconds: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


CHUNK = "2MiB"  # ranged-read size: several reads in flight even within the bench's ~6 MB shards


def _raw_read(urls: list[str], sizes: list[int], storage_options: dict, parallel: int) -> None:
    from vilbert_ds.data.config import parse_bytes
    from vilbert_ds.data.storage import RangeReader

    for url, size in zip(urls, sizes):
        for _ in RangeReader(url, 0, size, storage_options=storage_options, chunk_bytes=parse_bytes(CHUNK),
                             parallel=parallel):
            pass


def _raw_tar(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with tarfile.open(p, "r|") as tf:  # streaming mode: sequential read + member split
            for member in tf:
                f = tf.extractfile(member)
                if f is not None:
                    f.read()
                    n += 1
    return n


class _Pipeline:
    """One loader (tokenizer and manifest loaded once); each call runs one more epoch."""

    def __init__(self, cfg, batch: int):
        from vilbert_ds.data.pretrain import build_pretrain_loader

        self.loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=batch, seed=0)
        self.epoch = 0

    def __call__(self) -> int:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        return sum(b.size for b in self.loader)


def run(images: int = 96, boxes: int = 36, batch: int = 32, repeats: int = 3, s3: bool = True,
        workdir: str | None = None, parallel_reads: int = 4, window: str = "8MB") -> dict[str, Any]:
    """Builds synthetic CC-sized shards, measures and returns the figures (samples/s and ratios)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # what a DataLoader worker process runs with
    from vilbert_ds.assets import minilm_dir
    from vilbert_ds.data.config import DataConfig
    from vilbert_ds.data.formats import Captions, TsvInput
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv
    from vilbert_ds.data.writer import BuildConfig, build

    root = Path(workdir or tempfile.mkdtemp(prefix="vilbert-data-bench-"))
    out: dict[str, Any] = {"images": images, "boxes": boxes, "batch": batch, "repeats": repeats,
                           "shuffle_bytes": window, "parallel_reads": parallel_reads}
    try:
        inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=images, num_boxes=boxes, seed=0))
        shard_dir = root / "shards"
        build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
              BuildConfig(output=str(shard_dir), prefix="cc", max_count=max(8, images // 4), progress=False))
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        tars = [shard_dir / s["name"] for s in manifest["shards"]]
        sizes = [s["bytes"] for s in manifest["shards"]]
        n = manifest["num_samples"]
        total_bytes = sum(sizes)
        out.update(samples=n, shard_bytes=total_bytes, sample_bytes=round(total_bytes / n))
        vocab = str(minilm_dir())

        def cfg(url, opts=None):
            return DataConfig(train=url, storage_options=opts or {}, vocab=vocab, num_workers=0, max_regions=boxes,
                              shuffle_bytes=window, read_chunk_bytes=CHUNK, readahead_chunks=parallel_reads)

        local = _Pipeline(cfg(str(shard_dir / "manifest.json")), batch)
        local()  # warm: page cache, imports
        t_raw = _best(lambda: _raw_read([str(t) for t in tars], sizes, {}, parallel_reads), repeats)
        t_tar = _best(lambda: _raw_tar(tars), repeats)
        t_pipe = _best(local, repeats)
        out["local"] = {"raw_read": n / t_raw, "raw_tar": n / t_tar, "pipeline": n / t_pipe,
                        "raw_read_MBps": total_bytes / t_raw / 1e6}
        out["local"]["pipeline_vs_raw_tar"] = out["local"]["pipeline"] / out["local"]["raw_tar"]
        out["local"]["pipeline_vs_raw_read"] = out["local"]["pipeline"] / out["local"]["raw_read"]
        if s3:
            server = LocalS3()
            try:
                opts = server.storage_options()
                import s3fs

                fs = s3fs.S3FileSystem(**opts)
                for p in shard_dir.iterdir():
                    fs.put_file(str(p), f"{BUCKET}/cc/{p.name}")
                remote = _Pipeline(cfg(f"s3://{BUCKET}/cc/manifest.json", opts), batch)
                urls = [f"s3://{BUCKET}/cc/{t.name}" for t in tars]
                remote()
                t_raw_s3 = _best(lambda: _raw_read(urls, sizes, opts, parallel_reads), repeats)
                t_pipe_s3 = _best(remote, repeats)
                out["s3"] = {"raw_read": n / t_raw_s3, "pipeline": n / t_pipe_s3, "raw_read_MBps": total_bytes / t_raw_s3 / 1e6}
                out["s3"]["pipeline_vs_local_pipeline"] = out["s3"]["pipeline"] / out["local"]["pipeline"]
                out["s3"]["raw_read_vs_local_raw_read"] = out["s3"]["raw_read"] / out["local"]["raw_read"]
                out["s3"]["pipeline_vs_raw_read"] = out["s3"]["pipeline"] / out["s3"]["raw_read"]
            finally:
                server.close()
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"data pipeline, one worker: {r['samples']} samples x {r['boxes']} regions "
             f"({r['sample_bytes'] / 1e3:.0f} KB/sample), micro-batch {r['batch']}, shuffle window "
             f"{r['shuffle_bytes']}, {r['parallel_reads']} reads of {CHUNK} in flight, best of {r['repeats']}",
             f"{'source':<8} {'raw read':>12} {'raw tar':>12} {'pipeline':>12}   ratios",
             f"{'local':<8} {r['local']['raw_read']:>10.0f}/s {r['local']['raw_tar']:>10.0f}/s "
             f"{r['local']['pipeline']:>10.0f}/s   pipeline/raw_tar {r['local']['pipeline_vs_raw_tar']:.2f}, "
             f"pipeline/raw_read {r['local']['pipeline_vs_raw_read']:.2f}"]
    if "s3" in r:
        lines.append(f"{'s3':<8} {r['s3']['raw_read']:>10.0f}/s {'':>12} {r['s3']['pipeline']:>10.0f}/s   "
                     f"pipeline/raw_read {r['s3']['pipeline_vs_raw_read']:.2f}, "
                     f"pipeline s3/local {r['s3']['pipeline_vs_local_pipeline']:.2f}, "
                     f"raw read s3/local {r['s3']['raw_read_vs_local_raw_read']:.2f}")
    lines.append(f"raw read MB/s: local {r['local']['raw_read_MBps']:.0f}"
                 + (f", s3 {r['s3']['raw_read_MBps']:.0f}" if "s3" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="96 images, 2 repeats")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", default="8MB", help="data.shuffle_bytes (the next window is read while one is processed)")
    p.add_argument("--reads", type=int, default=4, help="data.readahead_chunks: ranged reads in flight")
    p.add_argument("--no-s3", action="store_true", help="skip the local S3 endpoint")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 96, 2
    r = run(images=args.images, boxes=args.boxes, batch=args.batch, repeats=args.repeats, s3=not args.no_s3,
            window=args.window, parallel_reads=args.reads)
    r["command"] = "python bench/data_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
