"""Shard building on local disk: layout, manifest, determinism, limits, resume, SLURM-style slices."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from vilbert_ds.cli import main as cli
from vilbert_ds.data.formats import Captions, TsvInput
from vilbert_ds.data.synthetic import SyntheticSpec, SyntheticWorld, write_tsv
from vilbert_ds.data.writer import BuildConfig, build

pytestmark = pytest.mark.timeout(120)


def _tree(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_layout_and_manifest(synthetic_shards):
    m = json.loads(synthetic_shards.manifest.read_text())
    assert m["format"] == "vilbert-ds-shards" and m["num_samples"] == 48 and m["num_shards"] == 4
    assert m["feature_dim"] == 2048 and m["num_classes"] == 1601 and m["caption_pool"] == "captions.json"
    assert m["regions"] == {"min": 10, "max": 10, "mean": 10.0}
    entry = m["shards"][0]
    assert entry["name"] == "cc-000000.tar" and entry["count"] == 12 and len(entry["offsets"]) == 13
    tar_path = synthetic_shards.out / "cc-000000.tar"
    assert tar_path.stat().st_size == entry["bytes"]
    with tarfile.open(tar_path) as tf:
        names = tf.getnames()
        key = names[0].split(".")[0]
        assert names[:4] == [f"{key}.json", f"{key}.features.npy", f"{key}.boxes.npy", f"{key}.cls_prob.npy"]
        meta = json.loads(tf.extractfile(names[0]).read())
        feats = np.load(io.BytesIO(tf.extractfile(names[1]).read()))
        boxes = np.load(io.BytesIO(tf.extractfile(names[2]).read()))
        cls = np.load(io.BytesIO(tf.extractfile(names[3]).read()))
        # per-sample offsets point at each sample's first header
        starts = [tf.getmember(n).offset for n in names if n.endswith(".json")]
    assert starts == entry["offsets"][:-1]
    assert feats.dtype == np.float16 and feats.shape == (10, 2048)
    assert boxes.dtype == np.float32 and boxes.shape == (10, 4)
    assert cls.dtype == np.float16 and cls.shape == (10, 1601)
    assert set(meta) >= {"image_id", "caption", "image_w", "image_h", "num_boxes"} and meta["num_boxes"] == 10
    stats = json.loads((synthetic_shards.out / "cc-000000.stats.json").read_text())
    assert stats["keys"][0] == key and stats["sha256"] == entry["sha256"]
    pool = json.loads((synthetic_shards.out / "captions.json").read_text())
    assert len(pool) == 48 and meta["caption"] in pool


def test_synthetic_data_is_learnable():
    """Captions name the classes whose prototypes the regions carry; cls_prob peaks on them."""
    spec = SyntheticSpec(num_images=6, num_boxes=12, num_classes=5, seed=3)
    world = SyntheticWorld(spec)
    for record, _ in world.images():
        present = [c for c, name in enumerate(world.names) if name in record.caption]
        assert present
        nearest = np.argmin(((record.features[:, None] - world.prototypes[None]) ** 2).sum(-1), axis=1)
        assert set(nearest.tolist()) == set(present)
        peaks = record.cls_prob.argmax(1)
        assert set(peaks.tolist()) == {int(world.det_class[c]) for c in present}
        np.testing.assert_allclose(record.cls_prob.sum(1), 1.0, rtol=1e-5)


def test_build_is_deterministic_across_worker_counts_and_cli(tmp_path):
    inputs = write_tsv(str(tmp_path / "in"), SyntheticSpec(num_images=20, num_boxes=4, seed=1), files=2)
    build(TsvInput(inputs["features"]), Captions.load(inputs["captions_json"]),
          BuildConfig(output=str(tmp_path / "a"), max_count=6, workers=1, progress=False))
    rc = cli(["shards", "build", "--format", "tsv", "--input", *inputs["features"], "--captions", inputs["captions_json"],
              "--output", str(tmp_path / "b"), "--max-count", "6", "--workers", "2", "--no-progress"])
    assert rc == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and len([n for n in a if n.endswith(".tar")]) == 4
    for name in a:
        if name != "manifest.json":  # the manifest records the (equal) build arguments
            assert a[name] == b[name], name
    assert json.loads(a["manifest.json"])["shards"] == json.loads(b["manifest.json"])["shards"]


def test_size_limit_and_resume_without_rewrites(tmp_path):
    inputs = write_tsv(str(tmp_path / "in"), SyntheticSpec(num_images=30, num_boxes=4, seed=2))
    out = tmp_path / "out"
    cfg = BuildConfig(output=str(out), max_count=1000, max_bytes="150KB", progress=False)
    s1 = build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]), cfg)
    tars = sorted(out.glob("*.tar"))
    assert s1.shards_built == len(tars) > 1
    assert all(t.stat().st_size <= 150_000 for t in tars)
    before = {t.name: (t.stat().st_mtime_ns, t.read_bytes()) for t in tars}
    # simulate an interrupted build: one shard lost its stats (tar incomplete), one vanished
    (out / "shard-000001.stats.json").unlink()
    (out / "shard-000002.tar").unlink()
    s2 = build(TsvInput(inputs["features"]), Captions.load(inputs["captions_cc"]), cfg)
    assert s2.shards_built == 2 and s2.shards_skipped == len(tars) - 2
    for t in sorted(out.glob("*.tar")):
        assert t.read_bytes() == before[t.name][1]
        if t.name not in ("shard-000001.tar", "shard-000002.tar"):
            assert t.stat().st_mtime_ns == before[t.name][0]  # finished shards not rewritten
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 30 and len({k for s in m["shards"] for k in [s["name"]]}) == len(tars)


def test_slices_build_disjoint_parts_and_the_last_writes_the_manifest(tmp_path):
    inputs = write_tsv(str(tmp_path / "in"), SyntheticSpec(num_images=14, num_boxes=3, seed=4))
    out = tmp_path / "out"
    args = ["shards", "build", "--format", "tsv", "--input", *inputs["features"], "--captions",
            inputs["captions_json"], "--output", str(out), "--max-count", "4", "--num-slices", "2", "--no-progress"]
    assert cli(args + ["--slice-index", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    assert not (out / "manifest.json").exists()
    assert cli(args + ["--slice-index", "0"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == [f"shard-00000{i}.tar" for i in range(4)] and m["num_samples"] == 14


def test_missing_caption_policy(tmp_path):
    inputs = write_tsv(str(tmp_path / "in"), SyntheticSpec(num_images=5, num_boxes=2, seed=5))
    caps = json.loads(open(inputs["captions_json"]).read())
    dropped_id = sorted(caps)[0]
    del caps[dropped_id]
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    with pytest.raises(ValueError, match=rf"features.tsv.0:\d+ \(image_id {dropped_id}\): no caption"):
        build(TsvInput(inputs["features"]), Captions.load(str(tmp_path / "caps.json")),
              BuildConfig(output=str(tmp_path / "o1"), progress=False))
    s = build(TsvInput(inputs["features"]), Captions.load(str(tmp_path / "caps.json")),
              BuildConfig(output=str(tmp_path / "o2"), missing_caption="skip", progress=False))
    assert s.records_dropped == 1 and s.samples == 4
