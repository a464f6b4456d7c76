"""Streaming loader on local shards: batch contract, preprocessing as the original, equal batch
counts over ranks x workers, exact mid-epoch resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vilbert_ds.data.cc_batches import build_pretrain_loader, iou_matrix
from vilbert_ds.data.stream import WorkerRoundRobin, split_ranges

pytestmark = pytest.mark.timeout(120)


def _epoch(loader):
    return [list(b.keys) for b in loader]


def test_batch_fields_follow_the_original_layout(data_config, synthetic_shards):
    cfg = data_config(num_workers=0, max_regions=12)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=3)
    batch = next(iter(loader))
    B, L, R = 4, cfg.max_seq_length, cfg.max_regions
    assert batch.input_ids.shape == (B, L) and batch.input_ids.dtype == torch.int64
    assert batch.image_feat.shape == (B, R + 1, 2048) and batch.image_feat.dtype == torch.float16
    assert batch.image_target.shape == (B, R, 1601)
    assert batch.image_label.shape == (B, R)
    # 10 real regions + global; the last 2 of 12 are padding
    assert batch.image_mask[:, :11].eq(1).all() and batch.image_mask[:, 11:].eq(0).all()
    assert batch.image_label[:, 10:].eq(-1).all()
    assert torch.equal(batch.image_loc[:, 0], torch.tensor([[0, 0, 1, 1, 1.0]]).expand(B, 5))
    assert (batch.input_ids[:, 0] == 101).all()  # [CLS]
    for i in range(B):
        n = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, n - 1] == 102 and batch.input_ids[i, n:].eq(0).all()
        assert batch.masked_lm_labels[i, 0] == -1 and batch.masked_lm_labels[i, n - 1:].eq(-1).all()
    assert set(batch.is_next.tolist()) <= {0, 1}
    assert len(batch.keys) == B


def test_global_region_is_the_original_masked_mean(data_config):
    """Region 0 = sum of the features after masking / (regions outside the IoU>0.4 overlap set)."""
    from vilbert_ds.data.cc_batches import PretrainCollate
    from vilbert_ds.data.sample import Sample

    rng = np.random.default_rng(0)
    n = 36
    x1, y1 = rng.uniform(0, 300, n), rng.uniform(0, 200, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(20, 200, n), y1 + rng.uniform(20, 200, n)], 1).astype(np.float32)
    feats = rng.uniform(0, 2, (n, 2048)).astype(np.float16)
    samples = [Sample(key=f"img{i}", meta=dict(image_w=640, image_h=480, num_boxes=n, caption="a red dog"),
                      features=feats, boxes=boxes, cls_prob=np.full((n, 1601), 1 / 1601, np.float16)) for i in range(16)]
    collate = PretrainCollate(data_config(max_regions=36, objective=2), seed=0, caption_pool_url=None, num_classes=1601)
    batch = collate(samples, epoch=0)
    iou = iou_matrix(boxes)
    checked = 0
    for i in range(16):
        chosen = batch.image_label[i].numpy() == 1
        masked = batch.image_feat[i, 1:].float().numpy()
        # masked regions are zeroed (90%) or kept (10%); others untouched
        assert np.array_equal(masked[~chosen], feats[~chosen].astype(np.float32))
        overlap = (iou[chosen] > 0.4).any(0) if chosen.any() else np.zeros(n, bool)
        expected = masked.sum(0) / max(1, n - overlap.sum())
        np.testing.assert_allclose(batch.image_feat[i, 0].float().numpy(), expected, rtol=2e-3, atol=2e-3)
        checked += int(chosen.any())
    assert checked > 0
    loc = batch.image_loc[0, 1:].numpy()
    np.testing.assert_allclose(loc[:, 0], boxes[:, 0] / 640, rtol=1e-6)
    np.testing.assert_allclose(loc[:, 4], (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]) / (640 * 480), rtol=1e-5)


def test_masking_statistics_and_negatives(data_config):
    loader = build_pretrain_loader(data_config(num_workers=0), rank=0, world_size=1, micro_batch_size=8, seed=0)
    tok_targets = tok_total = reg_targets = reg_total = negatives = n = 0
    zeroed = 0
    for b in loader:
        real = (b.attention_mask == 1).sum().item() - 2 * b.size
        tok_total += real
        tok_targets += (b.masked_lm_labels != -1).sum().item()
        lab = b.image_label == 1
        reg_targets += lab.sum().item()
        reg_total += 10 * b.size
        zeroed += (b.image_feat[:, 1:][lab].abs().sum(-1) == 0).sum().item()
        negatives += b.is_next.sum().item()
        n += b.size
    assert 0.05 < tok_targets / tok_total < 0.3
    assert 0.07 < reg_targets / reg_total < 0.25
    assert zeroed / max(reg_targets, 1) > 0.7  # 90% of masked regions are zeroed
    assert 0.25 < negatives / n < 0.75


def test_objectives_1_and_2(data_config):
    b1 = next(iter(build_pretrain_loader(data_config(num_workers=0, objective=1), rank=0, world_size=1,
                                         micro_batch_size=48, seed=0)))
    neg = b1.is_next == 1
    assert neg.any() and (~neg).any()
    assert b1.masked_lm_labels[neg].eq(-1).all() and b1.image_label[neg].eq(-1).all()
    assert (b1.masked_lm_labels[~neg] != -1).any()
    b2 = next(iter(build_pretrain_loader(data_config(num_workers=0, objective=2), rank=0, world_size=1,
                                         micro_batch_size=48, seed=0)))
    assert b2.is_next.eq(-1).all()


def test_sample_randomness_independent_of_worker_layout(data_config):
    """Masking/negatives depend on (seed, epoch, key) only: same per-key tensors with 0 or 2 workers."""
    def by_key(workers):
        out = {}
        for b in build_pretrain_loader(data_config(num_workers=workers), rank=0, world_size=1, micro_batch_size=4, seed=5):
            for i, k in enumerate(b.keys):
                out[k] = (b.input_ids[i].clone(), b.image_label[i].clone(), int(b.is_next[i]))
        return out
    a, c = by_key(0), by_key(2)
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k][0], c[k][0]) and torch.equal(a[k][1], c[k][1]) and a[k][2] == c[k][2]


def test_equal_batch_counts_3_ranks_x_2_workers(data_config, synthetic_shards):
    """4 shards, 3 ranks x 2 workers: the same len() and the same number of delivered batches on
    every rank, no sample on two ranks, and epochs reshuffle."""
    cfg = data_config(num_workers=2)
    per_rank = []
    for rank in range(3):
        loader = build_pretrain_loader(cfg, rank=rank, world_size=3, micro_batch_size=5, seed=1)
        assert len(loader) == 48 // (3 * 5)
        batches = _epoch(loader)
        assert len(batches) == len(loader) and all(len(b) == 5 for b in batches)
        per_rank.append([k for b in batches for k in b])
    flat = [k for r in per_rank for k in r]
    assert len(flat) == len(set(flat)) == 3 * 3 * 5
    loader = build_pretrain_loader(cfg, rank=0, world_size=3, micro_batch_size=5, seed=1)
    loader.set_epoch(1)
    assert [k for b in _epoch(loader) for k in b] != per_rank[0]


@pytest.mark.parametrize("workers,cut", [(2, 3), (0, 5), (2, 1)])
def test_resume_mid_epoch_continues_exactly(data_config, workers, cut):
    cfg = data_config(num_workers=workers)
    full = _epoch(build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=7))
    assert len(full) == 12
    first = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=7)
    seen = []
    it = iter(first)
    for _ in range(cut):
        seen.append(list(next(it).keys))
    state = first.state_dict()
    del it
    assert state["consumed"] == cut and sum(b - a for s in state["slots"] for a, b in s) == 12 - cut
    resumed = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # same epoch: keeps the position
    rest = _epoch(resumed)
    assert seen + rest == full  # same batches, same order, nothing repeated or skipped
    assert resumed.remaining() == 0 and _epoch(resumed) == []


def test_resume_with_another_worker_count_keeps_the_sample_set(data_config):
    cfg2 = data_config(num_workers=2)
    first = build_pretrain_loader(cfg2, rank=0, world_size=1, micro_batch_size=4, seed=2)
    first.set_epoch(1)
    it = iter(first)
    seen = [k for _ in range(5) for k in next(it).keys]
    state = first.state_dict()
    del it
    resumed = build_pretrain_loader(data_config(num_workers=1), rank=0, world_size=1, micro_batch_size=4, seed=2)
    resumed.load_state_dict(state)
    rest = [k for b in resumed for k in b.keys]
    assert len(seen) + len(rest) == 48 and set(seen) | set(rest) == {k for b in _epoch(
        _at_epoch(build_pretrain_loader(cfg2, rank=0, world_size=1, micro_batch_size=4, seed=2), 1)) for k in b}
    assert not set(seen) & set(rest)


def _at_epoch(loader, epoch):
    loader.set_epoch(epoch)
    return loader


def test_state_mismatch_is_refused(data_config):
    a = build_pretrain_loader(data_config(), rank=0, world_size=2, micro_batch_size=4, seed=1)
    b = build_pretrain_loader(data_config(), rank=0, world_size=3, micro_batch_size=4, seed=1)
    with pytest.raises(ValueError, match="world_size"):
        b.load_state_dict(a.state_dict())


def test_round_robin_bookkeeping():
    blocks = split_ranges([(0, 10)], 3)
    assert blocks == [[(0, 4)], [(4, 7)], [(7, 10)]]
    rr = WorkerRoundRobin(blocks)
    order = [rr.take() for _ in range(10)]
    assert order == [0, 4, 7, 1, 5, 8, 2, 6, 9, 3]
    assert rr.remaining() == 0


def test_iou_matches_the_original_convention():
    boxes = np.array([[0, 0, 9, 9], [5, 5, 14, 14], [100, 100, 109, 109]], dtype=np.float32)
    m = iou_matrix(boxes)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 2] == 0
    assert m[0, 1] == pytest.approx(25 / (100 + 100 - 25))


@pytest.fixture(scope="module")
def second_set(tmp_path_factory):
    from fixtures.data import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("syn2"), images=24, boxes=10, max_count=6, prefix="b", seed=77)


def test_weighted_sources_and_resampling(data_config, synthetic_shards, second_set):
    a_keys = {k for s in json.loads(synthetic_shards.manifest.read_text())["shards"]
              for k in json.loads((synthetic_shards.out / s["name"].replace(".tar", ".stats.json")).read_text())["keys"]}
    train = [{"url": str(synthetic_shards.manifest), "weight": 1.0}, {"url": str(second_set.manifest), "weight": 3.0}]
    cfg = data_config(train=train, epoch_samples=240, num_workers=2)
    counts = []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, rank=rank, world_size=2, micro_batch_size=8, seed=3)
        assert len(loader) == 240 // 16
        keys = [k for b in loader for k in b.keys]
        assert len(keys) == len(loader) * 8
        counts.append(sum(k not in a_keys for k in keys) / len(keys))
    share_b = sum(counts) / 2
    assert 0.55 < share_b < 0.95  # weight 3:1 -> ~75% of the samples from the second source
    res = build_pretrain_loader(data_config(resampled=True, epoch_samples=96, num_workers=0), rank=0, world_size=1,
                                micro_batch_size=8, seed=1)
    keys = [k for b in res for k in b.keys]
    assert len(keys) == 96 and len(set(keys)) < 96  # drawn with replacement: repeats within the epoch


def test_brace_pattern_and_file_urls(data_config, synthetic_shards):
    pattern = f"file://{synthetic_shards.out}/cc-{{000000..000003}}.tar"
    by_pattern = build_pretrain_loader(data_config(train=pattern, num_workers=0), rank=0, world_size=1,
                                       micro_batch_size=6, seed=2)
    by_manifest = build_pretrain_loader(data_config(train=f"file://{synthetic_shards.manifest}", num_workers=0),
                                        rank=0, world_size=1, micro_batch_size=6, seed=2)
    assert len(by_pattern) == len(by_manifest) == 8
    assert [b.keys for b in by_pattern] == [b.keys for b in by_manifest]


def _shard_order(synthetic_shards) -> list[str]:
    m = json.loads(synthetic_shards.manifest.read_text())
    return [k for s in m["shards"] for k in
            json.loads((synthetic_shards.out / s["name"].replace(".tar", ".stats.json")).read_text())["keys"]]


def test_shuffle_window_is_counted_in_samples_over_ranks(data_config, synthetic_shards):
    """shuffle_buffer is the original's cache: 5000 // world_size samples per rank by default;
    each window of the rank's order is a permutation of a contiguous run of the epoch plan."""
    assert build_pretrain_loader(data_config(shuffle_buffer=5000), rank=0, world_size=8, micro_batch_size=2,
                                 seed=0).window == 625
    loader = build_pretrain_loader(data_config(shuffle_buffer=12, num_workers=0), rank=0, world_size=2,
                                   micro_batch_size=2, seed=0)
    assert loader.window == 6 and loader.order == "windows of 6"
    plan_order = [k for b in build_pretrain_loader(data_config(shuffle=False, num_workers=0), rank=0, world_size=1,
                                                   micro_batch_size=2, seed=0) for k in b.keys]
    assert plan_order == _shard_order(synthetic_shards)  # shuffle off: shard order, sample order
    epoch0 = [k for b in loader for k in b.keys]
    assert len(epoch0) == 24 and epoch0 != sorted(epoch0)


