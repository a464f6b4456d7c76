"""Evaluate a checkpoint on a task: `vilbert-ds eval --task vqa --ckpt runs/multitask [--split minval]`.

Distributed like training (`torchrun --nproc_per_node N -m vilbert_ds.evaluate ...`, `srun`,
`deepspeed --module vilbert_ds.evaluate ...`): each rank scores a contiguous slice of the split,
the per-example records are gathered and merged by example id (the repeats that pad the last
batches count once), and rank 0 writes `<out>/<task>_<split>_metrics.json` and
`<out>/<task>_<split>_predictions.json` in the public evaluation server's format (VQA
`[{"question_id", "answer"}]`, GQA `[{"questionId", "prediction"}]`, ...). Test splits without
labels give predictions only. No DeepSpeed engine is needed: the weights are read consolidated.
Rank 0 shows its batches on a progress bar on stderr when stderr is a terminal.

`--ckpt`: a vilbert-ds model directory (config.json + model.safetensors), an original checkpoint
file, or a run directory / checkpoints directory / checkpoint tag directory of a training run
(read through `model_factory.get_model`, the model source of training and export too).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .checkpoint import verify_source
from .data.config import DataConfig
from .data.tokenizer import load_tokenizer
from .distributed import DistEnv, init_distributed, shutdown_distributed
from .model_factory import get_model, source_kind
from .tasks.label_maps import use_model_label_maps
from .tasks.loader import EvalLoader, Evaluation
from .tasks.registry import build_family, load_registry

log = logging.getLogger("vilbert_ds.evaluate")
EXIT_REFUSED = 2


def run_eval(args: argparse.Namespace) -> dict[str, float | str]:
    env = DistEnv.from_env()
    registry = load_registry(args.registry, data_root=args.data_root)  # refusals before any process group
    cfg = registry.resolve(args.task)
    if source_kind(args.ckpt) in ("model_dir", "checkpoint"):  # an original file is read weights_only
        verify_source(args.ckpt)  # before any process group: nothing in it may run code
    if env.world_size > 1:
        init_distributed(env, init_timeout_s=getattr(args, "init_timeout", 300.0), timeout_s=getattr(args, "timeout", 600.0))
    try:
        return _evaluate(args, env, cfg)
    finally:
        if env.world_size > 1:
            shutdown_distributed()  # all ranks leave together: barrier + destroy_process_group


def _evaluate(args: argparse.Namespace, env: DistEnv, cfg) -> dict[str, float | str]:
    split = args.split or cfg.splits.val
    # a model directory, an original checkpoint (with --config), or a training checkpoint
    model = get_model(args.ckpt, config=getattr(args, "config", "base_6layer_6conect")).eval()
    if not model.config.with_task_heads and not args.zero_shot:
        raise ValueError(f"{args.ckpt}: the model has no task heads (a pretraining checkpoint); fine-tune it first")
    family = build_family(cfg, load_tokenizer(args.vocab or None))
    label_map = use_model_label_maps(family, args.ckpt)  # classifiers: the answers the model's units mean
    if args.zero_shot and getattr(family, "evaluate_split", None) is None:
        raise ValueError(f"task {cfg.name}: --zero-shot is for retrieval tasks (the pretraining alignment head)")
    batch = args.batch_size or max(1, cfg.eval_batch_size // env.world_size)
    loader = EvalLoader(family, split, DataConfig(num_workers=args.workers), rank=env.rank, world_size=env.world_size,
                        micro_batch_size=batch)
    start = time.perf_counter()
    device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    with progress_bar(len(loader), f"eval {cfg.name} {split}", env.is_main) as bar:
        evaluation = Evaluation({cfg.name: family}, {cfg.name: Counted(loader, bar)}, device)
        result, metric = evaluation.run(model.to(device), cfg.name, standard=True, zero_shot=args.zero_shot,
                                        protocol=getattr(args, "protocol", "full"))
    result = {**result, "seconds": round(time.perf_counter() - start, 2), "split_samples": float(loader.total)}
    if label_map is not None:
        result["label_map"] = label_map
    if getattr(metric, "note", ""):  # retrieval: which protocol and set were ranked
        result["protocol"] = metric.note
    if env.is_main:
        evaluation.write(cfg.name, metric, result, args.out)
        print(f"{cfg.name} {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                                  for k, v in result.items()) + f" -> {args.out}", flush=True)
    return result


def progress_bar(batches: int, desc: str, is_main: bool):
    """This rank's batches on a bar: rank 0 only, on stderr, and only when stderr is a terminal
    (tqdm's disable=None), so logs and pipes get no control characters."""
    from tqdm import tqdm

    return tqdm(total=batches, desc=desc, unit="batch", file=sys.stderr, disable=None if is_main else True,
                dynamic_ncols=True, mininterval=1.0)


class Counted:
    """A loader whose batches move `bar` as they are consumed; everything else is the loader's."""

    def __init__(self, loader, bar):
        self.loader, self.bar = loader, bar

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name, title or id")
    parser.add_argument("--ckpt", required=True, help="model directory, or run / checkpoint directory")
    parser.add_argument("--config", default="base_6layer_6conect",
                        help="model config of an original checkpoint file (preset or original JSON)")
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
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        run_eval(args)
    except (KeyError, ValueError, FileNotFoundError, NotImplementedError) as e:  # CheckpointError is a ValueError
        print(f"vilbert-ds eval: refused: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m vilbert_ds.evaluate ...`: parsed as `vilbert-ds eval ...` is."""
    from .cli import run

    return run("eval", sys.argv[1:] if argv is None else list(argv), prog="python -m vilbert_ds.evaluate")


if __name__ == "__main__":
    sys.exit(cli())
