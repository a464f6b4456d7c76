"""The manifest: the source of truth for a shard set (names, counts, offsets, checksums).

`manifest.json` (one per set) holds, per shard, its name, sample count, byte size, sha256 and
the byte offset of every sample (`offsets`, length count + 1: the last entry is where the
end-of-archive marker starts). `{prefix}-{shard:06d}.stats.json` beside each tar carries the
same shard entry plus the sample keys and region statistics, so a set can also be addressed by
a brace pattern of tar URLs without its manifest.

`encoding` says how the samples store features and cls_prob (data/encoding.py); a manifest
without it (written before compact encodings existed) is float16 throughout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .encoding import Encoding, EncodingError

MANIFEST_FORMAT = "vilbert-ds-shards"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest or stats file that is missing, malformed or inconsistent."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".stats.json" if tar_name.endswith(".tar") else tar_name + ".stats.json"


@dataclass
class ShardInfo:
    """One tar of a set. `url` is absolute (resolved against the manifest's directory)."""

    name: str
    count: int
    bytes: int
    offsets: list[int]
    sha256: str = ""
    url: str = ""

    def __post_init__(self):
        if len(self.offsets) != self.count + 1:
            raise ManifestError(f"shard {self.name}: {len(self.offsets)} offsets for {self.count} samples "
                                f"(expected count + 1)")

    def entry(self) -> dict[str, Any]:
        return dict(name=self.name, count=self.count, bytes=self.bytes, sha256=self.sha256, offsets=self.offsets)

    @property
    def data_bytes(self) -> int:
        return self.offsets[-1] - self.offsets[0]


@dataclass
class Manifest:
    shards: list[ShardInfo]
    feature_dim: int = 2048
    num_classes: int | None = 1601  # cls_prob width; None when the set has no cls_prob
    caption_pool: str | None = None  # URL of the JSON caption list used for negatives
    regions: dict[str, Any] = field(default_factory=dict)  # min/max/mean num_boxes
    build: dict[str, Any] = field(default_factory=dict)  # build arguments (secrets redacted)
    encoding: Encoding = Encoding()  # how samples store features / cls_prob; readers decode either way
    url: str = ""  # where this manifest was read from

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> bytes:
        d = dict(
            format=MANIFEST_FORMAT,
            version=MANIFEST_VERSION,
            num_shards=len(self.shards),
            num_samples=self.num_samples,
            num_bytes=self.num_bytes,
            feature_dim=self.feature_dim,
            num_classes=self.num_classes,
            encoding=self.encoding.to_json(),
            caption_pool=self.caption_pool,
            regions=self.regions,
            build=self.build,
            shards=[s.entry() for s in self.shards],
        )
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, url: str) -> "Manifest":
        try:
            d = json.loads(data)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{storage.safe_url(url)}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            d = d if isinstance(d, dict) else {}
            raise ManifestError(f"{storage.safe_url(url)}: not a vilbert-ds manifest (format={d.get('format')!r})")
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{storage.safe_url(url)}: manifest version {d.get('version')} is not supported "
                                f"(this code reads version {MANIFEST_VERSION})")
        base = storage.dirname(url)
        try:
            shards = [ShardInfo(name=s["name"], count=int(s["count"]), bytes=int(s["bytes"]), offsets=list(s["offsets"]),
                                sha256=s.get("sha256", ""), url=storage.join(base, s["name"])) for s in d["shards"]]
        except KeyError as e:
            raise ManifestError(f"{storage.safe_url(url)}: a shard entry lacks the key {e}") from None
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{storage.safe_url(url)}: malformed shard entry ({e})") from None
        for name, actual in (("num_shards", len(shards)), ("num_samples", sum(s.count for s in shards)),
                             ("num_bytes", sum(s.bytes for s in shards))):
            if name in d and d[name] != actual:
                raise ManifestError(f"{storage.safe_url(url)}: top-level {name} is {d[name]!r} but the shard entries "
                                    f"add up to {actual} (edited or corrupt manifest)")
        pool = d.get("caption_pool")
        return cls(shards=shards, feature_dim=int(d.get("feature_dim", 2048)), num_classes=d.get("num_classes"),
                   caption_pool=storage.join(base, pool) if pool and "://" not in pool and not pool.startswith("/") else pool,
                   regions=d.get("regions", {}), build=d.get("build", {}), encoding=read_encoding(d, url), url=url)


def read_encoding(d: dict[str, Any], url: str) -> Encoding:
    """The `encoding` field of a manifest or shard stats (absent: float16)."""
    try:
        return Encoding.from_json(d.get("encoding"))
    except EncodingError as e:
        raise ManifestError(f"{storage.safe_url(url)}: {e} (written by a newer vilbert-ds?)") from None


def expand_urls(pattern: str) -> list[str]:
    """Brace ranges/alternatives: 'cc-{000000..000002}.tar' -> three URLs."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def load_stats(tar_url: str, storage_options: dict | None = None, **retry) -> dict[str, Any]:
    url = stats_name(tar_url)
    try:
        data = storage.read_bytes(url, storage_options, **retry)
    except FileNotFoundError:
        raise ManifestError(f"{storage.safe_url(url)}: missing; shards addressed by URL pattern need their "
                            f".stats.json beside them (or pass the set's manifest.json)") from None
    except PermissionError as e:
        raise ManifestError(f"{storage.safe_url(url)}: access denied ({e})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{storage.safe_url(url)}: not valid JSON ({e})") from None


def load_source(url: str, storage_options: dict | None = None, **retry) -> Manifest:
    """A manifest URL (`*.json`) or a tar URL / brace pattern resolved through each tar's stats."""
    if url.endswith(".json"):
        try:
            data = storage.read_bytes(url, storage_options, **retry)
        except FileNotFoundError:
            raise ManifestError(f"{storage.safe_url(url)}: manifest not found") from None
        except PermissionError as e:
            raise ManifestError(f"{storage.safe_url(url)}: access denied ({e})") from None
        return Manifest.from_json(data, url)
    urls = expand_urls(url)
    shards, feature_dim, num_classes, pool, encodings = [], 2048, None, None, set()
    for tar_url in urls:
        st = load_stats(tar_url, storage_options, **retry)
        shards.append(ShardInfo(name=st["name"], count=int(st["count"]), bytes=int(st["bytes"]),
                                offsets=list(st["offsets"]), sha256=st.get("sha256", ""), url=tar_url))
        feature_dim = int(st.get("feature_dim", feature_dim))
        num_classes = st.get("num_classes", num_classes)
        encodings.add(read_encoding(st, stats_name(tar_url)))
    # a caption pool beside the shards is used when present (written by `shards build`)
    candidate = storage.join(storage.dirname(urls[0]), "captions.json") if urls else None
    if candidate:
        try:
            if storage.exists(candidate, storage_options):
                pool = candidate
        except Exception:  # noqa: BLE001 - a pool is optional here; the loader reports if it needs one
            pool = None
    if len(encodings) > 1:  # each sample decodes on its own, but a set is one encoding (as its manifest says)
        raise ManifestError(f"{url}: the shards were built with different encodings "
                            f"({'; '.join(sorted(map(str, encodings)))})")
    return Manifest(shards=shards, feature_dim=feature_dim, num_classes=num_classes, caption_pool=pool,
                    encoding=encodings.pop() if encodings else Encoding(), url=url)
