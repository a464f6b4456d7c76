"""Bytes read from the bucket per epoch per node, with and without the node-local shard cache
(`data.cache_dir`), over 3 epochs.

    python bench/data_cache.py                  # 192 CC-sized samples in 8 shards, ~2 minutes
    python bench/data_cache.py --quick          # 96 samples in 8 shards
    python bench/data_cache.py --markdown --json out.json

Setup: CC-sized synthetic shards (36 regions with cls_prob, ~262 KB per sample) on a local S3
server (moto's, `data_bench.LocalS3`). Two ranks stand for two nodes: each is its own process
with `world_size=2`, `data.cache_ranks_per_node=1` and its own cache directory, and runs the
real `build_pretrain_loader` (1 loader worker) for 3 epochs, once without the cache (today's
plan: shard order re-shuffled each epoch, ranged reads from the bucket) and once with it.

Counted two ways, both per node and epoch:
- at the client: the loader's own storage counters, the epoch report's `bytes`/`requests`
  (ranged GETs of the read path) without the cache, `cache_download_bytes` /
  `cache_download_requests` (whole-shard downloads) with it; reads of the local copies are not
  bucket reads and are not counted there;
- at the wire: each node talks to the server through its own counting TCP proxy (in this
  process), which counts the bytes the server sent (HTTP headers included) and the GET request
  lines the node sent. Epoch 0 includes the manifest and caption-pool reads at loader start.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

EPOCHS = 3
NODES = 2


class CountingProxy:
    """TCP proxy 127.0.0.1:port -> the S3 server: counts bytes towards the client and GET
    request lines from it (requests of a kept-alive connection start at a line 'GET /...')."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.down_bytes = 0
        self.gets = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.down_bytes, self.gets

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        tail = b"\n"  # request lines start after a newline (or at the connection's start)
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    if down:
                        self.down_bytes += len(data)
                    else:
                        self.gets += (tail + data).count(b"\nGET /")
                tail = data[-1:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def _node(rank: int, cfg_kwargs: dict[str, Any], out, go) -> None:
    """One node (rank `rank` of 2): 3 epochs; after each, its epoch report goes to `out` and it
    waits for `go` (so the wire counters are read between epochs)."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from vilbert_ds.data.cc_batches import build_pretrain_loader
    from vilbert_ds.data.config import DataConfig

    loader = build_pretrain_loader(DataConfig(**cfg_kwargs), rank=rank, world_size=NODES, micro_batch_size=8, seed=0)
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        keys = set()
        for batch in loader:
            keys.update(batch.keys)
        out.put((rank, epoch, loader.plan, sorted(keys), loader.last_report))
        go.wait()
        go.clear()
    loader.close()


def run(images: int, shards: int, workdir: str | None = None) -> dict[str, Any]:
    import s3fs

    from data_bench import LocalS3
    from vilbert_ds.assets import minilm_dir
    from vilbert_ds.data.formats import Captions, TsvInput
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv
    from vilbert_ds.data.writer import BuildConfig, build

    root = Path(workdir or tempfile.mkdtemp(prefix="vilbert-cache-bench-"))
    server = LocalS3()
    results: dict[str, Any] = {"images": images, "shards": shards, "epochs": EPOCHS, "nodes": NODES, "runs": {}}
    try:
        inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=images, num_boxes=36, seed=0))
        build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]),
              BuildConfig(output=str(root / "shards"), prefix="cc", max_count=math.ceil(images / shards),
                          progress=False, rebuild=True))
        fs = s3fs.S3FileSystem(**server.storage_options())
        for p in sorted((root / "shards").iterdir()):
            fs.put_file(str(p), f"vilbert-bench/cc/{p.name}")
        manifest = load_source(str(root / "shards" / "manifest.json"))
        results.update(set_bytes=manifest.num_bytes, samples=manifest.num_samples,
                       shard_bytes=[s.bytes for s in manifest.shards])
        ctx = mp.get_context("spawn")
        for mode in ("no cache", "cache"):
            proxies = [CountingProxy(server.port) for _ in range(NODES)]
            out = ctx.Queue()
            gos = [ctx.Event() for _ in range(NODES)]
            procs = []
            for rank in range(NODES):
                opts = dict(server.storage_options(), endpoint_url=proxies[rank].endpoint)
                kw = dict(train="s3://vilbert-bench/cc/manifest.json", storage_options=opts, vocab=str(minilm_dir()),
                          max_regions=36, num_workers=1, shuffle_buffer=64, read_chunk_bytes="1MiB",
                          readahead_chunks=4)
                if mode == "cache":
                    kw.update(cache_dir=str(root / f"cache-node{rank}"), cache_bytes="10GB", cache_ranks_per_node=1)
                procs.append(ctx.Process(target=_node, args=(rank, kw, out, gos[rank])))
            for p in procs:
                p.start()
            rows, last = [], [(0, 0)] * NODES
            for _ in range(NODES * EPOCHS):
                rank, epoch, plan, keys, rep = out.get(timeout=600)
                wire = proxies[rank].snapshot()
                rows.append(dict(node=rank, epoch=epoch, plan=plan, samples=len(keys), keys=keys,
                                 client_bytes=rep["cache_download_bytes"] if mode == "cache" else rep["bytes"],
                                 client_gets=rep["cache_download_requests"] if mode == "cache" else rep["requests"],
                                 local_bytes=rep["bytes"] if mode == "cache" else 0,
                                 wire_bytes=wire[0] - last[rank][0], wire_gets=wire[1] - last[rank][1]))
                last[rank] = wire
                gos[rank].set()
            for p in procs:
                p.join(60)
                if p.exitcode != 0:
                    raise RuntimeError(f"{mode}: node process exited {p.exitcode}")
            for px in proxies:
                px.close()
            results["runs"][mode] = sorted(rows, key=lambda r: (r["node"], r["epoch"]))
    finally:
        server.close()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def tables(res: dict[str, Any]):
    from common import Table

    t = Table(title=f"Bytes from the bucket per node and epoch ({res['samples']} samples, {len(res['shard_bytes'])} "
                    f"shards, {res['set_bytes'] / 1e6:.1f} MB; {NODES} ranks as {NODES} nodes, {EPOCHS} epochs)",
              columns=["cache", "node", "epoch", "plan", "MB from bucket (client)", "GETs (client)",
                       "MB at the wire", "GETs at the wire", "MB from local copy", "samples"])
    for mode, rows in res["runs"].items():
        for r in rows:
            t.add(**{"cache": mode, "node": r["node"], "epoch": r["epoch"], "plan": r["plan"],
                     "MB from bucket (client)": r["client_bytes"] / 1e6, "GETs (client)": r["client_gets"],
                     "MB at the wire": r["wire_bytes"] / 1e6, "GETs at the wire": r["wire_gets"],
                     "MB from local copy": r["local_bytes"] / 1e6, "samples": r["samples"]})
    s = Table(title="Totals over the 3 epochs, both nodes", columns=["cache", "MB from bucket (client)", "GETs (client)",
                                                                     "MB at the wire", "GETs at the wire",
                                                                     "x the set size", "same samples each epoch per node"])
    for mode, rows in res["runs"].items():
        stable = all(r["keys"] == next(q["keys"] for q in rows if q["node"] == r["node"] and q["epoch"] == 0)
                     for r in rows)
        client = sum(r["client_bytes"] for r in rows)
        s.add(**{"cache": mode, "MB from bucket (client)": client / 1e6,
                 "GETs (client)": sum(r["client_gets"] for r in rows),
                 "MB at the wire": sum(r["wire_bytes"] for r in rows) / 1e6,
                 "GETs at the wire": sum(r["wire_gets"] for r in rows), "x the set size": client / res["set_bytes"],
                 "same samples each epoch per node": stable})
    s.notes = ["client: the loader's storage counters (epoch reports); wire: a counting TCP proxy per node "
               "(server->client bytes incl. HTTP headers, GET request lines); epoch 0 includes the manifest and "
               "caption-pool reads"]
    return [t, s]


def main() -> None:
    from common import machine, report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 samples instead of 192")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="keep the shards and caches here")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = run(96 if args.quick else 192, args.shards, args.workdir)
    report(tables(res), machine(), args.markdown, args.json)


if __name__ == "__main__":
    main()
