"""`DataConfig`: where the shards are and how they are streamed, masked and batched.

Every key is YAML-friendly (strings, numbers, lists, dicts). Byte sizes accept integers or
strings with a unit: "256MB" (10^6 bytes), "256MiB" (2^20 bytes), "1.5GB", "4096".
Credentials may be given in `storage_options` (s3fs `key`/`secret`/`token`, ...) but are never
logged: `DataConfig.to_dict(redact=True)` (the form that reaches logs, checkpoints and wandb)
replaces them with "***"; `redact` also removes `user:password@` and presigned-URL signatures
(`X-Amz-Signature`, `sig`, ...) from URLs, and `redact_argv` does the same for a command line.
Credentials inside an object-store URL (`s3://KEY:SECRET@bucket/...`) are refused
(`check_url`): botocore would take them for the bucket name and print them in its errors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}

# Names whose values are secrets wherever they appear: storage options and build arguments
# (key, secret, token, session_token, password, api_key, ...) and the query parameters of
# presigned URLs (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, Signature,
# AWSAccessKeyId, X-Goog-Signature, Azure SAS `sig`). Matched by word, so that `tokenizer` or
# `task_specific_tokens` are not taken for secrets.
_SECRET_WORDS = {"secret", "password", "passwd", "pwd", "token", "credential", "credentials", "signature", "sig",
                 "auth", "authorization", "apikey", "policy"}
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_key(name: str) -> bool:
    """`secret`, `aws_session_token`, `X-Amz-Signature`, `api_key`, `AWSAccessKeyId`: True;
    `tokenizer`, `endpoint_url`, `keep_last`: False."""
    words = [w.lower() for w in _WORD.findall(name)]
    return bool(words) and (any(w in _SECRET_WORDS for w in words) or words[-1] == "key"
                            or (len(words) > 1 and words[-2:] == ["key", "id"]))


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=&#\s]+)=([^&#\s\"']*)")
# Object stores whose bucket names cannot hold "@": user info in these URLs is a credential.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss")


def parse_bytes(value: int | float | str, *, name: str = "size") -> int:
    """`"256MB"` -> 256_000_000, `"64MiB"` -> 67_108_864, `4096` -> 4096."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a byte size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}: byte size must be >= 0, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}: cannot parse byte size {value!r} (use e.g. 256MB, 64MiB, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts/lists/strings) with secret values replaced by "***", user:password@
    removed from URLs and the signing parameters of presigned URLs blanked."""
    if isinstance(obj, dict):
        return {k: ("***" if isinstance(k, str) and is_secret_key(k) and v not in (None, "")
                    and not isinstance(v, bool) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        text = _USERINFO.sub("***@", obj)
        if "=" in text and ("?" in text or "&" in text):
            text = _QUERY_PARAM.sub(lambda m: f"{m.group(1)}=***" if is_secret_key(m.group(1)) else m.group(0),
                                    text)
        return text
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line as it may be recorded (wandb keeps the command of a run): the value of any
    `dotted.key=value` whose last key names a secret (`data.storage_options.secret=...`) becomes
    "***", mappings given inline (`data.storage_options={key: ..., secret: ...}`) are redacted
    key by key, and every URL is redacted as by `redact`."""
    import yaml

    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and is_secret_key(key.rsplit(".", 1)[-1]) and value:
            out.append(f"{key}=***")
            continue
        text = value if eq else arg
        if text.lstrip().startswith(("{", "[")):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, (dict, list)):
                text = json.dumps(redact(parsed))
        out.append(redact(f"{key}={text}" if eq else text))
    return out


def check_url(url: str) -> None:
    """Refuse credentials inside an object-store URL (`s3://KEY:SECRET@bucket/...`), naming the URL
    redacted. botocore would take `KEY:SECRET@bucket` for the bucket name and print it in every
    error; keys belong in storage options or the provider's environment variables."""
    scheme, sep, rest = str(url).partition("://")
    if sep and scheme.lower() in OBJECT_STORE_SCHEMES and "@" in rest.split("/", 1)[0]:
        raise CredentialsInURLError(
            f"{redact(url)}: credentials in a {scheme}:// URL are refused (they would be read as part of the bucket "
            "name and printed in its errors); pass them as storage options (s3fs: key, secret, token) or in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")


