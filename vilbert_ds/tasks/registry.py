"""The task registry: `vilbert_ds/configs/tasks.yaml` -> typed `TaskConfig`s, and the explicit
dict family name -> family class.

    registry = load_registry(data_root="data")          # {name: TaskConfig}
    cfgs = select_tasks(registry, "vqa,gqa,nlvr2")       # names, titles, ids or TASKn; "," or "-"
    family = build_family(cfgs[0], tokenizer)            # a TaskFamily object for that task

Adding a task: write its family (or a new `format` of an existing family), add the class to
FAMILIES below if it is a new family, and add one YAML entry.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Mapping

import yaml

from .base import TaskFamily
from .pointing import PointingFamily
from .refer import ReferFamily
from .retrieval import RetrievalFamily
from .vcr import VCRFamily
from .vl_binary import VLBinaryFamily
from .vl_classifier import VLClassifierFamily
from .vl_tri import VLTriFamily

# family name (the `family:` key of a task) -> implementation. Families named in tasks.yaml but
# absent here (visdial, foil, flickr_grounding, and those still being written) are listed by
# `load_registry` and refused with a clear message by `build_family`.
FAMILIES: dict[str, type[TaskFamily]] = {
    "vl_classifier": VLClassifierFamily,
    "vl_tri": VLTriFamily,
    "vl_binary": VLBinaryFamily,
    "refer": ReferFamily,
    "pointing": PointingFamily,
    "retrieval": RetrievalFamily,
    "vcr": VCRFamily,
}

HEADS = ("vil_prediction", "vil_prediction_gqa", "vil_binary_prediction", "vil_logit", "vil_tri_prediction",
         "vision_logit")
LOSSES = ("bce", "ce")
MAX_TASK_ID = 19  # the task-embedding table has 20 rows (num_task_tokens)


@dataclass
class TaskSplits:
    train: str
    val: str
    test: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.test, str):
            self.test = [self.test]
        self.test = list(self.test)

    def all(self) -> list[str]:
        return list(dict.fromkeys([self.train, self.val, *self.test]))


@dataclass
class TaskConfig:
    """One task of tasks.yaml. Sizes: `batch_size`/`eval_batch_size` are global examples per
    update/evaluation batch; `max_seq_length` counts [CLS]/[SEP]; `max_region_num` counts the
    global region (100 detected boxes + 1 = 101)."""

    name: str
    title: str
    id: int
    type: str
    family: str
    format: str
    head: str
    num_labels: int
    max_seq_length: int
    batch_size: int
    lr: float
    splits: TaskSplits
    image_domain: str
    annotations: str
    features: dict[str, str]
    shards: str
    loss: str = "bce"
    max_region_num: int = 101
    eval_batch_size: int = 1024
    num_epoch: int = 20
    twelve_in_one: bool = False
    # the task's directory in the original's released `datasets.tar.gz` layout (its `dataroot`,
    # e.g. datasets/VQA): label maps, hard-negative pools and test-id lists are read from there
    # instead of being derived; "" = derive them (`released_root` empty)
    released: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.splits, Mapping):
            self.splits = TaskSplits(**self.splits)
        where = f"tasks.yaml task {self.name!r}"
        errors = []
        if not 1 <= self.id <= MAX_TASK_ID:
            errors.append(f"id={self.id} must be within [1, {MAX_TASK_ID}] (it indexes the task-token table)")
        if self.head not in HEADS:
            errors.append(f"head={self.head!r}: choose one of {HEADS}")
        if self.loss not in LOSSES:
            errors.append(f"loss={self.loss!r}: choose one of {LOSSES}")
        for key in ("num_labels", "max_seq_length", "batch_size", "eval_batch_size", "num_epoch"):
            if int(getattr(self, key)) < 1:
                errors.append(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_seq_length < 3:
            errors.append(f"max_seq_length={self.max_seq_length} leaves no room for text between [CLS] and [SEP]")
        if self.max_region_num < 2:
            errors.append(f"max_region_num={self.max_region_num} must count the global region plus >= 1 box")
        if not self.lr > 0:
            errors.append(f"lr={self.lr} must be > 0")
        if "regions" not in self.features:
            errors.append(f"features={self.features} must name a 'regions' source")
        if errors:
            raise ValueError(f"{where}: " + "; ".join(errors))

    @property
    def implemented(self) -> bool:
        return self.family in FAMILIES

    def split_dir(self, split: str) -> str:
        """Where the shards of one split live: {shards}/{split}."""
        return f"{self.shards.rstrip('/')}/{split}"


def default_registry_path() -> str:
    return str(resources.files("vilbert_ds") / "configs" / "tasks.yaml")


def _substitute(value: Any, data_root: str, released_root: str = "") -> Any:
    """`{data_root}` and `{released_root}` in strings; a string naming `{released_root}` while
    it is empty becomes "" (no released files)."""
    if isinstance(value, str):
        if "{released_root}" in value:
            if not released_root:
                return ""
            value = value.replace("{released_root}", released_root.rstrip("/"))
        return value.replace("{data_root}", data_root)
    if isinstance(value, dict):
        return {k: _substitute(v, data_root, released_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, data_root, released_root) for v in value]
    return value


@dataclass
class Registry:
    """All tasks of one registry file, plus its clean_train_sets section."""

    tasks: dict[str, TaskConfig]
    clean_train_sets: bool = True
    clean_id_files: dict[str, str] = field(default_factory=dict)  # image domain -> id list replacing the derived one
    path: str = ""
    data_root: str = "data"
    released_root: str = ""  # the original's unpacked datasets.tar.gz ("" = derive every asset)

    def __getitem__(self, name: str) -> TaskConfig:
        return self.resolve(name)

    def __iter__(self):
        return iter(self.tasks.values())

    def resolve(self, spec: str) -> TaskConfig:
        """A task by key ('vqa'), original title ('VQA', 'refcoco+'), id ('1') or 'TASK1'."""
        s = str(spec).strip()
        if s in self.tasks:
            return self.tasks[s]
        number = s[4:] if s.upper().startswith("TASK") else s
        for cfg in self.tasks.values():
            if cfg.title.lower() == s.lower() or (number.isdigit() and cfg.id == int(number)):
                return cfg
        raise KeyError(f"unknown task {spec!r} in {self.path}; known: {', '.join(self.tasks)}")

    def twelve_in_one(self) -> list[TaskConfig]:
        return [cfg for cfg in self.tasks.values() if cfg.twelve_in_one]


def load_registry(path: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  released_root: str | os.PathLike | None = None) -> Registry:
    """Read tasks.yaml (the packaged one by default); `{data_root}` in paths is replaced by
    `data_root` (default: the file's `data_root`), `{released_root}` by `released_root` (default:
    the file's; empty = no released files). `overrides` = {task: {key: value}}."""
    path = os.fspath(path) if path is not None else default_registry_path()
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if "tasks" not in raw or not isinstance(raw["tasks"], dict):
        raise ValueError(f"{path}: no 'tasks:' mapping")
    root = os.fspath(data_root) if data_root is not None else str(raw.get("data_root", "data"))
    released = os.fspath(released_root) if released_root is not None else str(raw.get("released_root") or "")
    released = released.replace("{data_root}", root)
    defaults = raw.get("defaults", {}) or {}
    known = {f.name for f in fields(TaskConfig)}
    tasks: dict[str, TaskConfig] = {}
    ids: dict[int, str] = {}
    for name, entry in raw["tasks"].items():
        entry = {**defaults, **(entry or {}), **((overrides or {}).get(name, {}))}
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: task {name!r} has unknown keys {sorted(unknown)}; known: {sorted(known - {'name'})}")
        try:
            cfg = TaskConfig(name=name, **_substitute(entry, root, released))
        except TypeError as exc:  # a required key missing
            raise ValueError(f"{path}: task {name!r}: {exc}") from None
        if cfg.id in ids:
            raise ValueError(f"{path}: tasks {ids[cfg.id]!r} and {name!r} share id {cfg.id}")
        ids[cfg.id] = name
        tasks[name] = cfg
    clean = raw.get("clean_train_sets", {}) or {}
    return Registry(
        tasks=tasks,
        clean_train_sets=bool(clean.get("enabled", True)),
        clean_id_files={k: v for k, v in _substitute(dict(clean.get("id_files", {}) or {}), root, released).items() if v},
        path=path,
        data_root=root,
        released_root=released,
    )


def select_tasks(registry: Registry, spec: str | list[str]) -> list[TaskConfig]:
    """'vqa,gqa' or '1-2-15' or ['vqa', 'TASK15'] or 'twelve_in_one' -> TaskConfigs in that order."""
    if isinstance(spec, str):
        if spec.strip() in ("12in1", "twelve_in_one", "all12"):
            return registry.twelve_in_one()
        # the original's "1-2-15" style takes ids only; names may contain "-" (VCR_Q-A)
        separators = r"[,\-]" if re.fullmatch(r"[\d,\-\s]+", spec) else r","
        parts = [p for p in re.split(separators, spec) if p.strip()]
    else:
        parts = list(spec)
    cfgs = [registry.resolve(p) for p in parts]
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"task list {spec!r} names a task twice: {names}")
    return cfgs


def family_class(cfg: TaskConfig) -> type[TaskFamily]:
    if cfg.family not in FAMILIES:
        raise NotImplementedError(
            f"task {cfg.name!r} ({cfg.title}) uses family {cfg.family!r}, which has no implementation in "
            f"vilbert_ds/tasks/registry.py FAMILIES (implemented: {', '.join(FAMILIES)})"
        )
    cls = FAMILIES[cfg.family]
    if cfg.format not in cls.formats:
        raise ValueError(f"task {cfg.name!r}: family {cfg.family!r} reads formats {cls.formats}, not {cfg.format!r}")
    return cls


def build_family(cfg: TaskConfig, tokenizer: Any = None) -> TaskFamily:
    return family_class(cfg)(cfg, tokenizer)
