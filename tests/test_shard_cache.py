"""The node-local shard cache (data/cache.py) and the node-stable epoch plan, over a real S3
endpoint (moto's server on 127.0.0.1): each shard comes from the bucket once per node across
epochs, resume gives the same batches with the cache warm or cold, a corrupted cached copy is
refused (sha256) and downloaded again, racing processes download a shard once, eviction keeps
the bound and spares what is being read. Two ranks stand for two nodes (one rank per node)."""
from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from vilbert_ds.data.cache import CacheSpec, CacheStats, ShardCache, cached_bytes, entry_name
from vilbert_ds.data.cc_batches import build_pretrain_loader
from vilbert_ds.data.manifest import load_source

pytestmark = [pytest.mark.s3, pytest.mark.timeout(240)]

BUCKET = "vilbert-cache"
MB = 3  # micro-batch: 48 samples / (2 ranks x 3) = 8 batches per rank, each node's 24 samples


@pytest.fixture(scope="module")
def s3_shards(moto_s3, synthetic_shards):
    """The data fixtures' 4 shards of 12 samples uploaded to s3://BUCKET/cc."""
    import s3fs

    moto_s3.create_bucket(BUCKET)
    opts = moto_s3.storage_options()
    fs = s3fs.S3FileSystem(**opts)
    for p in sorted(synthetic_shards.out.iterdir()):
        fs.put_file(str(p), f"{BUCKET}/cc/{p.name}")
    return dict(url=f"s3://{BUCKET}/cc/manifest.json", opts=opts)


@pytest.fixture
def cached_config(data_config, s3_shards, tmp_path):
    def make(cache_dir: Path | str | None = "cache", **kw):
        base = dict(train=s3_shards["url"], storage_options=s3_shards["opts"], num_workers=0, shuffle_buffer=6,
                    cache_dir=str(tmp_path / cache_dir) if cache_dir else None, cache_bytes="64MB",
                    cache_ranks_per_node=1, retry_backoff_s=0.1)
        base.update(kw)
        return data_config(**base)
    return make


def _loaders(cfg, **kw):
    return [build_pretrain_loader(cfg, rank=r, world_size=2, micro_batch_size=MB, seed=3, **kw) for r in (0, 1)]


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [list(b.keys) for b in loader]


def test_each_node_downloads_its_shards_once_and_keeps_them(cached_config, synthetic_shards):
    """Two nodes (own cache dirs), 3 epochs: every shard downloaded once in epoch 0 by the node
    that keeps it, nothing from the bucket after; each node sees the same samples every epoch
    in a different order, and the two nodes together see every sample once per epoch."""
    loaders = [build_pretrain_loader(cached_config(f"node{r}"), rank=r, world_size=2, micro_batch_size=MB, seed=3)
               for r in (0, 1)]
    assert all(ld.plan == "node-stable: 2 nodes x 1 ranks" for ld in loaders)
    total = sum(s.bytes for s in load_source(str(synthetic_shards.manifest)).shards)
    keys = {}
    for epoch in range(3):
        downloaded = 0
        for r, ld in enumerate(loaders):
            keys[r, epoch] = _epoch(ld, epoch)
            assert len(keys[r, epoch]) == len(ld) == 8
            downloaded += ld.last_report["cache_download_bytes"]
            assert ld.last_report["cache_downloads"] == (2 if epoch == 0 else 0)
        assert downloaded == (total if epoch == 0 else 0)
        flat = [k for r in (0, 1) for b in keys[r, epoch] for k in b]
        assert sorted(flat) == sorted(set(flat)) and len(flat) == 48
    for r in (0, 1):
        assert {k for b in keys[r, 0] for k in b} == {k for b in keys[r, 2] for k in b}  # node-stable set
        assert keys[r, 0] != keys[r, 1]  # reshuffled within it
    assert {k for b in keys[0, 0] for k in b}.isdisjoint(k for b in keys[1, 0] for k in b)


def test_resume_with_warm_and_cold_cache_gives_the_same_batches(cached_config, tmp_path):
    cfg = cached_config("shared", num_workers=1)
    reference = [_epoch(ld, 1) for ld in _loaders(cfg)]
    for cache in ("shared", "cold"):  # "shared" is warm (the reference filled it)
        for r in (0, 1):
            first = build_pretrain_loader(cached_config("first" + cache, num_workers=1), rank=r, world_size=2,
                                          micro_batch_size=MB, seed=3)
            first.set_epoch(1)
            it = iter(first)
            seen = [list(next(it).keys) for _ in range(3)]
            state = json.loads(json.dumps(first.state_dict()))
            del it
            first.close()
            resumed = build_pretrain_loader(cached_config(cache, num_workers=1), rank=r, world_size=2,
                                            micro_batch_size=MB, seed=3)
            resumed.load_state_dict(state)
            resumed.set_epoch(1)
            assert seen + [list(b.keys) for b in resumed] == reference[r], (cache, r)
            resumed.close()
    assert cached_bytes(str(tmp_path / "cold")) > 0


