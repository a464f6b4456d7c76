"""One way to get a ViLBERT with weights, for training, evaluation and export.

    get_model("", config="tiny")                          # fresh (preset or original-format JSON)
    get_model("", config="tiny", text_from="minilm")      # fresh, text stream from a local HF BERT
    get_model("models/vilbert_cc")                        # a vilbert-ds model directory
    get_model("multi_task_model.bin", config="bert_base_6layer_6conect.json")   # an original checkpoint
    get_model("runs/multitask")                           # a training run / checkpoint: its fp32 weights

`overrides` change the config of whatever is loaded (e.g. `with_task_heads=True`);
`allow_missing` names key prefixes the weights may lack, left at a fresh initialisation (a
pretrained model's task heads and task tokens when a task run starts from it: `TASK_PARTS`).
Training checkpoints are consolidated by `checkpoint.load_consolidated` (the same code as
`vilbert-ds export`). `model_config` gives the config `get_model` would build, without building. `freeze_text_layers`
is the original's `--freeze N`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file

from .engine import is_text_stream
from .model import ViLBert, ViLBertConfig, resolve_config
from .weights import (CONFIG_NAME, HF_TEXT_CONFIG_KEYS, TASK_EMBEDDINGS, TASK_HEAD_PREFIXES, WEIGHTS_NAME,
                      CheckpointError, config_from_hf_bert, from_original, load_hf_bert, load_into)

log = logging.getLogger(__name__)

TASK_PARTS = (*TASK_HEAD_PREFIXES, TASK_EMBEDDINGS)  # what a pretraining model lacks for the 12-in-1 tasks
ORIGINAL_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def source_kind(source: str | os.PathLike) -> str:
    """"fresh" | "model_dir" (config.json + model.safetensors) | "original" (a weights file) |
    "checkpoint" (a training run, its checkpoints/ or one checkpoint directory)."""
    if not source:
        return "fresh"
    p = Path(source)
    if p.is_file() and p.name.endswith(ORIGINAL_SUFFIXES):
        return "original"
    if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
        return "model_dir"
    if p.is_dir():
        return "checkpoint"
    raise CheckpointError(f"{source}: not a model directory, an original checkpoint file ({', '.join(ORIGINAL_SUFFIXES)}) "
                          "or a training run / checkpoint directory")


def model_config(source: str | os.PathLike = "", *, config: Any = "base_6layer_6conect", overrides: dict | None = None,
                 text_from: str = "") -> ViLBertConfig | None:
    """The config `get_model` builds for the same arguments, without building a model or reading
    weights (a resume compares it with the checkpoint's before any process group starts). None
    for an original checkpoint file: its keys decide its heads."""
    overrides = dict(overrides or {})
    kind = source_kind(source)
    if kind == "fresh":
        return _text_config(text_from, config, overrides)[1] if text_from else resolve_config(config, **overrides)
    if kind == "original":
        return None
    if kind == "model_dir":
        cfg = ViLBertConfig.from_json(Path(source) / CONFIG_NAME)
    else:
        from .checkpoint import META, find_checkpoint, read_meta

        directory, tag = find_checkpoint(source)
        cfg = ViLBertConfig.from_dict(read_meta(directory / tag)["model_config"], source=str(directory / tag / META))
    return cfg.replace(**overrides) if overrides else cfg


def get_model(source: str | os.PathLike = "", *, config: Any = "base_6layer_6conect", overrides: dict | None = None,
              text_from: str = "", allow_missing: Sequence[str] = ()) -> ViLBert:
    """The model of `source` (module docstring); `config` is used by fresh models and original
    checkpoints (which carry none)."""
    overrides = dict(overrides or {})
    kind = source_kind(source)
    missing: bool | list[str] = list(allow_missing) or False
    if kind == "fresh" and text_from:
        path, cfg = _text_config(text_from, config, overrides)
        model = ViLBert(cfg)
        report = load_hf_bert(model, path)
        log.info("text stream initialised from %s (%d tensors kept their init)", path, len(report.missing))
        return model
    if kind == "fresh":
        return ViLBert(resolve_config(config, **overrides))
    if kind == "original":
        heads = overrides.pop("with_task_heads", None)
        model = from_original(source, resolve_config(config, **overrides), allow_missing=missing, task_heads=heads)
        report = model.load_report
    else:
        if kind == "model_dir":
            state, where = load_file(str(Path(source) / WEIGHTS_NAME)), str(Path(source) / WEIGHTS_NAME)
        else:
            from .checkpoint import load_consolidated

            tag_dir, _, state = load_consolidated(source)
            where = str(tag_dir)
        model = ViLBert(model_config(source, overrides=overrides))
        report = load_into(model, state, allow_missing=missing, source=where)
    if report.missing:
        log.info("from %s: %d tensors start fresh (%s ...)", source, len(report.missing), report.missing[:3])
    return model


def freeze_text_layers(model: ViLBert, last: int) -> list[str]:
    """The original's `--freeze N` as it was meant: the text embeddings (word, position, token
    type, LayerNorm; not the task-token table) and text layers 0..`last` get requires_grad=False,
    so no gradient and no optimizer state (`engine.param_groups` leaves them out). `last` = -1
    freezes nothing. Returns the frozen parameter names."""
    frozen = []
    for name, p in model.named_parameters():
        if not is_text_stream(name):
            continue
        layer = name.split(".")[3] if name.startswith("bert.encoder.layer.") else None
        if last >= 0 and (layer is None or int(layer) <= last):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _text_config(text_from: str, config: Any, overrides: dict) -> tuple[Path, ViLBertConfig]:
    """(HF BERT directory, config) of a model whose text stream (and MLM head) comes from a local
    HF BERT directory, as the original started from bert-base-uncased. The text sizes follow that
    checkpoint: overrides of them are dropped (named in the log), the rest of the config stays."""
    if text_from == "minilm":
        from .assets import minilm_dir

        path = minilm_dir()
    else:
        path = Path(text_from)
    overrides = dict(overrides)
    dropped = {k: overrides.pop(k) for k in (*HF_TEXT_CONFIG_KEYS, "num_hidden_layers") if k in overrides}
    if dropped:
        log.info("model.init_text_from=%s sets the text stream's sizes; model.overrides %s not applied", text_from, dropped)
    return path, config_from_hf_bert(path, base=resolve_config(config, **overrides))