def test_uniform_order_ignores_how_shards_group_samples(data_config, synthetic_shards):
    """shuffle_buffer=None: one permutation of the whole epoch, sliced by rank: the same batches
    for any worker count (workers deliver them round-robin), every sample once over the ranks, a
    new order each epoch; with 4 shards of 12 a batch of 6 is spread over the shards as a uniform
    draw is, not taken from one window."""
    cfg = data_config(shuffle_buffer=None)
    by_rank = [[list(b.keys) for b in build_pretrain_loader(cfg, rank=r, world_size=2, micro_batch_size=6, seed=4)]
               for r in range(2)]
    assert sorted(by_rank[0]) == sorted(list(b.keys) for b in build_pretrain_loader(
        data_config(shuffle_buffer=None, num_workers=0), rank=0, world_size=2, micro_batch_size=6, seed=4))
    keys = [k for rank in by_rank for b in rank for k in b]
    assert sorted(keys) == sorted(_shard_order(synthetic_shards))
    shard_of = {k: i // 12 for i, k in enumerate(_shard_order(synthetic_shards))}
    spread = np.mean([len({shard_of[k] for k in b}) for rank in by_rank for b in rank])
    windowed = [list(b.keys) for b in build_pretrain_loader(data_config(shuffle_buffer=6, num_workers=0), rank=0,
                                                            world_size=1, micro_batch_size=6, seed=4)]
    assert np.mean([len({shard_of[k] for k in b}) for b in windowed]) <= 2.0  # a window covers 1-2 shards
    assert spread > 2.8  # uniform: 4 * (1 - C(36,6)/C(48,6)) = 3.30 shards per batch expected
    loader = build_pretrain_loader(cfg, rank=0, world_size=2, micro_batch_size=6, seed=4)
    loader.set_epoch(1)
    assert [list(b.keys) for b in loader] != by_rank[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_uniform_order_resumes_mid_epoch_exactly(data_config, workers):
    cfg = data_config(shuffle_buffer=None, num_workers=workers)
    full = _epoch(build_pretrain_loader(cfg, rank=1, world_size=2, micro_batch_size=3, seed=9))
    first = build_pretrain_loader(cfg, rank=1, world_size=2, micro_batch_size=3, seed=9)
    it = iter(first)
    seen = [list(next(it).keys) for _ in range(3)]
    state = first.state_dict()
    del it
    assert state["order"] == "uniform"
    resumed = build_pretrain_loader(cfg, rank=1, world_size=2, micro_batch_size=3, seed=9)
    resumed.load_state_dict(state)
    assert seen + _epoch(resumed) == full
    windows = build_pretrain_loader(data_config(num_workers=workers), rank=1, world_size=2, micro_batch_size=3, seed=9)
    with pytest.raises(ValueError, match="order"):
        windows.load_state_dict(state)


def test_workers_live_across_epochs_and_an_abandoned_epoch_resumes_in_place(data_config):
    """One worker process per worker slot for the loader's life (no fork per epoch): the same
    pids report every epoch. An iteration left mid-epoch, then the position restored on the same
    loader, continues exactly: the live workers get the new batch ranges."""
    cfg = data_config(num_workers=2)
    reference = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=3)
    epochs = []
    pids = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        epochs.append(_epoch(reference))
        pids.append(set(reference.last_report["workers"]))
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    assert all(c > 0 for c in reference.last_report["workers"].values()) and reference.last_report["committed"] > 0

    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=3)
    loader.set_epoch(1)
    it = iter(loader)
    head = [list(next(it).keys) for _ in range(5)]
    state = loader.state_dict()
    del it  # the workers still hold prefetched batches of the abandoned iteration
    loader.set_epoch(2)
    assert _epoch(loader) == epochs[2]
    workers = set(loader.last_report["workers"])
    loader.load_state_dict(state)
    assert head + _epoch(loader) == epochs[1]
    assert set(loader.last_report["workers"]) == workers


