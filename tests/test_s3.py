"""Shards on real S3 endpoints on 127.0.0.1 (moto's server, then the npm s3rver when installed): build to the bucket, verify, stream
with 2 workers, resume mid-epoch, survive a server restart and connections cut every MB, and
name or count corrupt/unreadable shards. Credentials never show up in outputs."""
from __future__ import annotations

import json
import logging
import os
import re
import threading

import numpy as np
import pytest
import s3fs

from vilbert_ds.cli import main as cli
from vilbert_ds.data.cc_batches import build_pretrain_loader
from vilbert_ds.data.sample import SampleError
from vilbert_ds.data.storage import ShardReadError
from vilbert_ds.data.synthetic import SyntheticSpec, write_tsv

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

BUCKET = "vilbert-shards"
IMAGES = 24  # x 36 regions with cls_prob: ~262 KB per sample, 4 shards of ~1.6 MB


@pytest.fixture(scope="module")
def s3_set(s3_server, tmp_path_factory):
    """Synthetic TSV -> shards built straight into s3://BUCKET/cc and locally (for comparison)."""
    s3_server.create_bucket(BUCKET)
    root = tmp_path_factory.mktemp("s3set")
    inputs = write_tsv(str(root / "in"), SyntheticSpec(num_images=IMAGES, num_boxes=36, seed=9))
    common = ["shards", "build", "--format", "tsv", "--input", *inputs["features"], "--captions",
              inputs["captions_cc"], "--prefix", "cc", "--max-count", "6", "--no-progress"]
    opts = s3_server.storage_options()
    assert cli(common + ["--output", f"s3://{BUCKET}/cc", "--workers", "2", "--storage-options", json.dumps(opts)]) == 0
    assert cli(common + ["--output", str(root / "local")]) == 0
    return dict(url=f"s3://{BUCKET}/cc/manifest.json", local=root / "local", opts=opts, inputs=inputs)


def _cfg(data_config, s3_set, storage_options=None, **kw):
    base = dict(train=s3_set["url"], storage_options=s3_set["opts"] if storage_options is None else storage_options,
                max_regions=36,
                shuffle_buffer=4, read_chunk_bytes="1MiB", retry_backoff_s=0.1)
    base.update(kw)
    return data_config(**base)


def _features_by_key(local_dir):
    """key -> features of the locally built copy (the reference for 'intact')."""
    from vilbert_ds.data.manifest import load_source
    from vilbert_ds.data.stream import ReadOptions, StreamStats, read_samples

    m = load_source(str(local_dir / "manifest.json"))
    opts = ReadOptions({}, 1 << 20, 1, 0, 0, "fail", 2048, 1601)
    out = {}
    for shard in m.shards:
        for s in read_samples(shard, list(range(shard.count)), opts, StreamStats(), set()).values():
            out[s.key] = np.asarray(s.features, dtype=np.float32)
    return out


def test_build_to_bucket_is_identical_to_local_and_verifies(s3_set, s3_server, capsys):
    fs = s3fs.S3FileSystem(**s3_set["opts"])
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/cc", refresh=True))
    assert names == sorted(p.name for p in s3_set["local"].iterdir())  # no partial uploads left behind
    remote = json.loads(fs.cat_file(f"{BUCKET}/cc/manifest.json"))
    local = json.loads((s3_set["local"] / "manifest.json").read_text())
    assert remote["shards"] == local["shards"]  # same bytes (sha256, offsets) straight to S3
    for name in names:
        blob = fs.cat_file(f"{BUCKET}/cc/{name}")
        assert s3_server.secret_key.encode() not in blob and s3_server.access_key.encode() not in blob
    assert cli(["shards", "verify", s3_set["url"], "--storage-options", json.dumps(s3_set["opts"])]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out and s3_server.secret_key not in out.out + out.err


def test_stream_two_workers_and_resume_exactly(s3_set, data_config, s3_server):
    cfg = _cfg(data_config, s3_set, num_workers=2)
    full = [list(b.keys) for b in build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=4)]
    assert len(full) == 6 and len({k for b in full for k in b}) == IMAGES
    first = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=4)
    it = iter(first)
    seen = [list(next(it).keys) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint client_state)
    del it
    assert s3_server.secret_key not in json.dumps(state)
    resumed = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=4)
    resumed.load_state_dict(state)
    assert seen + [list(b.keys) for b in resumed] == full


