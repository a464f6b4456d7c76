"""The shards are WebDataset tars: the `webdataset` package (a dependency for exactly this
compatibility) reads a vilbert-ds feature set and a task set and gets the same samples as
vilbert-ds's own reader: keys, members, decoded arrays and metadata."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds

from vilbert_ds.data.manifest import load_source
from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples

pytestmark = pytest.mark.timeout(120)


def _ours(manifest_url: str, feature_dim: int = 2048):
    """Every sample of the set in shard order, read by vilbert-ds (ranged reads + decode)."""
    m = load_source(manifest_url)
    opts = ReadOptions(storage_options={}, chunk_bytes=1 << 20, parallel=1, retries=0, backoff_s=0, on_error="fail",
                       feature_dim=m.feature_dim, num_classes=m.num_classes)
    out = []
    for shard in m.shards:
        got = read_samples(shard, list(range(shard.count)), opts, StreamStats(), set())
        out.extend(got[i] for i in range(shard.count))
    return m, out


def _theirs(m):
    ds = wds.WebDataset([s.url for s in m.shards], shardshuffle=False, empty_check=False).decode()
    return list(ds)


def test_webdataset_reads_the_same_feature_samples(synthetic_shards):
    m, ours = _ours(str(synthetic_shards.manifest))
    theirs = _theirs(m)
    assert [t["__key__"] for t in theirs] == [s.key for s in ours] and len(ours) == 48
    for s, t in zip(ours, theirs):
        assert set(t) - {"__key__", "__url__", "__local_path__"} == {"json", "features.npy", "boxes.npy", "cls_prob.npy"}
        assert t["json"] == s.meta and t["json"]["caption"] == s.caption
        for name, arr in (("features.npy", s.features), ("boxes.npy", s.boxes), ("cls_prob.npy", s.cls_prob)):
            assert t[name].dtype == arr.dtype and t[name].shape == arr.shape
            np.testing.assert_array_equal(t[name], arr)


def test_webdataset_reads_the_same_task_samples(synthetic_tasks):
    """Task shards add members (`task.json`, the second image of NLVR2 as `img1.*`)."""
    from vilbert_ds.tasks.registry import load_registry

    cfg = load_registry(synthetic_tasks)["nlvr2"]
    m, ours = _ours(f"{cfg.split_dir('dev')}/manifest.json")
    theirs = _theirs(m)
    assert [t["__key__"] for t in theirs] == [s.key for s in ours] and ours
    for s, t in zip(ours, theirs):
        assert t["json"] == s.meta and t["task.json"] == json.loads(bytes(s.extra["task.json"]))
        np.testing.assert_array_equal(t["features.npy"], s.features)
        np.testing.assert_array_equal(t["boxes.npy"], s.boxes)
        assert set(t) - {"__key__", "__url__", "__local_path__", "json", "features.npy", "boxes.npy"} == set(s.extra)
        for ext in ("img1.features.npy", "img1.boxes.npy"):
            ref = np.lib.format.read_array(io.BytesIO(bytes(s.extra[ext])))
            np.testing.assert_array_equal(t[ext], ref)