def test_config_never_shows_credentials():
    from vilbert_ds.data.config import DataConfig

    cfg = DataConfig(train="s3://b/m.json", vocab="v", storage_options={
        "key": "AKIA123", "secret": "sEcReT", "client_kwargs": {"aws_session_token": "T0K3NV4L"}, "endpoint_url": "http://h:1"})
    text = repr(cfg) + json.dumps(cfg.to_dict())
    assert "sEcReT" not in text and "AKIA123" not in text and "T0K3NV4L" not in text and "http://h:1" in text
    assert cfg.to_dict(redact_secrets=False)["storage_options"]["secret"] == "sEcReT"
    assert DataConfig(train="x", shuffle_buffer=None).shuffle_buffer is None
    for bad in (0, True, "64MB", 2.5):
        with pytest.raises(ValueError, match="data.shuffle_buffer"):
            DataConfig(train="x", shuffle_buffer=bad)
    with pytest.raises(ValueError, match="data.on_error"):
        DataConfig(train="x", on_error="ignore")


def test_a_process_that_exits_with_its_loader_open_ends_its_workers(synthetic_shards, minilm_dir, tmp_path):
    """A run that stops mid-epoch exits with a loader's persistent workers alive. Python's
    multiprocessing ends daemonic workers with SIGTERM at exit and waits for them; workers that
    ignored SIGTERM (they must, while the rank runs: a scheduler's SIGTERM reaches them too) kept
    the process waiting forever. The exit must come, and every worker must be gone."""
    import os
    import subprocess
    import sys

    code = (
        "import os\n"
        "from vilbert_ds.data.config import DataConfig\n"
        "from vilbert_ds.data.cc_batches import build_pretrain_loader\n"
        f"cfg = DataConfig(train={str(synthetic_shards.manifest)!r}, vocab={str(minilm_dir)!r}, num_workers=2,\n"
        "                 max_regions=10, read_chunk_bytes='256KiB')\n"
        "loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)\n"
        "next(iter(loader))\n"
        "pid = os.getpid()\n"
        "print(open(f'/proc/{pid}/task/{pid}/children').read(), flush=True)  # the forked workers\n"
    )
    # a hang is what this test catches: the timeout only ends it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    workers = [int(p) for p in out.stdout.split()]
    assert len(workers) == 2, out.stdout  # the loader's two workers, alive when the process began to exit
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its process"
