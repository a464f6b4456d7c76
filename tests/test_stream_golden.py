"""Golden hashes of pretraining batches: the data pipeline's speed work must not change a single
bit of what it produces for a given (seed, epoch, key).

The hashes were computed with the pipeline as it was before the throughput changes (commit
"data: golden batch hashes"); every later change to reading, decoding, masking or collate must
reproduce them exactly. Each hash covers every tensor of every batch (dtype, shape, bytes) and
the sample keys, in delivery order.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from vilbert_ds.data.cc_batches import PretrainCollate, build_pretrain_loader
from vilbert_ds.data.sample import Sample

pytestmark = pytest.mark.timeout(180)


def batch_digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for f in dataclasses.fields(b):
            value = getattr(b, f.name)
            h.update(f.name.encode())
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(value.contiguous().numpy().tobytes())
            elif isinstance(value, list):
                h.update("\x00".join(map(str, value)).encode())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:24]


def _loader_digest(cfg, *, mb: int, seed: int, epochs=(0,)) -> str:
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=mb, seed=seed)
    batches = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        batches.extend(loader)
    return batch_digest(batches)


# (config overrides, micro-batch, seed, epochs) -> digest. 10 real regions per image in the
# fixture shards: max_regions 12 pads, 8 truncates. shuffle_buffer 5 (the fixture's) and 3 are
# the windows the golden run's shuffle_bytes 400KB and 300KB gave (76.8 KB per sample).
LOADER_CASES = {
    "obj0_kl_pad": (dict(num_workers=0, max_regions=12), 8, 11, (0, 1), "f18314103109eb1a939a964a"),
    "obj1_regression_truncate": (dict(num_workers=0, max_regions=8, objective=1, visual_target=1), 6, 3, (0,),
                                 "a8fe14993d98092084a4747f"),
    "obj2_two_workers": (dict(num_workers=2, max_regions=10, objective=2, shuffle_buffer=3), 4, 5, (2,),
                         "47093b60e403dd698ed485a8"),
    # the uniform order (task loaders): recorded when it was added, not by the golden run
    "obj0_uniform_two_workers": (dict(num_workers=2, max_regions=12, shuffle_buffer=None), 8, 11, (0, 1),
                                 "e66d742d26085191a8d8905f"),
}


@pytest.mark.parametrize("case", sorted(LOADER_CASES))
def test_loader_batches_are_bit_identical_to_the_golden_run(data_config, case):
    overrides, mb, seed, epochs, expected = LOADER_CASES[case]
    assert _loader_digest(data_config(**overrides), mb=mb, seed=seed, epochs=epochs) == expected


@pytest.mark.parametrize("workers", [1, 2])
def test_reused_worker_buffers_never_change_a_batch(data_config, workers):
    """Loader workers write the large batch tensors into shared-memory buffers that they reuse
    once the training process has dropped a batch (stream.BatchArena). A consumer that drops
    each batch at once (reuse on every slot) and one that keeps every batch (no reuse: fresh
    memory once the slots are taken) and one that keeps the last three must see the same bits."""
    cfg = data_config(num_workers=workers, max_regions=10, shuffle_buffer=3)

    def loader():
        return build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=2, seed=7)

    kept = list(loader())
    assert len(kept) > 2 * (loader().prefetch_factor + 4), "too few batches to cycle the buffer slots"
    held = batch_digest(kept)
    del kept
    assert batch_digest(iter(loader())) == held  # each batch hashed, then dropped

    window, digests = [], []
    for batch in loader():
        window.append(batch)
        if len(window) > 3:
            digests.append(batch_digest([window.pop(0)]))
    digests += [batch_digest([b]) for b in window]
    by_batch = [batch_digest([b]) for b in loader()]
    assert digests == by_batch


def _cc_sized_samples(count: int, seed: int) -> list[Sample]:
    """CC-like samples in memory: 2048-d non-negative float16 features of the detector's range,
    20-50 boxes (some padded, some truncated at 36), image sizes up to 800 px."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(20, 51))
        w, h = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        x1, y1 = rng.uniform(0, w * 0.7, n), rng.uniform(0, h * 0.7, n)
        boxes = np.stack([x1, y1, np.minimum(w - 1, x1 + rng.uniform(8, w * 0.5, n)),
                          np.minimum(h - 1, y1 + rng.uniform(8, h * 0.5, n))], 1).astype(np.float32)
        feats = (rng.exponential(0.6, (n, 2048)) * (rng.random((n, 2048)) < 0.7)).astype(np.float16)
        cls = rng.dirichlet(np.full(1601, 0.05), n).astype(np.float16)
        words = ["a", "red", "dog", "on", "the", "grass", "near", "two", "small", "houses", "with", "trees"]
        caption = " ".join(rng.choice(words, int(rng.integers(3, 40))))
        out.append(Sample(key=f"cc_{seed}_{i:04d}", meta=dict(image_w=w, image_h=h, num_boxes=n, caption=caption),
                          features=feats, boxes=boxes, cls_prob=cls, shard="mem"))
    return out


# (objective, visual_target, epoch) -> digest of three 16-sample batches at 36 regions
COLLATE_CASES = {
    (0, 0, 0): "d04a84f2708eadc15c6e9a7c",
    (1, 1, 4): "1b2c464277ebf04ceb283888",
    (2, 0, 1): "21b2919f2ee01e73efaa90de",
}


@pytest.mark.parametrize("objective,visual_target,epoch", sorted(COLLATE_CASES))
def test_collate_at_36_regions_is_bit_identical_to_the_golden_run(data_config, objective, visual_target, epoch):
    collate = PretrainCollate(data_config(max_regions=36, max_seq_length=36, objective=objective,
                                          visual_target=visual_target), seed=9, caption_pool_url=None, num_classes=1601)
    collate.pool = [f"caption number {i} about a dog and a house" for i in range(50)]
    collate.setup()
    samples = _cc_sized_samples(48, seed=objective)
    batches = [collate(samples[k:k + 16], epoch) for k in range(0, 48, 16)]
    assert batch_digest(batches) == COLLATE_CASES[(objective, visual_target, epoch)]