class CredentialsInURLError(ValueError):
    """An object-store URL with user:password@ in it."""


@dataclass
class SourceConfig:
    """One shard set: a manifest URL (`.../manifest.json`), or shard URLs with brace ranges
    (`s3://bucket/cc-{000000..000331}.tar`; each tar's `.stats.json` must sit beside it).
    `weight` is the share of the epoch's samples drawn from this source when several are mixed."""

    url: str
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.url, str) or not self.url.strip():
            raise ValueError(f"data source url: expected a non-empty string, got {self.url!r}")
        check_url(self.url)
        if not (self.weight > 0):
            raise ValueError(f"data source {self.url!r}: weight must be > 0, got {self.weight!r}")
        self.weight = float(self.weight)


def _sources(value: Any, key: str) -> str | list[SourceConfig] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, SourceConfig):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        out = []
        for i, item in enumerate(value):
            if isinstance(item, SourceConfig):
                out.append(item)
            elif isinstance(item, str):
                out.append(SourceConfig(url=item))
            elif isinstance(item, dict):
                unknown = set(item) - {"url", "weight"}
                if unknown:
                    raise ValueError(f"data.{key}[{i}]: unknown keys {sorted(unknown)} (expected url, weight)")
                out.append(SourceConfig(**item))
            else:
                raise ValueError(f"data.{key}[{i}]: expected a URL string or {{url, weight}}, got {item!r}")
        return out
    raise ValueError(f"data.{key}: expected a URL string or a non-empty list of sources, got {value!r}")


def _check_writable_dir(path: str, key: str) -> None:
    """`path` is a directory this process can write, or can be created (before any rank starts)."""
    probe = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{key}: {path} is not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: {path} is not writable ({probe}: permission denied)")


