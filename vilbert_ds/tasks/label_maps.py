"""What the answer heads' output units mean, carried with a model: `label_maps.json`.

A classifier head is only a vector of logits; which answer unit k stands for is decided by the
label map the model was trained with. A model directory (`config.json` + `model.safetensors`)
carries it as `label_maps.json` beside them:

    {"format": "vilbert-ds label maps", "version": 1,
     "tasks": {"vqa": {"head": "vil_prediction", "answers": ["yes", "no", ...], "source": "..."},
               "gqa": {"head": "vil_prediction_gqa", ...}, ...}}

Written by `vilbert-ds convert ORIGINAL.bin DIR --label-maps DATASETS` (the original's released
`trainval_label2ans.pkl` files, read safely: `released.py`) and by training runs (the task
shards' label maps, `{run}/label_maps.json`, copied by `vilbert-ds export`). `vilbert-ds eval`
reads it from the model / run directory, so predictions name the answers the model means even
when the task shards were built with another label map. A task without its own entry uses the
entry of the task it shares its head with (`options.answers_from`: GenomeQA -> VQA).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from .base import TaskFamily, describe_asset_source
from .registry import Registry, load_registry
from .released import LABEL2ANS, load_label_map

log = logging.getLogger(__name__)

LABEL_MAPS_NAME = "label_maps.json"
FORMAT = "vilbert-ds label maps"


def classifier_tasks(registry: Registry) -> list:
    return [cfg for cfg in registry if cfg.family == "vl_classifier"]


def released_label_maps(datasets_dir: str | os.PathLike, registry: Registry | None = None) -> dict[str, dict[str, Any]]:
    """The label maps found in the original's datasets layout (`VQA/cache/trainval_*.pkl`,
    `gqa/cache/...`, `visual_genome/cache/...`), by task name. An error names the paths tried
    when none is there."""
    registry = registry or load_registry(released_root=os.fspath(datasets_dir))
    maps: dict[str, dict[str, Any]] = {}
    tried = []
    for cfg in classifier_tasks(registry):
        if not cfg.released:
            continue
        path = f"{cfg.released.rstrip('/')}/{LABEL2ANS}"
        if not os.path.exists(path):
            tried.append(path)
            continue
        answers, files = load_label_map(cfg.released)
        maps[cfg.name] = {"head": cfg.head, "answers": answers, "source": f"released {files[1]}"}
    if not maps:
        raise FileNotFoundError(f"{datasets_dir}: no released label map (tried {', '.join(tried) or 'no task'}); give the "
                                f"directory holding the original's VQA/, gqa/, visual_genome/ folders")
    return maps


def check_head_widths(maps: Mapping[str, Mapping[str, Any]], widths: Mapping[str, int], where: str) -> None:
    """Every map fits its head: `widths` = {head: output units} of the model."""
    for task, entry in maps.items():
        width = widths.get(entry["head"])
        if width is None:
            raise ValueError(f"{where}: task {task!r} needs head {entry['head']}, which the model does not have")
        if len(entry["answers"]) > width:
            raise ValueError(f"{where}: task {task!r} has {len(entry['answers'])} answers but head {entry['head']} has "
                             f"{width} outputs")


def write_label_maps(directory: str | os.PathLike, maps: Mapping[str, Mapping[str, Any]]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LABEL_MAPS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "tasks": dict(maps)}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def find_label_maps(path: str | os.PathLike) -> Path | None:
    """`label_maps.json` of a model directory, or of the run owning a run / checkpoint
    directory (`run/checkpoints/stepN` -> `run`)."""
    p = Path(path)
    is_model_dir = (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    for candidate in (p,) if is_model_dir else (p, *list(p.parents)[:2]):
        if (candidate / LABEL_MAPS_NAME).is_file():
            return candidate / LABEL_MAPS_NAME
    return None


def read_label_maps(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tasks of a `label_maps.json`, checked (an error names the file)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable label map file ({exc})") from None
    tasks = raw.get("tasks") if isinstance(raw, dict) and raw.get("format") == FORMAT else None
    if not isinstance(tasks, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("head"), str) and isinstance(e.get("answers"), list)
            and all(isinstance(a, str) for a in e["answers"]) for e in tasks.values()):
        raise ValueError(f"{path}: expected {{'format': {FORMAT!r}, 'tasks': {{task: {{'head', 'answers': [str]}}}}}}")
    return tasks


def family_label_maps(families: Mapping[str, TaskFamily]) -> dict[str, dict[str, Any]]:
    """The label maps of the classifier families a run trains (their task shards' assets)."""
    maps = {}
    for name, family in families.items():
        answers = getattr(family, "head_answers", None)
        if answers is not None:
            source = describe_asset_source(family.assets.get("source", {"kind": "derived"}))
            maps[name] = {"head": family.config.head, "answers": list(answers),
                          "source": f"task shards {family.config.shards} ({source})"}
    return maps


def write_run_label_maps(run_dir: str | os.PathLike, families: Mapping[str, TaskFamily], init_from: str = "") -> None:
    """A training run's `label_maps.json` (what its heads will mean), and a warning when the
    model it starts from was trained with another answer order (its head is re-learnt)."""
    maps = family_label_maps(families)
    if not maps:
        return
    if init_from:
        found = find_label_maps(init_from)
        if found is not None:
            before = read_label_maps(found)
            for task, entry in maps.items():
                old = before.get(task)
                if old is not None and old["answers"] != entry["answers"]:
                    log.warning("task %s: %s gives head %s another answer order than the task shards (%s); training "
                                "re-learns the head. Build the shards with the model's label maps (vilbert-ds shards "
                                "task --released ...) to keep it", task, found, entry["head"], entry["source"])
    write_label_maps(run_dir, maps)


def use_model_label_maps(family: TaskFamily, model_path: str | os.PathLike) -> str | None:
    """Applies the model's `label_maps.json` (if any) to a classifier family; returns the note
    saying which label map names the predictions (None for other families)."""
    if not hasattr(family, "set_head_answers"):
        return None
    found = find_label_maps(model_path)
    if found is None:
        note = f"{family.label_map_note()}; {model_path} has no {LABEL_MAPS_NAME}"
    else:
        maps = read_label_maps(found)
        entry = maps.get(family.name) or maps.get(getattr(family.options, "answers_from", "") or "")
        if entry is None:
            note = f"{family.label_map_note()}; {found} has no label map for task {family.name}"
        else:
            if entry["head"] != family.config.head:
                raise ValueError(f"{found}: the label map for task {family.name} is for head {entry['head']}, the task "
                                 f"uses {family.config.head}")
            family.set_head_answers(entry["answers"], f"{found} ({entry.get('source', 'no source given')})")
            note = family.label_map_note()
    log.info("task %s: %s", family.name, note)
    return note
