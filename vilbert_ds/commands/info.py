"""`vilbert-ds info CONFIG_OR_DIR`: what a ViLBERT config or checkpoint contains.

Prints parameter counts per part (embeddings, text layers, vision layers, co-attention blocks
with their unused `q_dense*`, poolers, heads), the heads present with their output shapes, the
layer schedule and the analytic forward FLOPs per sample. The model is built on the `meta`
device: shapes only, so even the large config is described instantly and without memory.

CONFIG_OR_DIR is a preset name, an original-format JSON file, a vilbert-ds model directory, or
a checkpoint file (`.bin`/`.pt`/`.safetensors`, original keys; `--config` gives its shapes),
whose keys decide task tokens and task heads, as `vilbert-ds convert` would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from ..model import PRESETS, ViLBert, ViLBertConfig, resolve_config
from ..model.model import PRETRAIN_HEADS, TASK_HEADS
from ..weights import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_state_dict

CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="CONFIG_OR_DIR",
                        help=f"preset ({', '.join(PRESETS)}), original-format JSON, vilbert-ds model directory, "
                             "or an original checkpoint file")
    parser.add_argument("--config", help="config (JSON or preset) for a checkpoint file (default: base_6layer_6conect)")
    parser.add_argument("--task-tokens", action="store_true", help="describe the config with 12-in-1 task tokens")
    parser.add_argument("--text-len", type=int, default=36, help="text tokens per sample for the FLOP count")
    parser.add_argument("--regions", type=int, default=37, help="regions per sample incl. the global one")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


# --------------------------------------------------------------------------- describe
def layer_schedule(cfg: ViLBertConfig) -> str:
    """The order the encoder runs its layers, e.g. for the base config
    `T0..T5 ; C0 ; [T6 V0] C1 ; ... ; [T10 V4] C5 ; V5 ; T11` (T text layer, V vision layer,
    C co-attention block; brackets hold the two streams' independent layers between blocks)."""

    def span(prefix: str, start: int, end: int) -> str:
        if end - start <= 0:
            return ""
        return f"{prefix}{start}" if end - start == 1 else f"{prefix}{start}..{prefix}{end - 1}"

    items, t_start, v_start = [], 0, 0
    for k, (v_end, t_end) in enumerate(zip(cfg.v_biattention_id, cfg.t_biattention_id)):
        t, v = span("T", t_start, t_end), span("V", v_start, v_end)
        if t and v:
            items.append(f"[{t} {v}] C{k}")
        else:
            if t or v:
                items.append(t or v)
            items.append(f"C{k}")
        t_start, v_start = t_end, v_end
    for rest in (span("V", v_start, cfg.v_num_hidden_layers), span("T", t_start, cfg.num_hidden_layers)):
        if rest:
            items.append(rest)
    return " ; ".join(items)


def _count(params: dict[str, torch.nn.Parameter], *prefixes: str, contains: str = "") -> int:
    return sum(p.numel() for n, p in params.items() if n.startswith(prefixes) and contains in n)


def describe(cfg: ViLBertConfig, *, text_len: int = 36, regions: int = 37) -> dict[str, Any]:
    with torch.device("meta"):
        model = ViLBert(cfg)
    params = dict(model.named_parameters())  # the tied MLM decoder is listed once (as word embeddings)
    parts = {
        "text_embeddings": _count(params, "bert.embeddings."),
        "vision_embeddings": _count(params, "bert.v_embeddings."),
        "text_layers": _count(params, "bert.encoder.layer."),
        "vision_layers": _count(params, "bert.encoder.v_layer."),
        "coattention_blocks": _count(params, "bert.encoder.c_layer."),
        "poolers": _count(params, "bert.t_pooler.", "bert.v_pooler."),
        "pretraining_heads": _count(params, "cls."),
        "task_heads": _count(params, *(f"{h}." for h in TASK_HEADS)),
    }
    total = sum(p.numel() for p in params.values())
    assert sum(parts.values()) == total, "a parameter belongs to no part"
    heads = {"text_prediction": ["B", "L", cfg.vocab_size], "vision_prediction": ["B", "R", cfg.v_target_size],
             "seq_relationship": ["B", 2]}
    if cfg.with_task_heads:
        heads.update({"vil_prediction": ["B", cfg.num_vqa_labels], "vil_prediction_gqa": ["B", cfg.num_gqa_labels],
                      "vil_binary_prediction": ["B/2", 2], "vil_logit": ["B", 1], "vil_tri_prediction": ["B", 3],
                      "vision_logit": ["B", "R", 1], "linguisic_logit": ["B", "L", 1]})
    assert set(heads) == set(PRETRAIN_HEADS + (TASK_HEADS if cfg.with_task_heads else ()))
    info: dict[str, Any] = {
        "parameters": {
            "total": total,
            "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
            "unused_q_dense": _count(params, "bert.encoder.c_layer.", contains=".q_dense"),
            "task_embeddings": _count(params, "bert.embeddings.task_embeddings."),
            "parts": parts,
            "per_head": {h: _count(params, f"{h}.") for h in TASK_HEADS if cfg.with_task_heads},
        },
        "heads": heads,
        "task_tokens": cfg.task_specific_tokens,
        "schedule": layer_schedule(cfg),
        "widths": {"text": cfg.hidden_size, "vision": cfg.v_hidden_size, "coattention": cfg.bi_hidden_size},
        "layers": {"text": cfg.num_hidden_layers, "vision": cfg.v_num_hidden_layers,
                   "coattention": len(cfg.v_biattention_id)},
        "frozen": {"text_layers": cfg.fixed_t_layer, "vision_layers": cfg.fixed_v_layer},
        "attention_impl": cfg.attention_impl,
    }
    flops = _flops(cfg, text_len, regions)
    if flops is not None:
        info["flops_per_sample"] = flops
    return info


def _flops(cfg: ViLBertConfig, text_len: int, regions: int) -> dict[str, Any] | None:
    """Analytic FLOPs from the trainer's `vilbert_ds.metrics.vilbert_flops`, when present."""
    try:
        from ..metrics import vilbert_flops
    except ImportError:
        return None
    count = vilbert_flops(cfg, text_len=text_len, regions=regions, task_token=cfg.task_specific_tokens,
                          masked_tokens=0.15 * text_len, masked_regions=0.15 * (regions - 1))
    return {"text_len": text_len, "regions": regions, "forward": count.forward, "train": count.train,
            "parts": dict(count.parts), "assumes": "15% of tokens and regions masked, alignment head"}


# ------------------------------------------------------------------------------ load
def resolve_source(source: str, config: str | None, task_tokens: bool) -> tuple[ViLBertConfig, str]:
    """(config, description of where it came from)."""
    if os.path.isfile(source) and source.endswith(CHECKPOINT_SUFFIXES):
        from ..weights import _infer_heads, _normalise_keys  # the converter's own key rules

        state = _normalise_keys(read_state_dict(source))
        cfg = _infer_heads(resolve_config(config or "base_6layer_6conect"), state)
        what = f"original checkpoint {source} ({len(state)} tensors; shapes from {config or 'base_6layer_6conect'})"
    elif os.path.isdir(source):
        if not os.path.exists(os.path.join(source, CONFIG_NAME)):
            raise FileNotFoundError(f"{source} is a directory without {CONFIG_NAME}: not a vilbert-ds model directory")
        cfg = resolve_config(source)
        has_weights = os.path.exists(os.path.join(source, WEIGHTS_NAME))
        what = f"vilbert-ds model directory {source}" + ("" if has_weights else f" (no {WEIGHTS_NAME})")
    else:
        cfg = resolve_config(source)
        what = f"preset {source}" if source in PRESETS else f"config {source}"
    if task_tokens:
        cfg = cfg.replace(task_specific_tokens=True)
    return cfg, what


def format_text(info: dict[str, Any], what: str) -> str:
    p = info["parameters"]
    lines = [f"{what}", f"schedule   {info['schedule']}",
             "           (T text layer, V vision layer, C co-attention block; [..] run between blocks)",
             f"widths     text {info['widths']['text']}, vision {info['widths']['vision']}, "
             f"co-attention {info['widths']['coattention']}; task tokens {'yes' if info['task_tokens'] else 'no'}"]
    if any(info["frozen"].values()):
        lines.append(f"frozen     first {info['frozen']['text_layers']} text and {info['frozen']['vision_layers']} "
                     "vision layers (no gradients)")
    lines.append("parameters")
    for name, n in p["parts"].items():
        note = ""
        if name == "coattention_blocks":
            note = f"  (incl. {p['unused_q_dense']:,} in unused q_dense1/q_dense2, frozen)"
        elif name == "text_embeddings" and p["task_embeddings"]:
            note = f"  (incl. {p['task_embeddings']:,} task embeddings)"
        elif name == "pretraining_heads":
            note = "  (MLM decoder tied to the word embeddings, counted there)"
        lines.append(f"  {name:<24}{n:>14,}{note}")
    for head, n in p["per_head"].items():
        lines.append(f"    {head:<22}{n:>14,}")
    lines.append(f"  {'total':<24}{p['total']:>14,}")
    lines.append(f"  {'trainable':<24}{p['trainable']:>14,}")
    lines.append("heads      " + ", ".join(f"{h} [{', '.join(map(str, s))}]" for h, s in info["heads"].items()))
    if "flops_per_sample" in info:
        f = info["flops_per_sample"]
        lines.append(f"FLOPs      {f['forward'] / 1e9:.2f} GFLOP forward, {f['train'] / 1e9:.2f} GFLOP train per sample "
                     f"({f['text_len']} tokens, {f['regions']} regions; {f['assumes']})")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        cfg, what = resolve_source(args.source, args.config, args.task_tokens)
        info = describe(cfg, text_len=args.text_len, regions=args.regions)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"vilbert-ds info: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"source": what, **info}, indent=2))
    else:
        print(format_text(info, what))
    return 0
