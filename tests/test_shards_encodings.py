"""Compact sample encodings (data/encoding.py): 8-bit features and top-k cls_prob, built with
`shards build --feature-encoding/--cls-prob-encoding`, read back through the normal reader into
the float16 arrays, each within its stated error against float16 shards of the same input."""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vilbert_ds.cli import main as cli
from vilbert_ds.data.encoding import E4M3_TABLE, Encoding
from vilbert_ds.data.manifest import Manifest, ManifestError, load_source
from vilbert_ds.data.sample import Sample, SampleError
from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples
from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv

pytestmark = pytest.mark.timeout(120)

ENCODINGS = {"float16": ("float16", "float16"), "int8": ("int8", "topk:16"), "e4m3": ("e4m3", "topk:4")}


def _build(inputs: dict, out: Path, features: str, cls_prob: str, *extra: str) -> int:
    return cli(["shards", "build", "--format", "tsv", "--input", *inputs["features"], "--captions",
                inputs["captions_cc"], "--output", str(out), "--prefix", "cc", "--max-count", "8", "--quiet",
                "--feature-encoding", features, "--cls-prob-encoding", cls_prob, *extra])


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The same 16 synthetic images (10 regions, varying) as float16 and two compact shard sets."""
    root = tmp_path_factory.mktemp("enc")
    inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=16, num_boxes=10, min_boxes=3, seed=5))
    out = {}
    for name, (features, cls_prob) in ENCODINGS.items():
        assert _build(inputs, root / name, features, cls_prob) == 0
        out[name] = root / name
    out["inputs"] = inputs
    return out


def _read(shard_dir: Path, on_error: str = "fail") -> dict:
    """key -> Sample, through the stream's reader with the manifest's read options (with
    on_error skip, a corrupt sample is counted and left out)."""
    m = load_source(str(shard_dir / "manifest.json"))
    opts = ReadOptions(storage_options={}, chunk_bytes=1 << 16, parallel=1, retries=0, backoff_s=0, on_error=on_error,
                       feature_dim=m.feature_dim, num_classes=m.num_classes)
    got = {}
    for shard in m.shards:
        for s in read_samples(shard, list(range(shard.count)), opts, StreamStats(), set()).values():
            if isinstance(s, Sample):
                got[s.key] = s
    return got


def test_manifest_and_stats_record_the_encoding(sets):
    for name, (features, cls_prob) in ENCODINGS.items():
        m = json.loads((sets[name] / "manifest.json").read_text())
        assert m["encoding"] == {"features": features, "cls_prob": cls_prob}
        assert json.loads((sets[name] / "cc-000000.stats.json").read_text())["encoding"] == m["encoding"]
        assert load_source(str(sets[name] / "cc-{000000..000001}.tar")).encoding == Encoding.parse(features, cls_prob)
    # a manifest written before encodings existed has no field: float16 throughout
    old = json.loads((sets["float16"] / "manifest.json").read_text())
    del old["encoding"]
    assert Manifest.from_json(json.dumps(old), str(sets["float16"] / "manifest.json")).encoding == Encoding()
    with tarfile.open(sets["int8"] / "cc-000000.tar") as tf:
        exts = sorted({n.split(".", 1)[1] for n in tf.getnames()})
    assert exts == ["boxes.npy", "cls_prob_topk_classes.npy", "cls_prob_topk_values.npy", "features_int8.npy",
                    "features_scale.npy", "json"]
    full = sum(p.stat().st_size for p in sets["float16"].glob("*.tar"))
    compact = sum(p.stat().st_size for p in sets["int8"].glob("*.tar"))
    assert compact < 0.4 * full  # 8-bit features (half) and 16 of 1601 classes


def test_compact_sets_read_back_within_their_stated_error(sets):
    ref = _read(sets["float16"])
    for name in ("int8", "e4m3"):
        got = _read(sets[name])
        assert sorted(got) == sorted(ref)
        topk = Encoding.parse(*ENCODINGS[name]).cls_prob_topk
        for key, r in ref.items():
            s = got[key]
            assert s.meta == r.meta and np.array_equal(s.boxes, r.boxes) and s.extra == r.extra
            assert s.features.dtype == np.float16 and s.features.shape == r.features.shape
            x, y = r.features.astype(np.float32), s.features.astype(np.float32)
            absmax = np.abs(x).max(axis=1, keepdims=True)
            # both sides are float16 roundings of the input: 2^-11 relative each, on top of the code's error
            slack = absmax / 1024
            if name == "int8":
                bound = absmax / 254 + slack
            else:
                bound = np.maximum(np.abs(x) / 16, absmax / 448 * 2.0 ** -10) * (1 + 2.0 ** -10) + slack
            assert (np.abs(y - x) <= bound).all(), (name, key, float((np.abs(y - x) - bound).max()))
            assert np.abs(y - x).mean() < absmax.mean() / (100 if name == "int8" else 20)
            # cls_prob: float16 [N, 1601], the k largest classes of the float16 set renormalised
            p, q = r.cls_prob.astype(np.float64), s.cls_prob.astype(np.float64)
            assert s.cls_prob.dtype == np.float16 and q.shape == p.shape
            kept = q > 0
            assert (kept.sum(axis=1) <= topk).all() and np.allclose(q.sum(axis=1), 1.0, atol=1e-2)
            mass = np.where(kept, p, 0).sum(axis=1, keepdims=True)
            assert np.allclose(q * mass, np.where(kept, p, 0), rtol=2e-3, atol=1e-6)
            assert (np.where(kept, p, 1).min(axis=1) >= np.where(kept, 0, p).max(axis=1) - 1e-3).all()  # the largest


def test_encoded_set_trains_through_the_pretraining_loader(sets, data_config):
    """The collate sees the decoded arrays: same batch shapes and image targets as float16."""
    from vilbert_ds.data.cc_batches import build_pretrain_loader

    batches = {}
    for name in ("float16", "int8"):
        cfg = data_config(train=str(sets[name] / "manifest.json"), num_workers=0, shuffle=False)
        loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)
        batches[name] = next(iter(loader))
    a, b = batches["float16"], batches["int8"]
    assert a.image_target.shape == b.image_target.shape and a.image_feat.shape == b.image_feat.shape
    assert np.allclose(b.image_target.sum(-1).numpy(), a.image_target.sum(-1).numpy(), atol=2e-2)
    assert np.allclose(b.image_feat.numpy(), a.image_feat.numpy(), atol=0.05)


def test_unknown_encoding_is_refused_in_one_line(sets, tmp_path, capsys):
    for features, cls_prob, word in (("int4", "float16", "'int4'"), ("int8", "top16", "'top16'"),
                                     ("int8", "topk:0", "top-k must be in")):
        assert _build(sets["inputs"], tmp_path / "x", features, cls_prob) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    # a manifest naming an encoding this code does not know (a newer writer) is refused by name
    m = json.loads((sets["int8"] / "manifest.json").read_text())
    m["encoding"]["features"] = "bf8"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"manifest.json: unknown feature encoding 'bf8'"):
        load_source(str(tmp_path / "manifest.json"))


def test_rebuild_with_another_encoding_is_refused_then_replaced(sets, tmp_path, capsys):
    out = tmp_path / "set"
    assert _build(sets["inputs"], out, "float16", "float16") == 0
    capsys.readouterr()
    assert _build(sets["inputs"], out, "int8", "float16") == 2
    assert "encoding" in capsys.readouterr().err
    assert _build(sets["inputs"], out, "int8", "float16", "--rebuild") == 0
    assert json.loads((out / "manifest.json").read_text())["encoding"]["features"] == "int8"


def test_verify_accepts_encoded_shards_and_inspect_shows_both_forms(sets, capsys):
    for name in ("int8", "e4m3"):
        assert cli(["shards", "verify", str(sets[name] / "manifest.json"), "--quiet"]) == 0
    assert "16 samples verified" in capsys.readouterr().out
    assert cli(["shards", "inspect", str(sets["int8"]), "--index", "2"]) == 0
    out = capsys.readouterr().out
    assert "features_int8.npy" in out and "int8[" in out and "cls_prob_topk_classes.npy" in out
    assert re.search(r"decoded features +float16\[\d+, 2048\]", out), out
    assert re.search(r"decoded cls_prob +float16\[\d+, 1601\] .*max 0\.\d+ .*topk:16", out), out


def _corrupt(src: Path, dst: Path, ext: str, value: bytes) -> str:
    """A copy of the set whose first sample's `ext` member has its first payload bytes replaced
    (the tar headers stay valid); returns that sample's key."""
    import shutil

    shutil.copytree(src, dst)
    tar = dst / "cc-000000.tar"
    with tarfile.open(tar) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("." + ext))
    data = bytearray(tar.read_bytes())
    payload = member.offset_data + 128  # after the .npy header (format 1.0 headers here are 128 bytes)
    data[payload:payload + len(value)] = value
    tar.write_bytes(bytes(data))
    return member.name.split(".")[0]


