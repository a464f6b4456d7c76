"""Evaluate a checkpoint on a task: `vilbert-ds eval --task vqa --ckpt runs/multitask [--split minval]`.

Distributed like training (`torchrun --nproc_per_node N -m vilbert_ds.evaluate ...`, `srun`,
the deepspeed launcher): each rank scores a contiguous slice of the split, the per-example
records are gathered and merged by example id (the repeats that pad the last batches count
once), and rank 0 writes `<out>/<task>_<split>_metrics.json` and
`<out>/<task>_<split>_predictions.json` in the public evaluation server's format (VQA
`[{"question_id", "answer"}]`, GQA `[{"questionId", "prediction"}]`, ...). Test splits without
labels give predictions only. No DeepSpeed engine is needed: the weights are read consolidated.

`--ckpt`: a vilbert-ds model directory (config.json + model.safetensors), or a run directory /
checkpoints directory / checkpoint tag directory of `vilbert-ds multitask` / `finetune`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write_text, verify_source
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .model import ViLBert, ViLBertConfig
from .data.tokenizer import load_tokenizer
from .tasks.label_maps import use_model_label_maps
from .tasks.loader import EvalLoader, TaskDataConfig, evaluate_task
from .tasks.registry import build_family, load_registry

log = logging.getLogger("vilbert_ds.evaluate")


def load_eval_model(spec: str | Path) -> ViLBert:
    """A model directory, or the consolidated fp32 weights of a training checkpoint."""
    from .weights import load_model

    p = Path(spec)
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return load_model(p)
    from .checkpoint import META, load_consolidated

    tag_dir, meta, state = load_consolidated(p)  # every file checked with weights_only first
    model = ViLBert(ViLBertConfig.from_dict(meta["model_config"], source=str(tag_dir / META)))
    state.setdefault("cls.predictions.decoder.weight", state["bert.embeddings.word_embeddings.weight"])
    model.load_state_dict(state, strict=True)
    return model


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    env = DistEnv.from_env()
    if env.world_size > 1:
        init_distributed(env, init_timeout_s=getattr(args, "init_timeout", 300.0), timeout_s=getattr(args, "timeout", 600.0))
    try:
        return _evaluate(args, env)
    finally:
        if env.world_size > 1:
            shutdown_distributed()  # all ranks leave together: barrier + destroy_process_group


def _evaluate(args: argparse.Namespace, env: DistEnv) -> dict[str, float]:
    registry = load_registry(args.registry, data_root=args.data_root)
    cfg = registry.resolve(args.task)
    split = args.split or cfg.splits.val
    model = load_eval_model(args.ckpt).eval()
    if not model.config.with_task_heads and not args.zero_shot:
        raise ValueError(f"{args.ckpt}: the model has no task heads (a pretraining checkpoint); fine-tune it first")
    family = build_family(cfg, load_tokenizer(args.vocab or None))
    label_map = use_model_label_maps(family, args.ckpt)  # classifiers: the answers the model's units mean
    # families whose standard metric is not per-batch (retrieval ranks every caption against
    # every image) implement evaluate_split(model, loader, device, zero_shot=...)
    evaluate_split = getattr(family, "evaluate_split", None)
    if args.zero_shot and evaluate_split is None:
        raise ValueError(f"task {cfg.name}: --zero-shot is for retrieval tasks (the pretraining alignment head)")
    data = TaskDataConfig(num_workers=args.workers)
    batch = args.batch_size or max(1, cfg.eval_batch_size // env.world_size)
    loader = EvalLoader(family, split, data, rank=env.rank, world_size=env.world_size, micro_batch_size=batch)
    start = time.perf_counter()
    device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if evaluate_split is not None:
        protocol = {"protocol": args.protocol} if getattr(args, "protocol", "full") != "full" else {}
        metric = evaluate_split(model.to(device), loader, device, zero_shot=args.zero_shot, **protocol)
    else:
        metric = evaluate_task(model.to(device), family, loader, device).gather()
    result = {**metric.result(), "seconds": round(time.perf_counter() - start, 2), "split_samples": float(loader.total)}
    if label_map is not None:
        result["label_map"] = label_map
    if getattr(metric, "note", ""):  # retrieval: which protocol and set were ranked
        result["protocol"] = metric.note
    if env.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        family.write_predictions(metric, out / f"{cfg.name}_{split}_predictions.json")
        atomic_write_text(out / f"{cfg.name}_{split}_metrics.json", json.dumps(result, indent=1) + "\n")
        print(f"{cfg.name} {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                                  for k, v in result.items()) + f" -> {out}", flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name, title or id")
    parser.add_argument("--ckpt", required=True, help="model directory, or run / checkpoint directory")
    parser.add_argument("--split", default=None, help="default: the task's val split (test splits: predictions only)")
    parser.add_argument("--registry", default=None, help="tasks.yaml (default: the packaged registry)")
    parser.add_argument("--data-root", default=None, help="replaces {data_root} in tasks.yaml paths")
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (default: eval_batch_size / ranks)")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers per rank")
    parser.add_argument("--vocab", default="", help="vocab.txt / tokenizer directory (default: the local uncased vocab)")
    parser.add_argument("--out", default="eval", help="directory for the metrics and prediction files")
    parser.add_argument("--init-timeout", type=float, default=300.0,
                        help="seconds for all ranks to join (a rank that never starts is named)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds any collective may take before the job fails naming the stuck rank")
    parser.add_argument("--zero-shot", action="store_true",
                        help="retrieval: rank with the pretraining alignment head (a pretraining checkpoint works)")
    parser.add_argument("--protocol", choices=("full", "paper"), default="full",
                        help="retrieval: full = the whole split, both directions; paper = the published numbers' "
                             "protocol (text->image on the 1k test images: COCO set 0, Flickr30k)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        verify_source(args.ckpt)  # before any process group: nothing in it may run code
    except (CheckpointError, FileNotFoundError) as e:
        print(f"vilbert-ds eval: refused: {e}", file=sys.stderr, flush=True)
        return 2
    run_eval(args)
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