def test_resume_across_plan_kinds_is_refused(cached_config):
    cached = _loaders(cached_config())[0]
    plain = build_pretrain_loader(cached_config(None), rank=0, world_size=2, micro_batch_size=MB, seed=3)
    assert plain.plan == "global"
    with pytest.raises(ValueError, match="plan='node-stable: 2 nodes x 1 ranks' but this run has 'global'"):
        plain.load_state_dict(cached.state_dict())


def test_share_over_the_bound_falls_back_to_the_global_plan(cached_config, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vilbert_ds.data.stream"):
        small = _loaders(cached_config(cache_bytes="1MB"))
    assert [ld.plan for ld in small] == ["global", "global"]
    assert any("over data.cache_bytes" in r.getMessage() for r in caplog.records)
    plain = _loaders(cached_config(None))
    assert _epoch(small[1], 0) == _epoch(plain[1], 0)  # today's plan, read from the bucket
    assert small[1].last_report["cache_downloads"] == 0 and cached_bytes(str(tmp_path / "cache")) == 0


def test_corrupted_cached_copy_is_refused_and_downloaded_again(cached_config, tmp_path, caplog):
    cfg = cached_config()
    reference = _epoch(_loaders(cfg)[0], 0)
    copies = sorted(p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tar")
    assert len(copies) == 2
    victim = copies[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="vilbert_ds.data.cache"):
        loader = _loaders(cfg)[0]
        assert _epoch(loader, 0) == reference
    assert loader.last_report["cache_refused"] == 1 and loader.last_report["cache_downloads"] == 1
    assert [r.getMessage() for r in caplog.records if "refused, downloading it again" in r.getMessage()]
    assert victim.read_bytes() != bytes(data)  # the copy in place now is the bucket's


def _race(spec, opts, shard, barrier, queue):
    from vilbert_ds.data.storage import forget_inherited_filesystems

    forget_inherited_filesystems()  # forked: never touch the parent's S3 session (as loader workers do)
    cache = ShardCache(spec, storage_options=opts, chunk_bytes=64 << 10, parallel=1)
    stats = CacheStats()
    barrier.wait()
    with cache.open(shard, stats) as path:
        queue.put((stats.downloads, stats.hits, os.path.getsize(path)))


def test_racing_processes_download_a_shard_once(s3_shards, tmp_path):
    shard = load_source(s3_shards["url"], s3_shards["opts"]).shards[0]
    spec = CacheSpec(str(tmp_path / "race"), 64 << 20)
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(5), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(spec, s3_shards["opts"], shard, barrier, queue)) for _ in range(4)]
    os.makedirs(spec.directory)
    for p in procs:  # started before the lock is taken: a forked child must not inherit it
        p.start()
    # the shard's lock held here while the 4 pass the barrier: they queue behind it, then race
    with open(os.path.join(spec.directory, entry_name(shard) + ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        barrier.wait()
        time.sleep(0.5)  # lets them reach the lock (were one late, it would find the copy: still one download)
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(r[0] for r in results) == 1  # one downloader; the others waited and found the copy
    assert sum(r[1] for r in results) == 3 and {r[2] for r in results} == {shard.bytes}


def test_eviction_keeps_the_bound_and_spares_open_copies(s3_shards, tmp_path):
    shards = load_source(s3_shards["url"], s3_shards["opts"]).shards
    size = max(s.bytes for s in shards)
    cache = ShardCache(CacheSpec(str(tmp_path / "lru"), 2 * size + 100), storage_options=s3_shards["opts"])
    with cache.open(shards[0]):
        with cache.open(shards[1]):
            pass
        with cache.open(shards[2]):  # over the bound: shards[1] (not held) goes, shards[0] is being read
            pass
        names = {p.name for p in (tmp_path / "lru").iterdir() if p.suffix == ".tar"}
        assert names == {entry_name(shards[0]), entry_name(shards[2])}
    assert cached_bytes(str(tmp_path / "lru")) <= 2 * size + 100
    assert cache.stats.evicted == 1 and cache.stats.downloads == 3


@pytest.mark.distributed
def test_two_rank_training_run_reads_each_shard_from_the_bucket_once(s3_shards, synthetic_shards, minilm_dir,
                                                                      tmp_path, monkeypatch):
    """`vilbert-ds pretrain` through the deepspeed launcher, 2 ranks on gloo standing for 2 nodes,
    3 epochs over the cached S3 set: the loaders' epoch reports show every shard downloaded
    once (epoch 0), none after; each rank trains on the same samples every epoch."""
    from fixtures.training import real_data_section, run_training, write_ds_config, write_train_config
    from vilbert_ds.trainer import read_sample_log

    reports = tmp_path / "reports"
    monkeypatch.setenv("VILBERT_DS_LOADER_REPORTS", str(reports))
    data = dict(real_data_section(synthetic_shards.manifest, minilm_dir), train=s3_shards["url"],
                storage_options=s3_shards["opts"], cache_dir=str(tmp_path / "cache"), cache_bytes="64MB",
                cache_ranks_per_node=1)
    # 3 epochs of 12 updates at micro-batch 2 on 2 ranks, and one more: an epoch's report is
    # written when its last batch has been taken, i.e. when the next epoch starts
    steps = 3 * 48 // (2 * 2) + 1
    cfg = write_train_config(tmp_path / "c.yaml", tmp_path / "run", data=data, model={"config": "tiny", "overrides": {}},
                             train={"total_steps": steps, "save_every": steps, "log_samples": True})
    ds = write_ds_config(tmp_path / "ds.json", stage=1, micro=2, accumulation=1)
    out = run_training(2, ["--config", str(cfg), "--deepspeed", str(ds)], entry=["-m", "vilbert_ds.pretrain"],
                       timeout=240)
    rows = [row for p in sorted(reports.glob("train-rank*.jsonl")) for line in p.read_text().splitlines()
            if (row := json.loads(line))["epoch"] < 3]
    assert sorted((r["rank"], r["epoch"]) for r in rows) == [(r, e) for r in (0, 1) for e in range(3)], out.stdout[-3000:]
    total = sum(s.bytes for s in load_source(str(synthetic_shards.manifest)).shards)
    assert sum(r["cache_download_bytes"] for r in rows if r["epoch"] == 0) == total
    assert [r["cache_downloads"] for r in rows if r["epoch"] > 0] == [0] * 4
    assert sum(r["cache_downloads"] for r in rows) == 4  # each of the 4 shards once, across 3 epochs
    samples = read_sample_log(tmp_path / "run")
    for rank in (0, 1):
        per_epoch = [{k for step in range(1 + 12 * e, 13 + 12 * e) for k in samples[rank][step]} for e in range(3)]
        assert per_epoch[0] == per_epoch[1] == per_epoch[2] and len(per_epoch[0]) == 24


def test_ranks_of_a_node_share_its_shards_and_reshuffle_them(cached_config):
    """4 ranks as 2 nodes of 2 (one cache each): a node's two ranks together see the same 24
    samples every epoch, split between them differently each epoch (uniform order: a permutation
    of the node's samples; shuffle windows split at shard granularity); equal batches per rank."""
    loaders = [build_pretrain_loader(cached_config(f"n{r // 2}", cache_ranks_per_node=None, shuffle_buffer=None),
                                     rank=r, world_size=4,
                                     micro_batch_size=MB, seed=3, local_world_size=2) for r in range(4)]
    assert {ld.plan for ld in loaders} == {"node-stable: 2 nodes x 2 ranks"}
    keys = {(r, e): {k for b in _epoch(loaders[r], e) for k in b} for r in range(4) for e in range(2)}
    assert all(len(loaders[r]) == 4 and len(keys[r, e]) == 12 for r in range(4) for e in range(2))
    for node in (0, 1):
        a, b = 2 * node, 2 * node + 1
        assert keys[a, 0] | keys[b, 0] == keys[a, 1] | keys[b, 1] and len(keys[a, 0] | keys[b, 0]) == 24
        assert keys[a, 0] != keys[a, 1]  # the node's samples are dealt to its ranks anew each epoch
    assert sum(ld.last_report["cache_downloads"] for ld in loaders) == 0  # epoch 1: all local


@pytest.mark.parametrize("bad,message", [
    (dict(cache_dir="/tmp/c"), "data.cache_bytes: set the cache's size bound"),
    (dict(cache_dir="s3://b/c", cache_bytes="1GB"), "data.cache_dir must be a local directory"),
    (dict(cache_dir="/tmp/c", cache_bytes="lots"), "data.cache_bytes: cannot parse byte size"),
    (dict(cache_ranks_per_node=0), "data.cache_ranks_per_node must be an integer >= 1"),
    (dict(cache_dir="/proc/version/cache", cache_bytes="1GB"), "data.cache_dir: /proc/version/cache is not a directory"),
])
def test_bad_cache_keys_are_refused_in_one_line(bad, message):
    from vilbert_ds.data.config import DataConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DataConfig(train="s3://b/m.json", **bad)
