"""`vilbert-ds shards ...`: build, verify, finalize and inspect feature shards; write synthetic inputs.

    vilbert-ds shards synth  --out DIR --format tsv --images 64
    vilbert-ds shards build  --format tsv --input DIR/features.tsv.0 --captions DIR/captions.json --output OUT
    vilbert-ds shards verify OUT/manifest.json
    vilbert-ds shards manifest --format tsv --input ... --output OUT   # after a SLURM array built every slice

S3 and other object stores: credentials and endpoint come from the usual AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) or from
`--storage-options '{"endpoint_url": ...}'`; they are never written to manifests or logs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..data import synthetic


def _storage_options(args) -> dict:
    opts = json.loads(args.storage_options) if args.storage_options else {}
    if not isinstance(opts, dict):
        raise SystemExit("--storage-options must be a JSON object")
    if getattr(args, "endpoint_url", None):
        opts["endpoint_url"] = args.endpoint_url
    return opts


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default=None, help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL / AWS defaults)")


def _add_input(p: argparse.ArgumentParser) -> None:
    from ..data.formats import FORMATS

    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="input feature format")
    p.add_argument("--input", required=True, nargs="+", help="input file(s) / directory")
    p.add_argument("--captions", default=None, help="{image_id: caption} JSON or Conceptual Captions TSV (caption<TAB>url)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading pickled LMDB values (format lmdb-pickle): unpickling can run arbitrary code, "
                        "use only with files you trust")
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--num-classes", type=int, default=1601, help="cls_prob width of the input")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="build WebDataset shards from region features + captions")
    _add_input(b)
    b.add_argument("--output", required=True, help="output directory: local path, file://, s3://bucket/prefix ...")
    b.add_argument("--prefix", default="shard", help="shard names are PREFIX-000000.tar ...")
    b.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    b.add_argument("--max-bytes", default=None, help="target shard size, e.g. 1GB (sample count derived from it)")
    b.add_argument("--workers", type=int, default=1, help="parallel build processes")
    b.add_argument("--num-slices", type=int, default=1, help="job-array size: build only shards k %% N == slice-index")
    b.add_argument("--slice-index", type=int, default=0, help="this array task's index (SLURM_ARRAY_TASK_ID)")
    b.add_argument("--missing-caption", default="fail", choices=("fail", "skip", "none"),
                   help="image without caption: fail, skip it (counted), or none (no caption: task features)")
    b.add_argument("--on-bad-record", default="fail", choices=("fail", "skip"))
    b.add_argument("--no-progress", action="store_true")
    _add_storage(b)

    m = sub.add_parser("manifest", help="(re)write manifest.json once every shard of a build exists")
    _add_input(m)
    m.add_argument("--output", required=True)
    m.add_argument("--prefix", default="shard")
    m.add_argument("--max-count", type=int, default=1000)
    m.add_argument("--max-bytes", default=None)
    m.add_argument("--missing-caption", default="fail", choices=("fail", "skip", "none"))
    m.add_argument("--on-bad-record", default="fail", choices=("fail", "skip"))
    _add_storage(m)

    v = sub.add_parser("verify", help="read every shard of a manifest; exit 1 on any problem")
    v.add_argument("manifest", help="manifest.json URL (local or s3://...)")
    v.add_argument("--workers", type=int, default=4, help="shards verified in parallel (threads)")
    _add_storage(v)

    s = sub.add_parser("synth", help="write synthetic learnable region features in a real input format")
    synthetic.add_arguments(s)

    from ..tasks import build as task_build  # owned by the tasks area (docs/TASKS.md)

    t = sub.add_parser("task", help="build 12-in-1 task shards: public annotations joined with feature shards")
    task_build.add_arguments(t)


def _builder(args):
    from ..data.formats import Captions, open_input
    from ..data.writer import BuildConfig, ShardBuilder

    kwargs = dict(feature_dim=args.feature_dim, num_classes=args.num_classes)
    if args.trust_pickle:
        kwargs["trust_pickle"] = True
    inp = open_input(args.format, args.input, **kwargs)
    captions = Captions.load(args.captions) if args.captions else None
    cfg = BuildConfig(output=args.output, prefix=args.prefix, max_count=args.max_count, max_bytes=args.max_bytes,
                      workers=getattr(args, "workers", 1), num_slices=getattr(args, "num_slices", 1),
                      slice_index=getattr(args, "slice_index", 0), feature_dim=args.feature_dim,
                      num_classes=args.num_classes, missing_caption=args.missing_caption,
                      on_bad_record=args.on_bad_record, storage_options=_storage_options(args),
                      progress=not getattr(args, "no_progress", True))
    return ShardBuilder(inp, captions, cfg)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..data.config import CredentialsInURLError
    from ..data.formats import InputError
    from ..data.manifest import ManifestError
    from ..data.sample import SampleError

    try:
        return _run(args)
    except (InputError, ManifestError, SampleError, CredentialsInURLError) as e:
        print(f"vilbert-ds shards {args.action}: error: {e}", file=sys.stderr)
        return 2


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
        missing = [k for k in range(builder.num_shards) if not builder.is_done(k)]
        if missing:
            print(f"{len(missing)} of {builder.num_shards} shards are not built yet: "
                  f"{', '.join(builder.shard_url(k) for k in missing[:10])}", file=sys.stderr)
            return 1
        print(builder.write_manifest())
        return 0
    if args.action == "verify":
        from ..data.verify import verify_manifest

        report = verify_manifest(args.manifest, _storage_options(args), workers=args.workers)
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1
    raise SystemExit(f"unknown action {args.action}")
