"""`vilbert-ds convert SRC DST`: original ViLBERT checkpoints to vilbert-ds and back.

    vilbert-ds convert multi_task_model.bin out/12in1 --config bert_base_6layer_6conect.json --label-maps datasets
    vilbert-ds convert pretrained_model.bin out/cc --config base_6layer_6conect [--task-heads]
    vilbert-ds convert out/12in1 multi_task_model_again.bin

The direction follows SRC: a file (`.bin`/`.pt` torch pickle read with weights_only, or an
original-key `.safetensors`) becomes a vilbert-ds model directory (`config.json` +
`model.safetensors`); a vilbert-ds directory becomes an original `.bin` state dict that the
original code loads as is (the tied MLM decoder written out as its own tensor, as the original
saves it). Task tokens and task heads are read from the checkpoint's keys. Missing, unexpected
or mis-shaped keys are errors naming the keys; `--allow-missing` leaves missing keys at a fresh
init and lists them. Errors print one line and exit with status 2.

`--label-maps DIR` (DIR = the original's unpacked `datasets.tar.gz`, holding `VQA/`, `gqa/`,
`visual_genome/`): the released `cache/trainval_label2ans.pkl` answer orders the checkpoint's
classifier heads were trained with go into `DST/label_maps.json` (read with the restricted
unpickler of `tasks/released.py`), so `vilbert-ds eval` names the answers the model means.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..weights import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, from_original, load_model, save_model,
                       to_original)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="original checkpoint file, or a vilbert-ds model directory")
    parser.add_argument("dst", metavar="DST", help="vilbert-ds model directory, or the original .bin to write")
    parser.add_argument("--config", help="original-format JSON config or preset name; required for an original SRC")
    parser.add_argument("--allow-missing", action="store_true",
                        help="leave keys missing from SRC at a fresh random init (they are listed)")
    parser.add_argument("--task-heads", action="store_true",
                        help="add freshly initialised 12-in-1 task heads to a pretraining checkpoint")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    parser.add_argument("--label-maps", metavar="DIR", default=None,
                        help="the original's datasets directory (VQA/, gqa/, visual_genome/ with cache/trainval_*.pkl): "
                             "its answer label maps are written to DST/label_maps.json")


class UsageError(ValueError):
    pass


def _is_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME))


def to_vilbert_ds(args: argparse.Namespace) -> str:
    if not args.config:
        raise UsageError("--config is required to convert an original checkpoint: the original-format JSON it was "
                         "trained with (e.g. bert_base_6layer_6conect.json) or a preset name")
    dst = Path(args.dst)
    if (dst / WEIGHTS_NAME).exists() and not args.force:
        raise UsageError(f"{dst / WEIGHTS_NAME} exists; pass --force to overwrite it")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} exists and is not a directory")
    model = from_original(args.src, args.config, allow_missing=args.allow_missing,
                          task_heads=True if args.task_heads else None)
    maps = None
    if getattr(args, "label_maps", None):
        from ..tasks.label_maps import check_head_widths, released_label_maps

        if not model.config.with_task_heads:
            raise UsageError(f"--label-maps: {args.src} has no task heads (a pretraining checkpoint)")
        maps = released_label_maps(args.label_maps)
        check_head_widths(maps, {"vil_prediction": model.config.num_vqa_labels,
                                 "vil_prediction_gqa": model.config.num_gqa_labels}, args.label_maps)
    save_model(model, dst)
    cfg = model.config
    lines = [f"wrote {dst}/{{{CONFIG_NAME},{WEIGHTS_NAME}}} from {args.src}: "
             f"{len(model.state_dict()) - 1} tensors, task tokens {'yes' if cfg.task_specific_tokens else 'no'}, "
             f"task heads {'yes' if cfg.with_task_heads else 'no'}"]
    if maps is not None:
        from ..tasks.label_maps import write_label_maps

        path = write_label_maps(dst, maps)
        lines.append(f"wrote {path}: " + ", ".join(f"{t} ({len(e['answers'])} answers, {e['source']})" for t, e in maps.items()))
    report = model.load_report
    if report.missing:
        lines.append(f"{len(report.missing)} keys not in {args.src}, left at a fresh random init:")
        lines += [f"  {k}" for k in report.missing]
    if report.dropped:
        lines.append(f"{len(report.dropped)} keys of {args.src} not used:")
        lines += [f"  {k}" for k in report.dropped]
    return "\n".join(lines)


def to_original_file(args: argparse.Namespace) -> str:
    if args.config or args.allow_missing or args.task_heads or getattr(args, "label_maps", None):
        raise UsageError("--config, --allow-missing, --task-heads and --label-maps apply to original -> vilbert-ds "
                         "conversions; "
                         f"{args.src} is a vilbert-ds directory")
    dst = Path(args.dst)
    if dst.exists() and not args.force:
        raise UsageError(f"{dst} exists; pass --force to overwrite it")
    if dst.is_dir():
        raise UsageError(f"{dst} is a directory; give the .bin file to write")
    model = load_model(args.src)
    state = to_original(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, dst)
    return (f"wrote {dst}: {len(state)} tensors in the original layout (load with the original code's "
            f"BertConfig.from_json_file({Path(args.src) / CONFIG_NAME}))")


def main(args: argparse.Namespace) -> int:
    try:
        if _is_model_dir(args.src):
            message = to_original_file(args)
        elif os.path.isdir(args.src):
            raise UsageError(f"{args.src} is a directory without {CONFIG_NAME}: give an original checkpoint file "
                             "or a vilbert-ds model directory")
        else:
            message = to_vilbert_ds(args)
    except (OSError, ValueError, CheckpointError) as e:  # CheckpointError and UsageError are ValueErrors
        print(f"vilbert-ds convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0