def test_server_restart_mid_stream_recovers(s3_set, data_config, s3_server):
    """The server goes down while a response body is half delivered and comes back once a client
    has found it down (all event-driven, see GateProxy): every sample arrives exactly once, the
    cut transfer is resumed, and most of the set was read after the restart."""
    gate = s3_server.gate(256 << 10)
    opts = dict(s3_set["opts"], endpoint_url=gate.endpoint)
    cfg = _cfg(data_config, s3_set, storage_options=opts, num_workers=2, max_retries=8)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=2, seed=6)
    keys, failure = [], []

    def consume():
        try:
            for b in loader:
                keys.extend(b.keys)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            failure.append(e)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    at_trip = gate.wait(lambda st: st["tripped"], "half-delivered response")["bytes_at_trip"]
    s3_server.stop()  # down while transfers are frozen mid-body
    gate.release()  # the frozen connections are cut; the clients' next requests find the server down
    gate.wait(lambda st: st["refused"] >= 1, "request to the stopped server")
    s3_server.start()
    reader.join(timeout=150)
    assert not reader.is_alive() and not failure, failure
    total = sum(p.stat().st_size for p in s3_set["local"].glob("*.tar"))
    assert at_trip < total / 2  # the restart happened with most of the set still unread
    assert sorted(keys) == sorted(set(keys)) and len(keys) == IMAGES
    report = loader.last_report
    assert report["resumed"] >= 1  # the half-delivered body continued at the byte where it broke
    assert report["substituted"] == 0 and report["corrupt"] == 0


def test_connections_cut_every_mb_lose_nothing(s3_set, data_config, cutting_proxy, s3_server, caplog):
    proxy = cutting_proxy(1_000_000)
    opts = dict(s3_set["opts"], endpoint_url=proxy.endpoint)
    cfg = _cfg(data_config, s3_set, storage_options=opts, num_workers=2, read_chunk_bytes="4MiB", shuffle_buffer=30)
    reference = _features_by_key(s3_set["local"])
    got = {}
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=3, seed=1)
    with caplog.at_level(logging.INFO):
        for b in loader:
            for i, key in enumerate(b.keys):
                assert key not in got
                # regions the masking left alone must equal the stored features exactly
                kept = (b.image_label[i] == -1).numpy()
                got[key] = (b.image_feat[i, 1:].float().numpy()[kept], kept)
    assert set(got) == set(reference)
    for key, (feats, kept) in got.items():
        np.testing.assert_array_equal(feats, reference[key][kept])
    assert proxy.cuts >= 3
    assert loader.last_report["resumed"] >= 1 and loader.last_report["substituted"] == 0
    assert s3_server.secret_key not in caplog.text and s3_server.access_key not in caplog.text


def test_corrupt_and_missing_shards_are_named_or_counted(s3_set, data_config, s3_server, caplog):
    fs = s3fs.S3FileSystem(**s3_set["opts"])
    src = f"{BUCKET}/cc"
    dst = f"{BUCKET}/cc-bad"
    for name in fs.ls(src, refresh=True):
        fs.copy(name, f"{dst}/{name.rsplit('/', 1)[-1]}")
    manifest = json.loads(fs.cat_file(f"{src}/manifest.json"))
    s1 = manifest["shards"][1]
    key = json.loads(fs.cat_file(f"{src}/cc-000001.stats.json"))["keys"][3]
    blob = bytearray(fs.cat_file(f"{src}/{s1['name']}"))
    pos = s1["offsets"][3] + 3 * 512 + 256  # inside sample 3's features.npy payload
    blob[pos:pos + 8] = np.array([np.inf] * 4, dtype=np.float16).tobytes()
    fs.pipe_file(f"{dst}/{s1['name']}", bytes(blob))
    url = f"s3://{dst}/manifest.json"

    cfg = _cfg(data_config, s3_set, train=url, num_workers=0, shuffle=False)
    with pytest.raises(SampleError, match=rf"cc-bad/cc-000001.tar key {key}: features.npy contains NaN/Inf"):
        for _ in build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=0):
            pass

    fs.rm(f"{dst}/{manifest['shards'][2]['name']}")  # and one shard vanishes
    cfg = _cfg(data_config, s3_set, train=url, num_workers=2, on_error="skip", max_retries=1)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = [b for b in loader]
    assert len(batches) == len(loader) == 6 and all(len(b.keys) == 4 for b in batches)  # counts never change
    rep = loader.last_report
    assert rep["corrupt"] == 1 and rep["bad_shards"] == [f"s3://{dst}/{manifest['shards'][2]['name']}"]
    assert rep["substituted"] == 1 + manifest["shards"][2]["count"]
    assert f"s3://{dst}/{manifest['shards'][2]['name']}" in caplog.text and s3_server.secret_key not in caplog.text

    fs.copy(f"{src}/{s1['name']}", f"{dst}/{s1['name']}")  # repair shard 1: now the missing shard is fatal
    fail = _cfg(data_config, s3_set, train=url, num_workers=0, shuffle=False, max_retries=1)
    with pytest.raises(ShardReadError, match="cc-bad/cc-000002.tar"):
        for _ in build_pretrain_loader(fail, rank=0, world_size=1, micro_batch_size=4, seed=0):
            pass


