"""Hostile and careless input to the shard commands, as a table (issue 12).

Each REFUSED row is a command and its input; the command must exit 2 with exactly one line on
stderr naming the file / row / key / shard, and leave no partial file behind. Each SKIPPED row is
a build with bad records under `--on-bad-record skip`; it must keep every good record (the exact
set of image ids), count and name each bad one in `dropped.txt` and the summary, with 1 and 2
workers. VERIFY rows damage a copy of a good set in one way each; `verify` must name the shard
(and key) and exit 1. Signals and a failing worker must not leave partial files; a killed
build's partials are removed by the next run; a failed task build writes no manifest.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from vilbert_ds.cli import main as cli
from vilbert_ds.data.synthetic import SyntheticSpec, SyntheticWorld, write_cc_lmdb, write_npz, write_pickle_lmdb, write_tsv
from vilbert_ds.data.tario import BLOCK

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
DIM, CLASSES = 16, 8  # tiny features: every build here takes milliseconds
SPEC = SyntheticSpec(num_images=40, num_boxes=2, feature_dim=DIM, num_det_classes=CLASSES, num_classes=4, seed=21)
SIZE = ["--feature-dim", str(DIM), "--num-classes", str(CLASSES), "--quiet"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """The same 40 synthetic images in each input format (+ captions), written once."""
    root = tmp_path_factory.mktemp("hostile")
    small = SyntheticSpec(**{**SPEC.__dict__, "num_images": 20})
    return dict(root=root, ids=[r.image_id for r, _ in SyntheticWorld(SPEC).images()],
                small_ids=[r.image_id for r, _ in SyntheticWorld(small).images()],
                tsv=write_tsv(str(root / "tsv"), SPEC), npz=write_npz(str(root / "npz"), SPEC),
                cc=write_cc_lmdb(str(root / "cc"), small), pickle=write_pickle_lmdb(str(root / "pkl"), small))


# ------------------------------------------------------------------------------ input makers
def tsv_rows(good: dict) -> list[str]:
    return Path(good["tsv"]["features"][0]).read_text().splitlines()


def bad_tsv(good: dict, tmp: Path, damage: dict[int, Callable[[list[str]], list[str]]]) -> str:
    """A copy of the 40-row TSV with row r (1-based) replaced by damage[r](its columns)."""
    rows = tsv_rows(good)
    for r, fn in damage.items():
        rows[r - 1] = "\t".join(fn(rows[r - 1].split("\t")))
    path = tmp / "bad.tsv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def not_base64(cols):  # non-alphabet characters in the features column
    return cols[:5] + ["!!" + cols[5][2:]] + cols[6:]


def zero_boxes(cols):  # num_boxes 0 with (empty) arrays that agree with it
    return [cols[0], cols[1], cols[2], "0", "", ""]


def three_columns(cols):
    return cols[:3]


def non_numeric(cols):
    return [cols[0], "wide", cols[2]] + cols[3:]


def short_features(cols):  # valid base64, one float32 short
    raw = base64.b64decode(cols[5])[:-4]
    return cols[:5] + [base64.b64encode(raw).decode()] + cols[6:]


def duplicate_of_row_2(good):
    first = tsv_rows(good)[1].split("\t")[0]
    return lambda cols: [first] + cols[1:]


def tsv_build(good, tmp, damage, *extra) -> list[str]:
    return ["shards", "build", "--format", "tsv", "--input", bad_tsv(good, tmp, damage), "--captions",
            good["tsv"]["captions_cc"], "--output", str(tmp / "out"), "--max-count", "8", *SIZE, *extra]


def npz_copy(good, tmp, damage: dict[int, Callable[[Path], None]]) -> str:
    """A copy of the 40-file npz directory with file i (sorted order) damaged in place."""
    src = Path(good["npz"]["features"][0])
    dst = tmp / "npz"
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.npz"))
    for i, fn in damage.items():
        fn(files[i])
    return str(dst)


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def drop_features_array(path: Path) -> None:
    with np.load(path) as z:
        d = {k: z[k] for k in z.files if k != "features"}
    np.savez(path, **d)


def npz_build(good, tmp, damage, *extra) -> list[str]:
    return ["shards", "build", "--format", "npz", "--input", npz_copy(good, tmp, damage), "--captions",
            good["npz"]["captions_json"], "--output", str(tmp / "out"), "--max-count", "8", *SIZE, *extra]


def lmdb_copy(good, tmp, which: str, damage: dict[bytes, bytes | None]) -> str:
    """A copy of an LMDB with values replaced (None: the key deleted, still listed)."""
    import lmdb

    src = Path(good[which]["features"][0])
    dst = tmp / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    env = lmdb.open(str(dst), subdir=dst.is_dir(), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in damage.items():
            if value is None:
                txn.delete(key)
            else:
                txn.put(key, value)
    env.close()
    return str(dst)


def cc_build(good, tmp, damage, *extra) -> list[str]:
    return ["shards", "build", "--format", "cc-lmdb", "--input", lmdb_copy(good, tmp, "cc", damage),
            "--output", str(tmp / "out"), "--max-count", "8", *SIZE, *extra]


def pickle_key(good, i: int) -> bytes:
    return str(good["small_ids"][i]).encode()


def pickle_build(good, tmp, damage, *extra) -> list[str]:
    damage = {pickle_key(good, i): v for i, v in damage.items()}
    return ["shards", "build", "--format", "lmdb-pickle", "--trust-pickle", "--input",
            lmdb_copy(good, tmp, "pickle", damage), "--captions", good["pickle"]["captions_json"],
            "--output", str(tmp / "out"), "--max-count", "8", *SIZE, *extra]


def good_build(good, tmp, *extra, output=None, inp=None) -> list[str]:
    return ["shards", "build", "--format", "tsv", "--input", inp or good["tsv"]["features"][0], "--captions",
            good["tsv"]["captions_cc"], "--output", output or str(tmp / "out"), "--max-count", "8", *SIZE, *extra]


def set_arg(args: list[str], flag: str, value: str) -> list[str]:
    """args with the value after `flag` replaced."""
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def with_captions(good, tmp, path: str) -> list[str]:
    return set_arg(good_build(good, tmp), "--captions", path)


def build_first(args: list[str]) -> None:
    """Part of a row's setup: an earlier build that must succeed."""
    assert cli(args) == 0


