"""Task shard builder: public annotations + region-feature shards -> self-contained task shards.

    vilbert-ds shards task --task vqa --data-root data            # all splits of the registry entry
    python -m vilbert_ds.tasks.build --task nlvr2 --splits train,dev --max-count 500

Stages (docs/TASKS.md section 4): read the split's annotations (`TaskFamily.read_annotations`)
-> remove test-split images from train splits (`clean_train_sets`, on by default) -> labels from
the task assets (answer vocabulary built once from the training split) -> streaming join with
the feature shard sets by image id -> tars of at most `max_count` samples, each with a
`.stats.json`, and the set's `manifest.json` (the data area's manifest format, so
`vilbert-ds shards verify` and the streaming loader read task shards as any other set).

The join streams every feature set once. An example waits in memory only until all its image
slots are filled (NLVR2's second image, GT boxes from a second set), so memory is bounded by the
annotations plus the images still awaited, not by the feature sets.

A split directory is written by one build at a time: its old manifest is removed first, and the
new one is written only when the whole split succeeded. A failure, SIGTERM or SIGINT removes the
partial tar and the tars this attempt wrote, so no manifest ever names a partial set (multitask
training reads only sets with a manifest); partial files a killed build left are removed by the
next build of that split.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..data import storage
from ..data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_source, shard_name, stats_name
from ..data.sample import Sample, decode, npy_bytes
from ..data.tario import TarShardWriter, iter_members, split_name
from ..data.writer import BuildInterrupted, cleanup_on_sigterm, local_scratch_dir, remove_stale_partials
from .base import TASK_MEMBER, TaskExample, TaskFamily, describe_asset_source, join_path, slot_member
from .registry import Registry, build_family, load_registry
from .released import TEST_ID_FILES, load_id_list

log = logging.getLogger(__name__)


@dataclass
class TaskBuildConfig:
    splits: list[str] | None = None  # default: the task's train, val and test splits
    max_count: int = 1000  # samples per tar
    clean_train_sets: bool | None = None  # None: the registry's `clean_train_sets.enabled` (on)
    allow_missing: bool = False  # an example whose image is not in the feature set: error, or count and drop
    rebuild_assets: bool = False  # rebuild {shards}/assets.json even if present
    storage_options: dict = field(default_factory=dict)
    progress: bool = True  # a progress bar per split on stderr (only when stderr is a terminal)

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"task build: --max-count must be >= 1, got {self.max_count}")
        if isinstance(self.splits, str):
            self.splits = [s for s in self.splits.split(",") if s]


def feature_set_url(url: str) -> str:
    """A feature source as tasks.yaml names it: a directory (-> its manifest.json), a manifest URL
    or a brace pattern of tar URLs."""
    if url.endswith(".json") or ".tar" in url:
        return url
    return storage.join(url, MANIFEST_NAME)


def iter_feature_samples(url: str, storage_options: dict | None = None) -> Iterator[Sample]:
    """Every sample of a feature shard set, streamed tar by tar (whole-file reads)."""
    manifest = load_source(feature_set_url(url), storage_options)
    for shard in manifest.shards:
        where = storage.safe_url(shard.url)
        with storage.open_url(shard.url, "rb", storage_options) as f:
            key, members = None, {}
            for _, member in iter_members(f, where):
                k, ext = split_name(member.name)
                if key is not None and k != key:
                    yield decode(key, members, f"{where} key {key}", feature_dim=manifest.feature_dim,
                                 num_classes=manifest.num_classes)
                    members = {}
                key = k
                members[ext] = member.data
            if key is not None:
                yield decode(key, members, f"{where} key {key}", feature_dim=manifest.feature_dim,
                             num_classes=manifest.num_classes)


def join_features(examples: Sequence[TaskExample], slots: dict[str, str], sources: dict[str, str],
                  storage_options: dict | None = None) -> tuple[Iterator[tuple[TaskExample, dict[str, Sample]]], dict]:
    """(iterator of (example, {slot: feature sample}), missing) where `missing` is filled, once the
    iterator is exhausted, with {source: [image ids never seen]}.

    slots: image slot -> feature source name; sources: source name -> feature set URL."""
    for slot, source in slots.items():
        if source not in sources:
            raise ValueError(f"image slot {slot or 'main'!r} needs feature source {source!r}; tasks.yaml features has "
                             f"{sorted(sources)}")
    needs: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, ex in enumerate(examples):
        for slot, source in slots.items():
            if slot not in ex.images:
                raise ValueError(f"example {ex.example_id}: no image id for slot {slot or 'main'!r}")
            needs.setdefault((source, str(ex.images[slot])), []).append((i, slot))
    main_source = slots.get("", next(iter(slots.values())))
    order = sorted(set(slots.values()), key=lambda s: s == main_source)  # main source last: others are small
    missing: dict[str, list[str]] = {}

    def run() -> Iterator[tuple[TaskExample, dict[str, Sample]]]:
        pending: dict[int, dict[str, Sample]] = {}
        for source in order:
            for sample in iter_feature_samples(sources[source], storage_options):
                for i, slot in needs.pop((source, str(sample.meta.get("image_id"))), []):
                    got = pending.setdefault(i, {})
                    got[slot] = sample
                    if len(got) == len(slots):
                        yield examples[i], pending.pop(i)
        for (source, image_id) in needs:
            missing.setdefault(source, []).append(image_id)

    return run(), missing


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sample_members(task: str, split: str, example: TaskExample, images: dict[str, Sample]) -> list[tuple[str, bytes]]:
    """The tar members of one task sample (docs/TASKS.md section 3), main image first."""
    members: list[tuple[str, bytes]] = []
    for slot in sorted(images, key=lambda s: (s != "", s)):
        img = images[slot]
        meta = {k: v for k, v in img.meta.items() if k != "caption"}
        members += [(slot_member(slot, "json"), _json_bytes(meta)),
                    (slot_member(slot, "features.npy"), npy_bytes(img.features)),
                    (slot_member(slot, "boxes.npy"), npy_bytes(img.boxes))]
    record = {"task": task, "split": split, "example_id": example.example_id, "image_ids": example.images,
              **example.payload}
    members.append((TASK_MEMBER, _json_bytes(record)))
    return members


class _Hashing:
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)


class TaskSetWriter:
    """Writes samples into `{output}/{prefix}-NNNNNN.tar` (+ `.stats.json`), `max_count` per tar,
    then `manifest.json`. Each tar is written locally and moved/uploaded whole. Opening removes
    the split's old manifest and the partial files a killed build left; `abort()` removes the
    split's tars (no manifest); `close()` writes the manifest and removes tars of an older,
    larger build."""

    def __init__(self, output: str, prefix: str, max_count: int, storage_options: dict | None = None):
        self.output, self.prefix, self.max_count = output, prefix, max_count
        self.storage_options = storage_options or {}
        self.shards: list[ShardInfo] = []
        self.keys: set[str] = set()
        self.boxes: list[int] = []
        self._tmp: str | None = None
        self._scratch = local_scratch_dir(output)
        os.makedirs(self._scratch, exist_ok=True)
        removed = remove_stale_partials(self._scratch, prefix)
        if removed:
            log.info("%s: removed %d partial file(s) an interrupted build left", output, len(removed))
        self._remove(MANIFEST_NAME)  # from here until close() the split has no manifest
        self._open()

    def _remove(self, name: str) -> None:
        url = storage.join(self.output, name)
        if storage.is_local(url):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(storage.local_path(url))
            return
        fs, path = storage.get_fs(url, self.storage_options)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def _open(self) -> None:
        name = shard_name(self.prefix, len(self.shards))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=self._scratch)
        self._file = os.fdopen(fd, "wb")
        self._hash = _Hashing(self._file)
        self._writer = TarShardWriter(self._hash)
        self._shard_boxes: list[int] = []

    def _discard_tmp(self) -> None:
        if self._tmp is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def write(self, key: str, members: list[tuple[str, bytes]], num_boxes: int) -> None:
        if key in self.keys:
            raise ValueError(f"{self.output}: duplicate sample key {key!r} (two examples with the same id)")
        self.keys.add(key)
        self._writer.write_sample(key, members)
        self._shard_boxes.append(num_boxes)
        if len(self._writer.keys) >= self.max_count:
            self._flush()
            self._open()

    def _flush(self) -> None:
        w = self._writer
        w.close()
        self._file.close()
        name = shard_name(self.prefix, len(self.shards))
        url = storage.join(self.output, name)
        try:
            stats = dict(name=name, index=len(self.shards), count=len(w.keys), bytes=w.pos, sha256=self._hash.sha.hexdigest(),
                         offsets=w.offsets, keys=w.keys, feature_dim=2048, num_classes=None,
                         regions=dict(min=min(self._shard_boxes, default=0), max=max(self._shard_boxes, default=0),
                                      sum=sum(self._shard_boxes)), dropped=[])
            storage.put_file(self._tmp, url, self.storage_options)
            storage.write_bytes(stats_name(url), (json.dumps(stats, sort_keys=True) + "\n").encode(), self.storage_options)
        finally:
            self._discard_tmp()
        self.shards.append(ShardInfo(name=name, count=len(w.keys), bytes=w.pos, offsets=w.offsets,
                                     sha256=stats["sha256"]))
        self.boxes.extend(self._shard_boxes)

    def abort(self) -> None:
        """Removes the partial tar and every tar/stats of the split (this attempt's and an older
        build's, which lost its manifest when this one started); no manifest is written."""
        self._discard_tmp()
        self.shards = []
        self._remove_older_shards()

    def _remove_older_shards(self) -> None:
        """Tars/stats of this prefix beyond the ones written (an older build had more)."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d{{6}})\.(?:tar|stats\.json)$")
        try:
            if storage.is_local(self.output):
                names = os.listdir(storage.local_path(self.output))
            else:
                fs, path = storage.get_fs(self.output, self.storage_options)
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return
        for name in names:
            m = pattern.match(name)
            if m is not None and int(m.group(1)) >= len(self.shards):
                self._remove(name)

    def close(self, build: dict[str, Any]) -> str:
        if self._writer.keys or not self.shards:
            self._flush()
        else:
            self._discard_tmp()
        self._remove_older_shards()
        n = max(len(self.boxes), 1)
        manifest = Manifest(shards=self.shards, feature_dim=2048, num_classes=None,
                            regions=dict(min=min(self.boxes, default=0), max=max(self.boxes, default=0),
                                         mean=round(sum(self.boxes) / n, 3)), build=build)
        url = storage.join(self.output, MANIFEST_NAME)
        storage.write_bytes(url, manifest.to_json(), self.storage_options)
        return url


# ------------------------------------------------------------------------------ clean_train_sets
def held_out_image_ids(registry: Registry, domain: str, released: str = "") -> tuple[set[str], list[str]]:
    """Image ids that clean_train_sets removes from the splits of a task of image domain `domain`,
    and notes saying where they come from. In order of preference:
    1. the registry's `clean_train_sets.id_files[domain]` (an .npy or JSON list);
    2. the original's shipped list `{released}/cache/{coco,flickr,genome}_test_ids.npy` when the
       task has a released directory holding it;
    3. derived: the images of the `test` splits of every registry task of the domain.
    A given list replaces the derived ids (the original removes exactly its shipped list)."""
    id_file = registry.clean_id_files.get(domain, "")
    if not id_file and released and domain in TEST_ID_FILES:
        candidate = join_path(join_path(released, "cache"), TEST_ID_FILES[domain])
        if storage.exists(candidate):
            id_file = candidate
    if id_file:
        listed = load_id_list(id_file)
        return set(listed), [f"{id_file}: {len(listed)} ids (the shipped list; replaces the derived test ids)"]
    ids: set[str] = set()
    notes: list[str] = []
    for cfg in registry:
        if cfg.image_domain != domain or not cfg.splits.test:
            continue
        if not cfg.implemented:
            notes.append(f"{cfg.name}: family {cfg.family} not implemented, its test images not read")
            continue
        family = build_family(cfg)
        for split in cfg.splits.test:
            try:
                examples = family.read_annotations(split)
            except FileNotFoundError as exc:
                notes.append(f"{cfg.name}/{split}: annotations unavailable ({exc})")
                continue
            before = len(ids)
            ids.update(str(i) for ex in examples for i in ex.images.values())
            notes.append(f"{cfg.name}/{split}: {len(ids) - before} new test image ids (derived)")
    return ids, notes


def clean_train_split(examples: list[TaskExample], excluded: set[str]) -> tuple[list[TaskExample], int]:
    """Drops examples with any image in `excluded`; returns (kept, number dropped)."""
    kept = [ex for ex in examples if not any(str(i) in excluded for i in ex.images.values())]
    return kept, len(examples) - len(kept)


# ------------------------------------------------------------------------------ driver
def load_or_build_assets(family: TaskFamily, cfg: TaskBuildConfig, registry: Registry | None = None) -> dict[str, Any]:
    """`{shards}/assets.json`: reused when it was built from the source the task asks for now
    (`asset_source`; another task's assets are re-read each time, so a rebuilt VQA label map
    reaches GenomeQA), else (or with --rebuild-assets) built and written."""
    url = join_path(family.config.shards, "assets.json")
    source = family.asset_source()
    stored = None
    if storage.exists(url, cfg.storage_options):
        stored = json.loads(storage.read_bytes(url, cfg.storage_options))
    if source["kind"] == "task":
        if registry is None:
            raise ValueError(f"task {family.name!r} shares the assets of task {source['task']!r}: build it through "
                             f"the registry (vilbert-ds shards task)")
        other = build_family(registry.resolve(source["task"]))
        if other.config.head != family.config.head:
            raise ValueError(f"task {family.name!r} ({family.config.head}) cannot share the label map of task "
                             f"{other.name!r} ({other.config.head}): they are different heads")
        shared = load_or_build_assets(other, TaskBuildConfig(storage_options=cfg.storage_options), registry)
        assets = {**family.shared_assets(other.name, shared), "source": source}
    elif stored is not None and not cfg.rebuild_assets and stored.get("source") == source:
        assets = stored
    else:
        if stored is not None and not cfg.rebuild_assets:
            log.info("task %s: %s was built from %s; rebuilding it from %s", family.name, url,
                     describe_asset_source(stored.get("source", {"kind": "derived"})), describe_asset_source(source))
        train = family.read_annotations(family.config.splits.train) if source["kind"] == "derived" else []
        assets = {**family.build_assets(train), "source": source}
    if assets != stored:
        storage.write_bytes(url, (json.dumps(assets, indent=1, ensure_ascii=False) + "\n").encode(), cfg.storage_options)
    family.set_assets(assets)
    log.info("task %s: assets (%s) from %s", family.name, ", ".join(k for k in assets if k != "source") or "none",
             describe_asset_source(source))
    return assets


def build_split(family: TaskFamily, split: str, cfg: TaskBuildConfig, excluded: set[str] | None) -> dict[str, Any]:
    t0 = time.time()
    tcfg = family.config
    examples = family.read_annotations(split)
    read = len(examples)
    cleaned = 0
    if excluded is not None and family.is_cleaned_split(split):
        examples, cleaned = clean_train_split(examples, excluded)
    if not examples:
        raise ValueError(f"task {tcfg.name!r} split {split!r}: no examples left ({read} read, {cleaned} removed by "
                         f"clean_train_sets)")
    examples = family.finalize_examples(examples, split)
    output = tcfg.split_dir(split)
    writer = TaskSetWriter(output, split, cfg.max_count, cfg.storage_options)
    written: list[TaskExample] = []  # in the order of the set's samples
    try:
        joined, missing = join_features(examples, family.image_slots, tcfg.features, cfg.storage_options)
        with _bar(cfg, len(examples), f"{tcfg.name}/{split}") as bar:
            for example, images in joined:
                writer.write(example.key, sample_members(tcfg.name, split, example, images),
                             int(images[""].features.shape[0]))
                written.append(example)
                bar.update(1)
        n_missing = sum(len(v) for v in missing.values())
        if n_missing and not cfg.allow_missing:
            detail = "; ".join(f"{src} ({tcfg.features[src]}): {sorted(ids)[:10]}{' ...' if len(ids) > 10 else ''}"
                               for src, ids in missing.items())
            raise ValueError(f"task {tcfg.name!r} split {split!r}: {n_missing} image(s) referenced by the annotations "
                             f"are not in the feature sets: {detail} (--allow-missing drops those examples, counted); "
                             f"no manifest written")
    except BaseException:
        writer.abort()  # an error, SIGTERM or SIGINT: no partial set, no manifest
        raise
    summary = dict(task=tcfg.name, split=split, examples_read=read, removed_by_clean_train_sets=cleaned,
                   missing_images=n_missing, dropped_for_missing_images=len(examples) - len(written), samples=len(written),
                   seconds=round(time.time() - t0, 2))
    build_args = dict(format=tcfg.format, family=tcfg.family, annotations=tcfg.annotations, features=tcfg.features,
                      max_count=cfg.max_count, assets_source=family.assets.get("source", {"kind": "derived"}),
                      **{k: v for k, v in summary.items() if k != "seconds"})
    try:
        summary["manifest"] = writer.close(build_args)
    except BaseException:
        writer.abort()
        raise
    family.split_written(split, written, output, cfg.storage_options)
    log.info("task %s split %s: %d samples (%d annotations, %d removed by clean_train_sets, %d missing images)",
             tcfg.name, split, len(written), read, cleaned, n_missing)
    return summary


def _bar(cfg: TaskBuildConfig, total: int, desc: str):
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal
    return tqdm(total=total, unit="example", desc=desc, file=sys.stderr, disable=None if cfg.progress else True,
                dynamic_ncols=True)


def build_task(registry: Registry, task: str, cfg: TaskBuildConfig | None = None) -> dict[str, Any]:
    """Builds the task shards of one task; returns (and writes to `{shards}/build.json`) a summary."""
    cfg = cfg or TaskBuildConfig()
    tcfg = registry.resolve(task)
    family = build_family(tcfg)
    splits = cfg.splits or tcfg.splits.all()
    clean = registry.clean_train_sets if cfg.clean_train_sets is None else cfg.clean_train_sets
    family.clean_train_sets = bool(clean)
    assets = load_or_build_assets(family, cfg, registry)
    excluded, notes = (held_out_image_ids(registry, tcfg.image_domain, tcfg.released)
                       if clean and any(family.is_cleaned_split(s) for s in splits) else (None, []))
    for note in notes:
        log.info("task %s: clean_train_sets: %s", tcfg.name, note)
    summaries = [build_split(family, split, cfg, excluded) for split in splits]
    report = dict(task=tcfg.name, splits=summaries, clean_train_sets=bool(clean), excluded_test_images=len(excluded or ()),
                  clean_notes=notes, assets={k: (len(v) if isinstance(v, list) else v) for k, v in assets.items()},
                  assets_source=describe_asset_source(assets.get("source", {"kind": "derived"})))
    storage.write_bytes(join_path(tcfg.shards, "build.json"), (json.dumps(report, indent=1) + "\n").encode(),
                        cfg.storage_options)
    return report


# ------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, action="append", help="task name/title/id (repeatable, or comma list)")
    p.add_argument("--registry", default=None,
                   help="tasks.yaml (default: DATA_ROOT/tasks.yaml when --data-root has one, as the synthetic task "
                        "writers make; else the packaged registry)")
    p.add_argument("--data-root", default=None, help="replaces {data_root} in tasks.yaml paths")
    p.add_argument("--splits", default=None, help="comma list (default: the task's train, val and test splits)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per tar (default: %(default)s)")
    p.add_argument("--no-clean-train-sets", action="store_true", help="keep test-split images in train splits")
    p.add_argument("--allow-missing", action="store_true", help="drop (and count) examples whose image has no features")
    p.add_argument("--rebuild-assets", action="store_true", help="rebuild the answer vocabulary / task assets")
    p.add_argument("--released", default=None, metavar="DIR",
                   help="the original's unpacked datasets.tar.gz (holding VQA/, gqa/, visual_genome/, cocoRetreival/, "
                        "...): its label maps, hard-negative pools and test-id lists replace the derived ones")


def registry_path(registry: str | None, data_root: str | None) -> str | None:
    """--registry, else DATA_ROOT/tasks.yaml when it exists, else None (the packaged registry)."""
    if registry is None and data_root is not None and os.path.isfile(os.path.join(data_root, "tasks.yaml")):
        registry = os.path.join(data_root, "tasks.yaml")
        log.info("using the registry %s (the one in --data-root; pass --registry to choose another)", registry)
    return registry


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    prog = "vilbert-ds shards task"
    try:
        with cleanup_on_sigterm():
            return _main(args)
    except (ValueError, KeyError, OSError) as e:  # refused input: a bad registry, annotations, missing features
        print(f"{prog}: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except BuildInterrupted as e:
        print(f"{prog}: stopped by {e.signame}; the split in progress was removed (no manifest), rerun to build it",
              file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (SIGINT); the split in progress was removed (no manifest), rerun to build it",
              file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    registry = load_registry(registry_path(args.registry, args.data_root), data_root=args.data_root,
                             released_root=getattr(args, "released", None))
    cfg = TaskBuildConfig(splits=args.splits, max_count=args.max_count,
                          clean_train_sets=False if args.no_clean_train_sets else None,
                          allow_missing=args.allow_missing, rebuild_assets=args.rebuild_assets,
                          progress=not getattr(args, "quiet", False))
    names = [n for spec in args.task for n in spec.split(",") if n]
    for name in names:
        report = build_task(registry, name, cfg)
        for s in report["splits"]:
            print(f"{s['task']}/{s['split']}: {s['samples']} samples ({s['examples_read']} examples read, "
                  f"{s['removed_by_clean_train_sets']} removed by clean_train_sets, {s['missing_images']} missing images) "
                  f"-> {s['manifest']}")
        print(f"{report['task']}: assets from {report['assets_source']}; clean_train_sets: "
              f"{'; '.join(report['clean_notes']) or 'off'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.tasks.build", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    sys.exit(main(parser.parse_args()))