@pytest.mark.parametrize("name,ext,value,message", [
    ("int8", "features_scale.npy", np.float16(np.nan).tobytes(), "features_scale.npy has NaN/Inf"),
    ("e4m3", "features_e4m3.npy", b"\x7f", r"features_e4m3.npy holds NaN codes"),
    ("int8", "cls_prob_topk_classes.npy", np.uint16(4000).tobytes(), "beyond the set's 1601 classes"),
])
def test_a_corrupt_encoded_sample_is_named(sets, tmp_path, name, ext, value, message, capsys):
    key = _corrupt(sets[name], tmp_path / "bad", ext, value)
    with pytest.raises(SampleError, match=rf"cc-000000.tar key {key}: .*{message}"):
        _read(tmp_path / "bad")
    assert len(_read(tmp_path / "bad", on_error="skip")) == 15  # counted and left out, the rest read
    assert cli(["shards", "verify", str(tmp_path / "bad" / "manifest.json"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert key in out and message in out


def test_edge_records_round_trip():
    """An all-zero region stays zero, negative features keep their sign, k >= C keeps every class,
    and a record with NaN cls_prob is refused by name before top-k drops the NaN."""
    from vilbert_ds.data.sample import FeatureRecord, decode, encode

    feats = np.zeros((3, 8), np.float32)
    feats[1] = np.linspace(-3, 5, 8)
    feats[2, 0] = 1e3
    cls = np.array([[0.5, 0.25, 0.25, 0, 0], [1, 0, 0, 0, 0], [0.2] * 5], np.float32)
    record = FeatureRecord(image_id="7", image_w=10, image_h=10, boxes=np.zeros((3, 4), np.float32), features=feats,
                           cls_prob=cls, source="t.tsv:1")
    for enc in (Encoding("int8", 16), Encoding("e4m3", 16)):
        s = decode("k", dict(encode(record, "k", feature_dim=8, encoding=enc)), "w", feature_dim=8, num_classes=5)
        assert not s.features[0].any() and s.features[2, 0] == 1e3 and not s.features[2, 1:].any()
        assert np.allclose(s.features[1], feats[1], atol=5 / 16) and (np.sign(s.features[1]) == np.sign(feats[1])).all()
        assert np.allclose(s.cls_prob.astype(np.float32), cls, atol=1e-3)  # k=16 >= 5 classes: everything kept
    record.cls_prob = np.where(cls == 0, np.nan, cls)
    with pytest.raises(SampleError, match=r"t.tsv:1 \(image_id 7\): cls_prob has NaN"):
        encode(record, "k", feature_dim=8, encoding=Encoding("int8", 2))


def test_e4m3_table_matches_torch():
    import torch

    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert np.array_equal(bits.view(torch.float8_e4m3fn).float().numpy(), E4M3_TABLE, equal_nan=True)