def another_input(good, tmp) -> list[str]:
    build_first(good_build(good, tmp))
    other = write_tsv(str(tmp / "b"), SyntheticSpec(**{**SPEC.__dict__, "seed": 5}))
    return good_build(good, tmp, inp=other["features"][0])


def another_max_count(good, tmp) -> list[str]:
    build_first(good_build(good, tmp))
    return set_arg(good_build(good, tmp), "--max-count", "20")


def another_slice_argument(good, tmp) -> list[str]:
    """Slice 1 of a job array started with an argument slice 0 did not have."""
    build_first(good_build(good, tmp, "--num-slices", "2", "--slice-index", "0"))
    return good_build(good, tmp, "--num-slices", "2", "--slice-index", "1", "--missing-caption", "none")


def manifest_of_another_input(good, tmp) -> list[str]:
    build_first(good_build(good, tmp))
    other = write_tsv(str(tmp / "b"), SyntheticSpec(**{**SPEC.__dict__, "seed": 5}))
    args = good_build(good, tmp, inp=other["features"][0])
    return ["shards", "manifest"] + [a for a in args[2:] if a != "--quiet"]


def legacy_shards(good, tmp) -> list[str]:
    """Shards whose stats carry no build identity (written before it existed)."""
    build_first(good_build(good, tmp))
    for stats in (tmp / "out").glob("*.stats.json"):
        st = json.loads(stats.read_text())
        del st["build"]
        stats.write_text(json.dumps(st))
    return good_build(good, tmp)


def plain_file_parent(good, tmp) -> list[str]:
    write(tmp / "plain", "not a directory")
    return good_build(good, tmp, output=str(tmp / "plain" / "out"))


# ------------------------------------------------------------------------------ refused: exit 2, one line
@dataclass
class Refused:
    name: str
    make: Callable[[dict, Path], list[str]]
    line: str  # regex the one stderr line must match


def _b(s: str) -> str:
    return re.escape(s)


