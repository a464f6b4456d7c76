"""`vilbert-ds shards ...`: build, verify, finalize and inspect feature shards; write synthetic inputs.

    vilbert-ds shards synth  --out DIR --format tsv --images 64
    vilbert-ds shards build  --format tsv --input DIR/features.tsv.0 --captions DIR/captions.json --output OUT
    vilbert-ds shards build  --format tsv --input DIR/features.tsv.0 --captions DIR/captions.json --output OUT8 \
        --feature-encoding int8 --cls-prob-encoding topk:64   # compact: ~3x fewer bytes (README)
    vilbert-ds shards verify OUT/manifest.json
    vilbert-ds shards inspect OUT/manifest.json --index 0           # or --key KEY; local or s3://
    vilbert-ds shards manifest --format tsv --input ... --output OUT   # after a SLURM array built every slice
    vilbert-ds shards task --task vqa --data-root data

S3 and other object stores: credentials and endpoint come from the usual AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) or from
`--storage-options '{"endpoint_url": ...}'`; they are never written to manifests or logs.

Refused input (a bad record, a missing file, an unusable output, shards of another build) is one
line on stderr naming the file / row / key / shard, exit status 2. SIGTERM or SIGINT remove the
partial files of the shards in progress (exit status 143 / 130); rerunning resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..data import synthetic


class CommandError(ValueError):
    """An argument the command cannot use (one line, exit status 2)."""


def _storage_options(args) -> dict:
    text = getattr(args, "storage_options", None)
    try:
        opts = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise CommandError(f"--storage-options is not valid JSON ({e.msg} at character {e.pos}); expected an object "
                           f"such as '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(opts, dict):
        raise CommandError(f"--storage-options must be a JSON object, got {type(opts).__name__}")
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    return opts


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default=None, help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL / AWS defaults)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar (shown only when stderr is a terminal anyway) and no INFO lines")


def _add_input(p: argparse.ArgumentParser) -> None:
    from ..data.formats import FORMATS

    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="input feature format (cc-lmdb and lmdb-pickle need pip install -e '.[lmdb]')")
    p.add_argument("--input", required=True, nargs="+", help="input file(s) / directory")
    p.add_argument("--captions", default=None, help="{image_id: caption} JSON or Conceptual Captions TSV (caption<TAB>url)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading pickled LMDB values (format lmdb-pickle): unpickling can run arbitrary code, "
                        "use only with files you trust")
    p.add_argument("--feature-dim", type=int, default=2048, help="region feature width (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=1601, help="cls_prob width of the input (default: %(default)s)")


def _add_layout(p: argparse.ArgumentParser) -> None:
    """Arguments `build` and `manifest` share (the manifest job gets the build's arguments)."""
    p.add_argument("--output", required=True, help="output directory: local path, file://, s3://bucket/prefix ...")
    p.add_argument("--prefix", default="shard", help="shard names are PREFIX-000000.tar ... (default: %(default)s)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default: %(default)s)")
    p.add_argument("--max-bytes", default=None, help="target shard size, e.g. 1GB (sample count derived from it)")
    p.add_argument("--missing-caption", default="fail", choices=("fail", "skip", "none"),
                   help="image without caption: fail, skip it (counted), or none (no caption: task features) "
                        "(default: %(default)s)")
    p.add_argument("--on-bad-record", default="fail", choices=("fail", "skip"),
                   help="a record that cannot be read: fail naming it, or skip it (each listed in dropped.txt) "
                        "(default: %(default)s)")
    # plain strings, checked by Encoding.parse: an unknown name is refused in one line (exit 2)
    p.add_argument("--feature-encoding", default="float16", metavar="{float16,int8,e4m3}",
                   help="region features as float16, or 8 bits with a float16 scale per region: int8 (symmetric, "
                        "absmax/127) or e4m3 (float8) (default: %(default)s)")
    p.add_argument("--cls-prob-encoding", default="float16", metavar="{float16,topk:K}",
                   help="detector class distribution as float16, or its K largest classes (the KL target is "
                        "renormalised over them when read) (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true",
                   help="replace shards another build (other input or arguments) left in --output instead of "
                        "refusing them; finished shards of this build are kept")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="build WebDataset shards from region features + captions")
    _add_input(b)
    _add_layout(b)
    b.add_argument("--workers", type=int, default=1, help="parallel build processes (default: %(default)s)")
    b.add_argument("--num-slices", type=int, default=1, help="job-array size: build only shards k %% N == slice-index")
    b.add_argument("--slice-index", type=int, default=0, help="this array task's index (SLURM_ARRAY_TASK_ID)")
    _add_quiet(b)
    _add_storage(b)

    m = sub.add_parser("manifest", help="(re)write manifest.json once every shard of a build exists")
    _add_input(m)
    _add_layout(m)
    _add_storage(m)

    v = sub.add_parser("verify", help="read every shard of a manifest; exit 1 on any problem")
    v.add_argument("manifest", help="manifest.json URL (local or s3://...)")
    v.add_argument("--workers", type=int, default=4, help="shards verified in parallel (threads, default: %(default)s)")
    _add_quiet(v)
    _add_storage(v)

    i = sub.add_parser("inspect", help="print one sample: members, shapes, dtypes, caption")
    i.add_argument("source", help="manifest.json URL, a shard directory, or a tar URL / brace pattern (local or s3://)")
    which = i.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=None, help="sample number in the set, from 0 (default: 0)")
    which.add_argument("--key", default=None, help="sample key (the image id; characters other than letters, digits, '_' and '-' "
                            "become '_')")
    _add_storage(i)

    s = sub.add_parser("synth", help="write synthetic learnable region features in a real input format")
    synthetic.add_arguments(s)

    from ..tasks import build as task_build  # owned by the tasks area (docs/TASKS.md)

    t = sub.add_parser("task", help="build 12-in-1 task shards: public annotations joined with feature shards")
    task_build.add_arguments(t)
    _add_quiet(t)