def test_http_brace_pattern_reads_the_same_samples(s3_set, data_config, s3_server):
    """http(s):// goes through fsspec's HTTP filesystem (ranged GETs): the bucket's public URLs."""
    if not s3_server.supports_policies:
        pytest.skip(f"{s3_server.name} has no bucket policies (anonymous HTTP reads)")
    s3_server.client().put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({
                     "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                                            "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}))
    pattern = f"{s3_server.endpoint}/{BUCKET}/cc/cc-{{000000..000003}}.tar"
    http = build_pretrain_loader(_cfg(data_config, s3_set, train=pattern, storage_options={}, num_workers=0),
                                 rank=0, world_size=1, micro_batch_size=4, seed=3)
    s3 = build_pretrain_loader(_cfg(data_config, s3_set, num_workers=0), rank=0, world_size=1, micro_batch_size=4, seed=3)
    a, b = list(http), list(s3)
    assert [x.keys for x in a] == [y.keys for y in b] and len(a) == 6
    assert all(np.array_equal(x.image_feat.numpy(), y.image_feat.numpy()) for x, y in zip(a, b))


def test_build_into_the_bucket_refuses_another_build_and_leaves_no_partial(s3_set, s3_server, capsys):
    """A rerun with another --max-count is refused by name (nothing in the bucket changes); the
    fixture's 2-worker build left no partial file in its local scratch directory."""
    from vilbert_ds.data.writer import local_scratch_dir

    fs = s3fs.S3FileSystem(**s3_set["opts"])
    before = {p: fs.info(p)["ETag"] for p in fs.ls(f"{BUCKET}/cc", refresh=True)}
    args = ["shards", "build", "--format", "tsv", "--input", *s3_set["inputs"]["features"], "--captions",
            s3_set["inputs"]["captions_cc"], "--prefix", "cc", "--max-count", "5", "--quiet",
            "--output", f"s3://{BUCKET}/cc", "--storage-options", json.dumps(s3_set["opts"])]
    capsys.readouterr()
    assert cli(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(rf"s3://{BUCKET}/cc/cc-000000\.tar .*max_count \(shard: 6, now: 5\)", lines[0])
    assert s3_server.secret_key not in lines[0]
    assert {p: fs.info(p)["ETag"] for p in fs.ls(f"{BUCKET}/cc", refresh=True)} == before
    scratch = local_scratch_dir(f"s3://{BUCKET}/cc")
    assert not os.path.isdir(scratch) or not os.listdir(scratch)


def test_inspect_a_sample_in_the_bucket(s3_set, capsys):
    url = s3_set["url"]
    assert cli(["shards", "inspect", url, "--index", "7", "--storage-options", json.dumps(s3_set["opts"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(rf"sample 7 of {IMAGES}: key \w+, s3://{BUCKET}/cc/cc-000001\.tar #1 ", lines[0])
    assert any("float16[36, 2048]" in line for line in lines) and re.match(r"caption: \w+ ", lines[-1])


def test_access_denied_is_one_line(s3_set, s3_server, capsys):
    """A bucket whose policy denies writes (build) and one that denies reads (inspect): exit 2,
    one line naming the URL, no secret in it."""
    if not s3_server.supports_policies:
        pytest.skip(f"{s3_server.name} has no bucket policies")
    client = s3_server.client()
    opts = json.dumps(s3_set["opts"])
    for bucket, action in (("vilbert-no-write", "s3:PutObject"), ("vilbert-no-read", "s3:GetObject")):
        s3_server.create_bucket(bucket)
        if action == "s3:GetObject":
            fs = s3fs.S3FileSystem(**s3_set["opts"])
            for name in fs.ls(f"{BUCKET}/cc", refresh=True):
                fs.copy(name, f"{bucket}/cc/{name.rsplit('/', 1)[-1]}")
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": action,
                                                   "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    capsys.readouterr()
    build = ["shards", "build", "--format", "tsv", "--input", *s3_set["inputs"]["features"], "--captions",
             s3_set["inputs"]["captions_cc"], "--output", "s3://vilbert-no-write/cc", "--quiet", "--storage-options", opts]
    assert cli(build) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"cannot write s3://vilbert-no-write/cc/\S+: PermissionError", lines[0]), lines
    assert cli(["shards", "inspect", "s3://vilbert-no-read/cc/manifest.json", "--storage-options", opts]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "s3://vilbert-no-read/cc/manifest.json" in lines[0], lines
    assert s3_server.secret_key not in "".join(lines)
