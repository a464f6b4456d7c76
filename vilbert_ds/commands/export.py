"""`vilbert-ds export RUN --out DIR`: a DeepSpeed checkpoint (any ZeRO stage, any number of ranks)
-> consolidated fp32 `config.json` + `model.safetensors`, loadable with `vilbert_ds.load_model`
and by the fine-tuning / evaluation commands (`model.init_from`). The run's `label_maps.json`
(what the answer heads mean) is copied beside them.

RUN is a run directory, its checkpoints/ directory (the `latest` checkpoint is exported), or one
checkpoint directory (checkpoints/step00001000). An --out that already holds a model is refused
(one line, exit 2) unless --force is given; then its model files are replaced (atomically) and a
label map left there by the previous model is removed when this run has none.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory, checkpoints/ directory, or checkpoints/stepNNNNNNNN")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--force", action="store_true", help="overwrite a model already in --out")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import CheckpointError, export_fp32, find_checkpoint
    from ..model import count_parameters
    from ..tasks.label_maps import LABEL_MAPS_NAME, find_label_maps
    from ..weights import CONFIG_NAME, WEIGHTS_NAME, load_model

    start = time.perf_counter()
    existing = [Path(args.out) / name for name in (CONFIG_NAME, WEIGHTS_NAME, LABEL_MAPS_NAME)
                if (Path(args.out) / name).exists()]
    if existing and not args.force:  # checked first: the consolidation can take minutes
        print(f"vilbert-ds export: {existing[0]} exists; pass --force to overwrite the model in {args.out}",
              file=sys.stderr)
        return 2
    try:
        directory, tag = find_checkpoint(args.checkpoint)
        out = export_fp32(directory / tag, args.out)
        maps = find_label_maps(directory / tag)
        if maps is not None:
            shutil.copyfile(maps, out / maps.name)
        else:  # a label map of the model this export replaced would misname the new heads
            (out / LABEL_MAPS_NAME).unlink(missing_ok=True)
    except (CheckpointError, OSError) as e:  # OSError: --out not writable, under a plain file, ...
        print(f"vilbert-ds export: {e}", file=sys.stderr)
        return 2
    model = load_model(out)  # the export must load as users will load it
    print(f"exported {directory / tag} -> {out} ({count_parameters(model):,} parameters, fp32, "
          f"{time.perf_counter() - start:.1f}s)")
    return 0