@dataclass
class DataConfig:
    """Shard streaming (pretraining and task shards alike) and pretraining preprocessing (the
    original's defaults where it has one). Task runs take their shards from the task registry
    and leave `train`/`val` and the pretraining keys unset."""

    train: str | list[str | SourceConfig] = ""  # manifest URL, shard URL/brace pattern, or [{url, weight}]
    val: str | list[str | SourceConfig] | None = None
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (s3fs: endpoint_url, key, ...)
    vocab: str = ""  # vocab.txt or a tokenizer directory (uncased WordPiece); "" = the local uncased vocab
    caption_pool: str | None = None  # JSON list / {image_id: caption} for negatives; default: the manifest's

    # streaming
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # batches each worker keeps ready
    pin_memory: bool = False
    shuffle: bool = True  # shuffle shard order (per epoch) and samples for `train`
    # samples shuffled together, summed over ranks: each rank shuffles windows of
    # shuffle_buffer // world_size samples (the original: LocallyShuffleData(5000 // world_size));
    # null: a uniformly random order over the whole epoch (one ranged read per sample)
    shuffle_buffer: int | None = 5000
    resampled: bool = False  # draw the epoch's shards with replacement (weighted by sample count)
    epoch_samples: int | None = None  # samples per epoch across all ranks (default: all samples once)
    read_chunk_bytes: int | str = "8MiB"  # size of each read request / readahead chunk
    readahead_chunks: int = 4  # chunks read ahead of the decoder per open shard (0 = none)
    max_retries: int = 6  # per read, for transient object-store / network errors
    retry_backoff_s: float = 0.25  # first backoff; doubles per retry, capped at 8 s
    on_error: str = "fail"  # "fail": raise on an unreadable shard / corrupt sample; "skip": count, substitute
    # node-local shard cache for remote shard sets (data/cache.py): each shard downloaded once per
    # node into cache_dir, and each node keeps the same shards every epoch (when its share fits)
    cache_dir: str | None = None  # a local directory shared by the node's ranks; None: no cache
    cache_bytes: int | str | None = None  # the cache's size bound (required with cache_dir)
    cache_ranks_per_node: int | None = None  # ranks sharing one cache; None: the launcher's ranks per node

    # pretraining preprocessing (vilbert_ds/data/cc_batches.py)
    max_seq_length: int = 36  # tokens incl. [CLS] and [SEP]
    max_regions: int = 36  # detected regions kept per image (+1 global region => 37)
    objective: int = 0  # 0 all losses; 1 no masked modelling on negatives; 2 no negatives
    mask_prob: float = 0.15  # per token and per region
    visual_target: int = 0  # 0: cls_prob KL target [.., 1601]; 1: the unmasked 2048-d feature

    def __post_init__(self):
        self.train = _sources(self.train, "train")
        self.val = _sources(self.val, "val")
        for url in (self.train, self.val, self.caption_pool, self.vocab):
            if isinstance(url, str):
                check_url(url)  # before anything is read: refused with the URL redacted
        if not isinstance(self.storage_options, dict):
            raise ValueError(f"data.storage_options: expected a mapping, got {type(self.storage_options).__name__}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.shuffle_buffer is not None and (isinstance(self.shuffle_buffer, bool) or not isinstance(
                self.shuffle_buffer, int) or self.shuffle_buffer < 1):
            raise ValueError(f"data.shuffle_buffer must be a sample count >= 1 or null (uniform order), "
                             f"got {self.shuffle_buffer!r}")
        self.read_chunk_bytes = parse_bytes(self.read_chunk_bytes, name="data.read_chunk_bytes")
        if self.read_chunk_bytes < 4096:
            raise ValueError(f"data.read_chunk_bytes must be >= 4096, got {self.read_chunk_bytes}")
        if self.readahead_chunks < 0:
            raise ValueError(f"data.readahead_chunks must be >= 0, got {self.readahead_chunks}")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("data.max_retries and data.retry_backoff_s must be >= 0")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"data.epoch_samples must be > 0, got {self.epoch_samples}")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, str) or not self.cache_dir.strip() or "://" in self.cache_dir:
                raise ValueError(f"data.cache_dir must be a local directory, got {self.cache_dir!r}")
            if self.cache_bytes is None:
                raise ValueError("data.cache_bytes: set the cache's size bound (e.g. 200GB) with data.cache_dir")
            _check_writable_dir(self.cache_dir, "data.cache_dir")
        if self.cache_bytes is not None:
            self.cache_bytes = parse_bytes(self.cache_bytes, name="data.cache_bytes")
            if self.cache_bytes <= 0:
                raise ValueError(f"data.cache_bytes must be > 0, got {self.cache_bytes}")
        if self.cache_ranks_per_node is not None and (isinstance(self.cache_ranks_per_node, bool) or not isinstance(
                self.cache_ranks_per_node, int) or self.cache_ranks_per_node < 1):
            raise ValueError(f"data.cache_ranks_per_node must be an integer >= 1 or null, got {self.cache_ranks_per_node!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"data.on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.max_seq_length < 3:
            raise ValueError(f"data.max_seq_length must be >= 3 ([CLS] token [SEP]), got {self.max_seq_length}")
        if self.max_regions < 1:
            raise ValueError(f"data.max_regions must be >= 1, got {self.max_regions}")
        if self.objective not in (0, 1, 2):
            raise ValueError(f"data.objective must be 0, 1 or 2 (as the original), got {self.objective}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.visual_target not in (0, 1):
            raise ValueError(f"data.visual_target must be 0 (cls_prob KL) or 1 (feature regression), got {self.visual_target}")

    def sources(self, split: str) -> list[SourceConfig]:
        """The sources of `split` ("train" or "val") as a list."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        value = self.train if split == "train" else self.val
        if not value:
            raise ValueError(f"data.{split} is not set")
        return [SourceConfig(url=value)] if isinstance(value, str) else list(value)

    def to_dict(self, redact_secrets: bool = True) -> dict[str, Any]:
        """Plain dict for YAML/logs/wandb; secrets redacted unless asked otherwise."""
        d = dataclasses.asdict(self)
        return redact(d) if redact_secrets else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"data: unknown keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)

    def __repr__(self) -> str:  # never print secrets, even by accident
        items = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"DataConfig({items})"