REFUSED = [
    Refused("tsv-not-base64-row-21", lambda g, t: tsv_build(g, t, {21: not_base64}),
            r"bad\.tsv:21 \(image_id \d+\): column features is not base64"),
    Refused("tsv-bad-row-3-inside-the-size-estimate", lambda g, t: tsv_build(g, t, {3: not_base64}),
            r"bad\.tsv:3 \(image_id \d+\): column features is not base64"),
    Refused("tsv-num-boxes-0", lambda g, t: tsv_build(g, t, {7: zero_boxes}), r"bad\.tsv:7 \(image_id \d+\): num_boxes 0"),
    Refused("tsv-three-columns", lambda g, t: tsv_build(g, t, {12: three_columns}),
            r"bad\.tsv:12: 3 tab-separated columns, expected 6 or 7"),
    Refused("tsv-non-numeric-width", lambda g, t: tsv_build(g, t, {30: non_numeric}),
            r"bad\.tsv:30 \(image_id \d+\): image_w/image_h/num_boxes are not numbers"),
    Refused("tsv-features-one-value-short", lambda g, t: tsv_build(g, t, {40: short_features}),
            r"bad\.tsv:40 \(image_id \d+\): column features has \d+ bytes"),
    Refused("tsv-duplicate-image-id", lambda g, t: tsv_build(g, t, {5: duplicate_of_row_2(g)}),
            r"bad\.tsv:5 \(image_id \d+\): duplicate sample key .*first at .*bad\.tsv:2"),
    Refused("npz-truncated-file", lambda g, t: npz_build(g, t, {17: truncate_file}),
            r"npz/\d+\.npz: not a readable \.npz without pickles"),
    Refused("npz-without-features", lambda g, t: npz_build(g, t, {25: drop_features_array}),
            r"npz/\d+\.npz: no array named features or x"),
    Refused("cc-lmdb-garbage-value", lambda g, t: cc_build(g, t, {b"00000011": b"\xc1garbage"}),
            r"training_feat_all\.lmdb key 00000011: \w+"),
    Refused("cc-lmdb-listed-key-absent", lambda g, t: cc_build(g, t, {b"00000004": None}),
            r"training_feat_all\.lmdb key 00000004: listed in __keys__ but absent"),
    Refused("lmdb-pickle-not-a-dict", lambda g, t: pickle_build(g, t, {9: pickle.dumps([1, 2])}),
            r"features\.lmdb key \d+: expected a dict, got list"),
    Refused("captions-file-missing", lambda g, t: with_captions(g, t, str(t / "nope.json")),
            r"nope\.json: captions file not found"),
    Refused("captions-json-malformed", lambda g, t: with_captions(g, t, write(t / "c.json", "{\"1\": ")),
            r"c\.json:1: captions JSON is malformed"),
    Refused("captions-tsv-line-without-tab", lambda g, t: with_captions(
        g, t, write(t / "c.tsv", "a cat\thttp://x/1.jpg\njust words\n")), r"c\.tsv:2: expected 'caption<TAB>url'"),
    Refused("captions-not-utf8", lambda g, t: with_captions(g, t, write(t / "c.tsv", b"\xff\xfe\tx\n")),
            r"c\.tsv: captions file is not UTF-8"),
    Refused("storage-options-not-json", lambda g, t: good_build(g, t, "--storage-options", "{endpoint_url: x}"),
            r"--storage-options is not valid JSON"),
    Refused("storage-options-not-an-object", lambda g, t: good_build(g, t, "--storage-options", "[1]"),
            r"--storage-options must be a JSON object, got list"),
    Refused("output-not-writable", lambda g, t: good_build(g, t, output="/sys"), r"^.*/sys: --output directory is not writable"),
    Refused("output-cannot-be-created", lambda g, t: good_build(g, t, output="/sys/vilbert-ds-out"),
            r"/sys/vilbert-ds-out: cannot create the --output directory"),
    Refused("output-under-a-plain-file", plain_file_parent, r"plain/out: --output lies under .*plain, which is a file"),
    Refused("max-count-0", lambda g, t: set_arg(good_build(g, t), "--max-count", "0"), r"--max-count must be >= 1, got 0"),
    Refused("max-bytes-unparsable", lambda g, t: good_build(g, t, "--max-bytes", "lots"), r"--max-bytes: cannot parse"),
    Refused("input-missing", lambda g, t: good_build(g, t, inp=str(t / "none.tsv")), r"none\.tsv: TSV file not found"),
    Refused("pickle-without-trust", lambda g, t: [a for a in pickle_build(g, t, {}) if a != "--trust-pickle"],
            r"unpickling a file can run arbitrary code; pass --trust-pickle"),
    Refused("shards-of-another-input", another_input,
            r"out/shard-000000\.tar \(and 4 more shard\(s\)\) was built from another input or with other arguments: "
            r"input\.paths .*--rebuild"),
    Refused("shards-of-another-max-count", another_max_count,
            r"out/shard-000000\.tar \(and 1 more shard\(s\)\) was built .*: max_count \(shard: 8, now: 20\)"),
    Refused("slice-with-other-arguments", another_slice_argument,
            r"out/shard-000000\.tar was built .*captionless \(shard: \"drop\", now: \"keep\"\)"),
    Refused("manifest-over-another-input", manifest_of_another_input, r"out/shard-000000\.tar .*input\.paths"),
    Refused("shards-without-recorded-identity", legacy_shards, r"build identity \(not recorded"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_refused_with_one_line(case, good, tmp_path, capsys):
    args = case.make(good, tmp_path)
    before = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").is_dir() else []
    capsys.readouterr()
    rc = cli(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert re.search(case.line, lines[0]), lines[0]
    assert lines[0].startswith(f"vilbert-ds shards {args[1]}: error: ")
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".tmp-*"))
    if before:  # a refused rerun changes nothing (no manifest for a mixed set, no shard replaced)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


# ------------------------------------------------------------------------------ skip keeps every good record
@dataclass
class Skipped:
    name: str
    make: Callable[..., list[str]]
    ids: Callable[[dict], list[str]]  # every image id of the input
    bad: dict[int, str]  # index (0-based record number) -> regex its dropped.txt line must match


SKIPPED = [
    Skipped("tsv-row-21-not-base64", lambda g, t, *x: tsv_build(g, t, {21: not_base64}, *x), lambda g: g["ids"],
            {20: r"bad\.tsv:21 \(image_id \d+\): column features is not base64"}),
    Skipped("tsv-bad-rows-2-9-33-incl-size-estimate", lambda g, t, *x: tsv_build(
        g, t, {2: not_base64, 9: zero_boxes, 33: three_columns}, *x), lambda g: g["ids"],
        {1: r"bad\.tsv:2 ", 8: r"bad\.tsv:9 \(image_id \d+\): num_boxes 0", 32: r"bad\.tsv:33: 3 tab-separated"}),
    Skipped("tsv-last-row-short", lambda g, t, *x: tsv_build(g, t, {40: short_features}, *x), lambda g: g["ids"],
            {39: r"bad\.tsv:40 "}),
    Skipped("npz-two-bad-files", lambda g, t, *x: npz_build(g, t, {3: truncate_file, 26: drop_features_array}, *x),
            lambda g: sorted(g["ids"]), {3: r"\.npz: not a readable", 26: r"\.npz: no array named features"}),
    Skipped("cc-lmdb-garbage-and-absent", lambda g, t, *x: cc_build(g, t, {b"00000002": b"\xc1", b"00000013": None}, *x),
            lambda g: g["small_ids"], {2: r"key 00000002: ", 13: r"key 00000013: listed in __keys__ but absent"}),
    Skipped("lmdb-pickle-not-a-dict", lambda g, t, *x: pickle_build(g, t, {0: pickle.dumps("x"), 19: b"junk"}, *x),
            lambda g: g["small_ids"], {0: r"expected a dict, got str", 19: r"key \d+: UnpicklingError"}),
]


def _built_ids(out: Path) -> list[str]:
    ids = []
    for stats in sorted(out.glob("*.stats.json")):
        ids += json.loads(stats.read_text())["keys"]
    return ids


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", SKIPPED, ids=[c.name for c in SKIPPED])
def test_skip_keeps_every_good_record(case, workers, good, tmp_path, capsys):
    args = case.make(good, tmp_path, "--on-bad-record", "skip", "--workers", str(workers))
    rc = cli(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    all_ids = case.ids(good)
    expected = [i for n, i in enumerate(all_ids) if n not in case.bad]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(_built_ids(tmp_path / "out")) == sorted(expected)  # every good record, nothing else
    assert m["num_samples"] == len(expected) == len(all_ids) - len(case.bad)
    assert m["build"]["records_dropped"] == len(case.bad)
    dropped = (tmp_path / "out" / "dropped.txt").read_text().splitlines()
    assert len(dropped) == len(case.bad)
    for pattern in case.bad.values():
        assert sum(bool(re.search(pattern, d)) for d in dropped) == 1, (pattern, dropped)
    assert f"dropped {len(case.bad)} record(s), listed in " in out and "dropped.txt" in out
    assert re.search(list(case.bad.values())[0], out)  # the summary names them
    assert cli(["shards", "verify", str(tmp_path / "out" / "manifest.json"), "--quiet"]) == 0


# ------------------------------------------------------------------------------ verify names each kind of damage
def _set(good, root: Path) -> Path:
    assert cli(good_build(good, root, output=str(root / "set"))) == 0
    return root / "set"


@pytest.fixture(scope="module")
def good_set(good, tmp_path_factory) -> Path:
    return _set(good, tmp_path_factory.mktemp("verify"))


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _save(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _resync(d: Path, i: int, data: bytes, offsets: list[int] | None = None) -> None:
    """Replaces tar i and updates its manifest entry (bytes, sha256[, offsets]) so that only the
    damage itself is left to find."""
    import hashlib

    m = _manifest(d)
    s = m["shards"][i]
    (d / s["name"]).write_bytes(data)
    s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    if offsets is not None:
        s["offsets"] = offsets
    m["num_bytes"] = sum(x["bytes"] for x in m["shards"])
    _save(d, m)


def _sample_members(d: Path, shard: int, i: int) -> list[tuple[str, bytes]]:
    from vilbert_ds.data.tario import parse_sample

    s = _manifest(d)["shards"][shard]
    blob = (d / s["name"]).read_bytes()
    return [(m.name, bytes(m.data)) for m in parse_sample(blob[s["offsets"][i]:s["offsets"][i + 1]], "x")]


def _rewrite(d: Path, shard: int, edit: Callable[[list[tuple[str, list[tuple[str, bytes]]]]], None]) -> None:
    """Re-encodes shard `shard` after edit(samples) changed its (key, [(ext, data)]) list."""
    from vilbert_ds.data.tario import TarShardWriter

    s = _manifest(d)["shards"][shard]
    samples = []
    for i in range(s["count"]):
        members = _sample_members(d, shard, i)
        key = members[0][0].split(".", 1)[0]
        samples.append((key, [(n.split(".", 1)[1], data) for n, data in members]))
    edit(samples)
    import io

    buf = io.BytesIO()
    w = TarShardWriter(buf)
    for key, members in samples:
        w.write_sample(key, members)
    w.close()
    _resync(d, shard, buf.getvalue(), w.offsets)


def bad_header(d: Path) -> str:
    s = _manifest(d)["shards"][1]
    blob = bytearray((d / s["name"]).read_bytes())
    blob[s["offsets"][3] + 100] ^= 0x01  # the mode field of sample 3's first header: checksum no longer matches
    _resync(d, 1, bytes(blob))
    key = json.loads((d / "shard-000001.stats.json").read_text())["keys"][2]
    return rf"shard-000001\.tar @{s['offsets'][3]}: tar header checksum mismatch .*\(after key {key}\)"


def missing_member(d: Path) -> str:
    key = json.loads((d / "shard-000002.stats.json").read_text())["keys"][4]
    _rewrite(d, 2, lambda samples: samples[4][1].pop(2))  # K.boxes.npy
    return rf"shard-000002\.tar key {key}: missing member\(s\) boxes\.npy"


def wrong_dtype(d: Path) -> str:
    from vilbert_ds.data.sample import npy_bytes

    key = json.loads((d / "shard-000000.stats.json").read_text())["keys"][1]

    def edit(samples):
        ext, data = samples[1][1][1]
        samples[1][1][1] = (ext, npy_bytes(np.zeros((2, DIM), np.float32)))
    _rewrite(d, 0, edit)
    return rf"shard-000000\.tar key {key}: features float32\[2, {DIM}\], expected float16"


def wrong_shape(d: Path) -> str:
    from vilbert_ds.data.sample import npy_bytes

    key = json.loads((d / "shard-000003.stats.json").read_text())["keys"][0]

    def edit(samples):
        samples[0][1][2] = ("boxes.npy", npy_bytes(np.zeros((2, 5), np.float32)))
    _rewrite(d, 3, edit)
    return rf"shard-000003\.tar key {key}: boxes float32\[2, 5\], expected float32\[2, 4\]"


def wrong_offset(d: Path) -> str:
    m = _manifest(d)
    m["shards"][4]["offsets"][5] += BLOCK
    _save(d, m)
    key = json.loads((d / "shard-000004.stats.json").read_text())["keys"][5]
    return rf"shard-000004\.tar key {key}: starts at byte \d+, manifest offset \d+"


def wrong_count(d: Path) -> str:
    m = _manifest(d)
    s = m["shards"][2]
    s["count"] -= 1
    s["offsets"] = s["offsets"][:-2] + s["offsets"][-1:]
    m["num_samples"] -= 1
    _save(d, m)
    return r"shard-000002\.tar: 8 samples, manifest says 7"


def wrong_total(d: Path) -> str:
    m = _manifest(d)
    m["num_samples"] = 41
    _save(d, m)
    return r"manifest\.json: cannot load manifest .*top-level num_samples is 41 but the shard entries add up to 40"


def duplicate_across_shards(d: Path) -> str:
    m = _manifest(d)
    shutil.copy(d / "shard-000000.tar", d / "shard-000005.tar")
    m["shards"].append(dict(m["shards"][0], name="shard-000005.tar"))
    m["num_shards"], m["num_samples"], m["num_bytes"] = 6, 48, m["num_bytes"] + m["shards"][0]["bytes"]
    _save(d, m)
    key = json.loads((d / "shard-000000.stats.json").read_text())["keys"][0]
    return rf"duplicate key {key} in shard-000000\.tar and shard-000005\.tar"


def duplicate_within_shard(d: Path) -> str:
    key = json.loads((d / "shard-000001.stats.json").read_text())["keys"][0]

    def edit(samples):
        samples.append(samples[0])  # sample 0 again, after sample 7
    _rewrite(d, 1, edit)
    m = _manifest(d)
    m["shards"][1]["count"] = 9
    m["num_samples"] = 41
    _save(d, m)
    return rf"shard-000001\.tar key {key}: members not contiguous \(key appears twice\)"


VERIFY = {"bad-tar-header": bad_header, "missing-member": missing_member, "wrong-dtype": wrong_dtype,
          "wrong-shape": wrong_shape, "offset-mismatch": wrong_offset, "count-mismatch": wrong_count,
          "top-level-sample-count": wrong_total, "duplicate-key-across-shards": duplicate_across_shards,
          "duplicate-key-within-a-shard": duplicate_within_shard}


@pytest.mark.parametrize("damage", sorted(VERIFY))
def test_verify_names_the_damage(damage, good_set, tmp_path, capsys):
    d = tmp_path / "set"
    shutil.copytree(good_set, d)
    pattern = VERIFY[damage](d)
    rc = cli(["shards", "verify", str(d / "manifest.json"), "--quiet"])
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    assert rc == 1 and errors, out
    assert any(re.search(pattern, e) for e in errors), (pattern, errors)
    assert out.splitlines()[-1].startswith("FAILED")


# ------------------------------------------------------------------------------ the lmdb extra
_WITHOUT_MODULE = """
import contextlib, io, json, sys
from vilbert_ds.cli import main
results = []
for fmt, module, args in json.loads(sys.argv[1]):
    sys.modules[module] = None  # as if never installed: `import module` raises ImportError
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    del sys.modules[module]
    results.append([fmt, module, rc, err.getvalue()])
print(json.dumps(results))
"""


def test_lmdb_formats_without_the_extra_name_the_pip_command(good, tmp_path):
    """cc-lmdb / lmdb-pickle in an interpreter where lmdb (or msgpack_numpy) cannot be imported."""
    cases = []
    for fmt, module in (("cc-lmdb", "lmdb"), ("cc-lmdb", "msgpack_numpy"), ("lmdb-pickle", "lmdb")):
        which = "cc" if fmt == "cc-lmdb" else "pickle"
        cases.append([fmt, module, ["shards", "build", "--format", fmt, "--input", good[which]["features"][0],
                                    "--output", str(tmp_path / "o"), "--trust-pickle", *SIZE]])
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_MODULE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    for fmt, module, rc, err in json.loads(proc.stdout.splitlines()[-1]):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (fmt, module, err)
        assert f"--format {fmt} needs the Python module {module!r}" in lines[0]
        assert "pip install -e '.[lmdb]'" in lines[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ signals, failing workers, stale partials
def _npz_with_fifo(root: Path, *, files: int, fifo_at: int, bad_at: int | None = None) -> Path:
    """A directory of tiny npz records where record `fifo_at` is a named pipe: reading it blocks
    until someone writes, so a build is certainly in the middle of that record's shard."""
    d = root / "npz"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        path = d / f"{i:03d}.npz"
        if i == fifo_at:
            os.mkfifo(path)
        elif i == bad_at:
            path.write_bytes(b"not a zip")
        else:
            np.savez(path, features=rng.random((2, DIM), dtype=np.float32), boxes=np.ones((2, 4), np.float32),
                     image_w=np.int64(10), image_h=np.int64(10))
    return d


def _wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _cli_proc(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vilbert_ds.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("sig,workers,status", [(signal.SIGTERM, 1, 143), (signal.SIGTERM, 2, 143),
                                                (signal.SIGINT, 2, 130)])
def test_signal_to_the_parent_removes_partial_files(sig, workers, status, tmp_path):
    """SIGTERM (what SLURM sends) or a SIGINT to the parent alone, while shard 1 is half written
    (its record 25 is a pipe nobody writes): every partial file is removed, one line says so."""
    src = _npz_with_fifo(tmp_path, files=48, fifo_at=25)
    out = tmp_path / "out"
    proc = _cli_proc(["shards", "build", "--format", "npz", "--input", str(src), "--output", str(out),
                      "--missing-caption", "none", "--max-count", "20", "--workers", str(workers), *SIZE])
    try:
        _wait_for(lambda: out.is_dir() and any(n.startswith(".shard-000001.tar.") for n in os.listdir(out)),
                  "shard 1's partial file", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1, err
    assert "partial files removed, rerun the same command to resume" in lines[0]
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert not (out / "shard-000001.tar").exists() and not (out / "manifest.json").exists()


def test_a_failing_worker_stops_the_others_and_leaves_no_partial(tmp_path, capsys):
    """Worker B blocks inside shard 1 (a pipe) while worker A reaches the bad record of shard 3:
    the build exits 2 naming that file, and B's half-written shard 1 is removed too."""
    src = _npz_with_fifo(tmp_path, files=90, fifo_at=25, bad_at=65)
    out = tmp_path / "out"
    rc = cli(["shards", "build", "--format", "npz", "--input", str(src), "--output", str(out),
              "--missing-caption", "none", "--max-count", "20", "--workers", "2", *SIZE])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert re.search(r"npz/065\.npz: not a readable \.npz without pickles .*\[shard shard-000003\.tar", lines[0])
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert (out / "shard-000000.tar").exists() and not (out / "shard-000001.tar").exists()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_a_killed_worker_is_named_and_the_rerun_cleans_up_and_resumes(tmp_path, capsys):
    """SIGKILL (the OOM killer) to the build worker while shard 1 is half written: the build
    names the dead worker and its shard (exit 2); the partial file it could not remove is
    removed by the rerun, which keeps the finished shards and completes the set."""
    src = _npz_with_fifo(tmp_path, files=48, fifo_at=25)
    out = tmp_path / "out"
    args = ["shards", "build", "--format", "npz", "--input", str(src), "--output", str(out), "--missing-caption", "none",
            "--max-count", "20", "--workers", "2", *SIZE]
    proc = _cli_proc(args)
    try:
        # the other worker finishes shards 0 and 2 and exits; the one left is blocked in shard 1
        _wait_for(lambda: (out / "shard-000000.stats.json").exists() and (out / "shard-000002.stats.json").exists()
                  and any(n.startswith(".shard-000001.tar.") for n in os.listdir(out)), "shards 0 and 2", proc)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert re.search(r"build worker \d+ died \(killed by SIGKILL \(out of memory\?\)\) while building "
                     r".*/out/shard-000001\.tar; rerun to resume", lines[0]), lines[0]
    assert any(n.startswith(".shard-000001.tar.") and n.endswith(".partial") for n in os.listdir(out))

    def unblock():  # the rerun's reader of record 25 gets an empty file (a bad record, skipped)
        with open(src / "025.npz", "wb"):
            pass
    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    capsys.readouterr()
    assert cli(args + ["--on-bad-record", "skip"]) == 0
    t.join(10)
    summary = capsys.readouterr().out
    assert re.search(r"built 1 shard\(s\), skipped 2 finished, 3 in the set", summary), summary
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 47


def test_partials_of_a_killed_build_are_removed_by_the_next_run_of_that_slice(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = [out / ".shard-000002.tar.k1ll3d.partial", out / ".tmp-x9shard-000000.stats.json"]
    others = [out / ".shard-000001.tar.busy.partial", out / ".other-000000.tar.x.partial", out / "notes.partial"]
    for p in mine + others:
        p.write_bytes(b"half")
    assert cli(good_build(good, tmp_path, "--num-slices", "2", "--slice-index", "0")) == 0
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in others)  # slice 1's build may be writing shard 1 right now


# ------------------------------------------------------------------------------ task builds
@pytest.fixture(scope="module")
def task_root(tmp_path_factory) -> Path:
    from vilbert_ds.tasks.synthetic_qa import make_synthetic_tasks

    root = tmp_path_factory.mktemp("tasks")
    make_synthetic_tasks(root, ["vqa"])
    return root


def _task_args(root: Path, *extra: str) -> list[str]:
    return ["shards", "task", "--task", "vqa", "--data-root", str(root), "--splits", "minval", "--max-count", "3",
            "--quiet", *extra]


def _task_copy(task_root: Path, root: Path) -> Path:
    """A copy of the synthetic task data whose registry points at the copy; returns the split dir."""
    from vilbert_ds.tasks.registry import load_registry

    shutil.copytree(task_root, root, symlinks=True)
    registry = root / "tasks.yaml"
    registry.write_text(registry.read_text().replace(str(task_root), str(root)))
    return Path(load_registry(registry)["vqa"].split_dir("minval"))


def _feature_set(root: Path) -> Path:
    from vilbert_ds.tasks.registry import load_registry

    url = load_registry(root / "tasks.yaml")["vqa"].features["regions"]
    return Path(url[:-len("manifest.json")] if url.endswith("manifest.json") else url)


def test_task_build_defaults_to_the_registry_in_data_root(task_root, capsys):
    from vilbert_ds.tasks.registry import load_registry

    assert cli(_task_args(task_root)) == 0  # no --registry: DATA_ROOT/tasks.yaml
    assert "vqa/minval: 16 samples" in capsys.readouterr().out
    split_dir = Path(load_registry(task_root / "tasks.yaml")["vqa"].split_dir("minval"))
    assert json.loads((split_dir / "manifest.json").read_text())["num_samples"] == 16


def test_task_build_removes_partials_a_killed_build_left(task_root, tmp_path, capsys):
    root = tmp_path / "root"
    split_dir = _task_copy(task_root, root)
    split_dir.mkdir(parents=True, exist_ok=True)
    stale = split_dir / ".minval-000002.tar.k1ll3d.partial"
    stale.write_bytes(b"half")
    assert cli(_task_args(root)) == 0
    assert not stale.exists() and not list(split_dir.glob("*.partial"))


def test_failed_task_build_writes_no_manifest_and_no_partial(task_root, tmp_path, capsys):
    """A feature set missing images: exit 2, one line; the split's old manifest and tars are gone
    (multitask training must not train on a partial set), no partial file is left."""
    root = tmp_path / "root"
    split_dir = _task_copy(task_root, root)
    assert cli(_task_args(root)) == 0
    assert (split_dir / "manifest.json").exists() and list(split_dir.glob("*.tar"))
    features = _feature_set(root)
    m = json.loads((features / "manifest.json").read_text())
    shard = m["shards"][0]  # the set keeps its first 3 images, the others vanish
    tar = features / shard["name"]
    end = shard["offsets"][3]
    tar.write_bytes(tar.read_bytes()[:end] + bytes(2 * BLOCK))
    shard.update(count=3, offsets=shard["offsets"][:4], bytes=end + 2 * BLOCK, sha256="")
    m.update(shards=[shard], num_shards=1, num_samples=3, num_bytes=shard["bytes"])
    (features / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert cli(_task_args(root)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"split 'minval': \d+ image\(s\) .* not in the feature sets.*no manifest written",
                                         lines[0]), lines
    assert not list(split_dir.iterdir()) and not list(root.rglob("*.partial"))


def test_sigterm_during_a_task_build_removes_the_split(task_root, tmp_path):
    """The feature tar is swapped for a pipe nobody writes: the task build blocks inside the
    split; SIGTERM ends it with one line, no manifest, no tar, no partial file."""
    root = tmp_path / "root"
    split_dir = _task_copy(task_root, root)
    features = _feature_set(root)
    tar = features / json.loads((features / "manifest.json").read_text())["shards"][0]["name"]
    tar.unlink()
    os.mkfifo(tar)
    proc = _cli_proc(_task_args(root))
    try:
        _wait_for(lambda: split_dir.is_dir() and any(n.endswith(".partial") for n in os.listdir(split_dir)),
                  "the split's partial file", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    assert not list(split_dir.iterdir())
