"""One test per input format, each from data the synthetic generator wrote in that format; and
`verify` naming shard and key for each kind of damage."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vilbert_ds.cli import main as cli
from vilbert_ds.data.formats import InputError, open_input
from vilbert_ds.data.manifest import load_source
from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples
from vilbert_ds.data.synthetic import WRITERS, SyntheticSpec, SyntheticWorld
from vilbert_ds.data.verify import verify_manifest

pytestmark = pytest.mark.timeout(120)

SPEC = SyntheticSpec(num_images=9, num_boxes=5, min_boxes=3, seed=11)


def _read_all(manifest_path):
    m = load_source(str(manifest_path))
    opts = ReadOptions(storage_options={}, chunk_bytes=1 << 16, parallel=2, retries=0, backoff_s=0, on_error="fail",
                       feature_dim=m.feature_dim, num_classes=m.num_classes)
    out = {}
    for shard in m.shards:
        out.update({s.meta["image_id"]: s for s in read_samples(shard, list(range(shard.count)), opts, StreamStats(), set()).values()})
    return m, out


def _expected():
    world = SyntheticWorld(SPEC)
    return {r.image_id: r for r, _ in world.images()}


@pytest.mark.parametrize("fmt,captions_key,extra", [
    ("tsv", "captions_cc", []),
    ("cc-lmdb", None, []),  # captions inside the datapoints; the pool is built from them
    ("lmdb-pickle", "captions_json", ["--trust-pickle"]),
    ("npz", "captions_json", []),
])
def test_each_input_format_builds_the_same_samples(tmp_path, fmt, captions_key, extra):
    inputs = WRITERS[fmt](str(tmp_path / "in"), SPEC)
    out = tmp_path / "out"
    args = ["shards", "build", "--format", fmt, "--input", *inputs["features"], "--output", str(out),
            "--max-count", "4", "--no-progress", *extra]
    if captions_key:
        args += ["--captions", inputs[captions_key]]
    assert cli(args) == 0
    m, samples = _read_all(out / "manifest.json")
    expected = _expected()
    assert m.num_samples == 9 and len(m.shards) == 3 and set(samples) == set(expected)
    for image_id, s in samples.items():
        r = expected[image_id]
        assert s.caption == r.caption
        assert s.meta["image_w"] == r.image_w and s.meta["num_boxes"] == r.num_boxes
        np.testing.assert_array_equal(s.features, r.features.astype(np.float16))
        np.testing.assert_array_equal(s.boxes, r.boxes)
        if fmt == "lmdb-pickle":  # the downstream format has no detector distribution
            assert s.cls_prob is None and m.num_classes is None
        else:
            np.testing.assert_array_equal(s.cls_prob, r.cls_prob.astype(np.float16))
    pool = json.loads((out / "captions.json").read_text())
    assert sorted(pool) == sorted(r.caption for r in expected.values())
    assert verify_manifest(str(out / "manifest.json")).ok


def test_pickle_lmdb_needs_the_trust_flag(tmp_path, capsys):
    inputs = WRITERS["lmdb-pickle"](str(tmp_path / "in"), SPEC)
    with pytest.raises(InputError, match="arbitrary code"):
        open_input("lmdb-pickle", inputs["features"])
    rc = cli(["shards", "build", "--format", "lmdb-pickle", "--input", *inputs["features"], "--captions",
              inputs["captions_json"], "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _corrupt_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_names_shard_and_key(synthetic_shards, tmp_path, capsys):
    good = synthetic_shards.out
    assert cli(["shards", "verify", str(good / "manifest.json")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _corrupt_copy(good, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    # 1) flip bytes inside a feature member of shard 1, sample 2 -> sha256 + (maybe) NaN/shape
    s1 = m["shards"][1]
    stats1 = json.loads((bad / "cc-000001.stats.json").read_text())
    key = stats1["keys"][2]
    tar1 = bytearray((bad / s1["name"]).read_bytes())
    pos = s1["offsets"][2] + 512 + 512 + 512 + 128  # inside K.features.npy payload
    tar1[pos:pos + 8] = np.array([np.nan] * 4, dtype=np.float16).tobytes()
    (bad / s1["name"]).write_bytes(bytes(tar1))
    # 2) truncate shard 3
    tar3 = (bad / m["shards"][3]["name"]).read_bytes()
    (bad / m["shards"][3]["name"]).write_bytes(tar3[: len(tar3) // 2 + 100])
    # 3) shard 0 disappears
    (bad / m["shards"][0]["name"]).unlink()
    rc = cli(["shards", "verify", str(bad / "manifest.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"cc-000001.tar key {key}: features.npy contains NaN/Inf" in out
    assert "cc-000001.tar: sha256 differs" in out
    assert "cc-000003.tar" in out and "truncated" in out
    assert "cc-000000.tar: missing" in out
    assert "FAILED (3 bad shard(s)" in out