def _builder(args):
    from ..data.encoding import Encoding
    from ..data.formats import Captions, open_input
    from ..data.writer import BuildConfig, ShardBuilder

    encoding = Encoding.parse(args.feature_encoding, args.cls_prob_encoding)
    cfg = BuildConfig(encoding=encoding, output=args.output, prefix=args.prefix, max_count=args.max_count, max_bytes=args.max_bytes,
                      workers=getattr(args, "workers", 1), num_slices=getattr(args, "num_slices", 1),
                      slice_index=getattr(args, "slice_index", 0), feature_dim=args.feature_dim,
                      num_classes=args.num_classes, missing_caption=args.missing_caption,
                      on_bad_record=args.on_bad_record, rebuild=args.rebuild, storage_options=_storage_options(args),
                      progress=not getattr(args, "quiet", True))
    kwargs = dict(feature_dim=args.feature_dim, num_classes=args.num_classes)
    if args.trust_pickle:
        kwargs["trust_pickle"] = True
    inp = open_input(args.format, args.input, **kwargs)
    captions = Captions.load(args.captions) if args.captions else None
    return ShardBuilder(inp, captions, cfg)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..data.config import CredentialsInURLError
    from ..data.encoding import EncodingError
    from ..data.formats import InputError
    from ..data.manifest import ManifestError
    from ..data.sample import SampleError
    from ..data.storage import ShardReadError
    from ..data.tario import TarFormatError
    from ..data.writer import BuildError, BuildInterrupted

    prog = f"vilbert-ds shards {args.action}"
    try:
        return _run(args)
    except (InputError, ManifestError, SampleError, BuildError, CommandError, ShardReadError, TarFormatError,
            CredentialsInURLError, EncodingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (an unreadable input file, a full disk): one line, not a traceback
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except BuildInterrupted as e:
        print(f"{prog}: stopped by {e.signame}; partial files removed, rerun the same command to resume", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (SIGINT); partial files removed, rerun the same command to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        return synthetic.main(args)
    if args.action == "task":
        from ..tasks import build as task_build

        return task_build.main(args)
    if args.action == "build":
        summary = _builder(args).run()
        print(summary.line())
        return 0
    if args.action == "manifest":
        builder = _builder(args)
        builder.plan()
        states = {k: builder.shard_state(k)[0] for k in range(builder.num_shards)}
        missing = [k for k, state in states.items() if state == "todo"]
        if missing:
            print(f"{len(missing)} of {builder.num_shards} shards are not built yet: "
                  f"{', '.join(builder.shard_url(k) for k in missing[:10])}", file=sys.stderr)
            return 1
        print(builder.write_manifest())  # refuses shards of another build by name
        return 0
    if args.action == "verify":
        return _verify(args)
    if args.action == "inspect":
        return _inspect(args)
    raise CommandError(f"unknown action {args.action}")


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.verify import verify_manifest

    with tqdm(total=0, unit="shard", desc="verify", file=sys.stderr, disable=True if args.quiet else None,
              dynamic_ncols=True) as bar:
        report = verify_manifest(args.manifest, _storage_options(args), workers=args.workers, progress=bar)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    from ..data.manifest import MANIFEST_NAME, load_source
    from ..data.storage import join

    source = args.source
    if not source.endswith(".json") and ".tar" not in source:
        source = join(source, MANIFEST_NAME)  # a shard directory
    opts = _storage_options(args)
    m = load_source(source, opts, retries=2)
    shard, i, start = _locate(m, opts, index=args.index, key=args.key)
    for line in _describe(shard, i, start, opts, m.num_samples, m):
        print(line)
    return 0


def _locate(m, opts: dict, *, index: int | None, key: str | None):
    """(shard, sample number within it, number of its first sample in the set) of a sample
    given by its number in the set or by its key (looked up in the shards' stats)."""
    from ..data.manifest import load_stats

    if key is None:
        index = 0 if index is None else index
        if not 0 <= index < m.num_samples:
            raise CommandError(f"--index {index}: the set has {m.num_samples} samples (0..{m.num_samples - 1})")
    first = 0
    for shard in m.shards:
        if key is None:
            if index < first + shard.count:
                return shard, index - first, first
        else:
            keys = load_stats(shard.url, opts, retries=2).get("keys", [])
            if key in keys:
                return shard, keys.index(key), first
        first += shard.count
    raise CommandError(f"--key {key!r}: no such sample in {len(m.shards)} shard(s) of {m.url}")


def _describe(shard, i: int, first: int, opts: dict, total: int, manifest=None) -> list[str]:
    """Lines describing sample i of a shard: every member with its size, the JSON members'
    content, the .npy members' dtype, shape and value range, and the caption; for a compactly
    encoded set also the arrays readers decode it into."""
    import numpy as np

    from ..data.sample import SampleError, decode, npy_array
    from ..data.storage import RangeReader, safe_url
    from ..data.tario import parse_sample, split_name

    start, end = shard.offsets[i], shard.offsets[i + 1]
    data = b"".join(bytes(c) for c in RangeReader(shard.url, start, end, storage_options=opts, retries=2))
    where = f"{safe_url(shard.url)} sample #{i}"
    members = parse_sample(data, where)
    key = split_name(members[0].name)[0] if members else "?"
    lines = [f"sample {first + i} of {total}: key {key}, {safe_url(shard.url)} #{i} (bytes {start}-{end})"]
    caption = None
    for member in members:
        _, ext = split_name(member.name)
        size = len(member.data)
        if ext.endswith("npy"):
            arr = npy_array(member.data, f"{where} {member.name}")
            values = arr.astype(np.float64) if arr.size else arr
            stats = (f"  min {values.min():.4g}  max {values.max():.4g}  mean {values.mean():.4g}"
                     if arr.size and arr.dtype.kind in "biuf" else "")
            lines.append(f"  {member.name:<40} {size:>9} B  {arr.dtype}{list(arr.shape)}{stats}")
        elif ext.endswith("json"):
            text = bytes(member.data).decode("utf-8", "replace")
            try:
                meta = json.loads(text)
                caption = meta.get("caption", caption) if isinstance(meta, dict) else caption
                text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
            except json.JSONDecodeError:
                text = f"(not JSON) {text[:200]!r}"
            lines.append(f"  {member.name:<40} {size:>9} B  {text if len(text) <= 300 else text[:297] + '...'}")
        else:
            lines.append(f"  {member.name:<40} {size:>9} B")
    if manifest is not None and not manifest.encoding.is_default:
        try:
            sample = decode(key, {split_name(m.name)[1]: m.data for m in members}, where,
                            feature_dim=manifest.feature_dim, num_classes=manifest.num_classes)
        except SampleError as e:  # the members above are still worth seeing
            lines.append(f"  decoded: {e}")
            sample = None
        for name, arr in (("features", sample.features), ("cls_prob", sample.cls_prob)) if sample else ():
            if arr is not None:
                values = arr.astype(np.float64)
                lines.append(f"  decoded {name:<32} {arr.dtype}{list(arr.shape)}  min {values.min():.4g}  "
                             f"max {values.max():.4g}  mean {values.mean():.4g}  ({manifest.encoding})")
    lines.append(f"caption: {caption if caption is not None else '(none)'}")
    return lines
