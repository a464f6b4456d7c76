"""Checkpoints through DeepSpeed: save, resume (also on another number of ranks), export.

Layout of a run's checkpoint directory (DeepSpeed's, plus three small vilbert-ds files):

    checkpoints/
      latest                      tag of the newest COMPLETE checkpoint (written last, atomically)
      step00001000/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (client_state inside)
        vilbert_ds.json           meta: step, world size, ZeRO stage, precision, model config
        rank00000.json ...        per-rank state: RNG states and loader position (plain JSON)
      step00001000_universal/     made on demand when resuming on a different number of ranks

Every rank calls `save`; `latest` is replaced only after a barrier that every rank reaches
after its own files are written, so it never names a partial checkpoint (DeepSpeed's own
`save_latest` is written by rank 0 without waiting for the others). Old checkpoints beyond
`keep_last` are deleted after `latest` has moved on.

Nothing live is pickled: client_state and the vilbert-ds files hold numbers, strings, lists.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .weights import CheckpointError  # the one error type for checkpoints that cannot be used as asked

log = logging.getLogger(__name__)

LATEST = "latest"
META = "vilbert_ds.json"
TAG_RE = re.compile(r"^step(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, fsynced: a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ================================================================================= RNG
def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (CPU and each CUDA device) generator states as JSON-able data."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ============================================================================ resume plan
@dataclass(frozen=True)
class ResumePlan:
    directory: Path  # the checkpoints/ directory
    tag: str  # the checkpoint saved by the run (step00001000)
    meta: dict[str, Any]
    universal: bool  # load through a universal checkpoint (world size changed)

    @property
    def load_tag(self) -> str:
        return f"{self.tag}_universal" if self.universal else self.tag

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_meta(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / META
    if not path.exists():
        raise CheckpointError(f"{tag_dir}: no {META}; not a complete vilbert-ds checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def find_checkpoint(spec: str | os.PathLike) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run directory, its checkpoints/ directory, or a tag directory."""
    p = Path(spec)
    for directory in (p / "checkpoints", p):
        if (directory / LATEST).exists():
            tag = (directory / LATEST).read_text(encoding="utf-8").strip()
            if not (directory / tag).is_dir():
                raise CheckpointError(f"{directory / LATEST} names {tag!r}, which does not exist")
            return directory, tag
    if (p / META).exists():
        return p.parent, p.name
    raise CheckpointError(f"{spec}: no checkpoint here (expected a run directory, its checkpoints/ with a "
                          f"'{LATEST}' file, or a checkpoint directory with {META})")


def plan_resume(
    spec: str,
    checkpoint_dir: Path,
    *,
    world_size: int,
    zero_stage: int,
    precision: str,
) -> ResumePlan | None:
    """Decide what to load before any engine exists (a universal load must be configured up front).

    spec: "none" (fresh start; refused when the run already has checkpoints, so that a
    forgotten flag cannot overwrite them), "auto" (the newest complete checkpoint of this run,
    or a fresh start if there is none), or a path (run dir / checkpoints dir / tag dir).
    Refused: changing ZeRO stage between {0}, {1, 2} and {3}; changing precision.
    """
    if spec == "none":
        if (checkpoint_dir / LATEST).exists():
            raise CheckpointError(
                f"{checkpoint_dir} already holds checkpoints (latest: "
                f"{(checkpoint_dir / LATEST).read_text().strip()}); pass --resume auto to continue the run, or "
                "choose another train.output_dir"
            )
        return None
    if spec == "auto":
        if not (checkpoint_dir / LATEST).exists():
            return None
        directory, tag = find_checkpoint(checkpoint_dir)
    else:
        directory, tag = find_checkpoint(spec)
    meta = read_meta(directory / tag)
    family = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    old_stage = int(meta["zero_stage"])
    if family[old_stage] != family[zero_stage]:
        raise CheckpointError(
            f"{directory / tag} was saved with ZeRO stage {old_stage}; this run uses stage {zero_stage} "
            f"(zero_optimization.stage). Changing between {family[old_stage]} and {family[zero_stage]} on resume "
            "is refused: the optimizer state is laid out differently. Resume with the original stage, or export "
            "the weights (vilbert-ds export) and start a new run with model.init_from"
        )
    if meta["precision"] != precision:
        raise CheckpointError(
            f"{directory / tag} was saved in {meta['precision']}; this run is {precision} (bf16.enabled / "
            "fp16.enabled). Resume with the original precision, or export and start a new run with model.init_from"
        )
    universal = int(meta["world_size"]) != world_size and old_stage > 0
    if universal and old_stage == 3 and zero_stage == 3:
        log.info("ZeRO-3 checkpoint on %d ranks resumed on %d through a universal checkpoint",
                 meta["world_size"], world_size)
    return ResumePlan(directory=directory, tag=tag, meta=meta, universal=universal)


# ============================================================================== manager
class CheckpointManager:
    """Save and load complete checkpoints for one run. Every rank constructs one and calls
    `save`/`load` collectively; only the main rank writes `latest`, meta and prunes."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int, rank: int, world_size: int):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.directory.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------------------- save
    def save(
        self,
        engine,
        step: int,
        *,
        client_state: dict[str, Any],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
    ) -> float:
        """Collective. Returns the seconds this rank spent (DeepSpeed save + barrier + latest)."""
        start = time.perf_counter()
        tag = tag_for(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        tag_dir = self.directory / tag
        atomic_write_text(tag_dir / rank_file(self.rank), json.dumps(rank_state))
        if self.rank == 0:
            full_meta = {"step": step, "tag": tag, "world_size": self.world_size, "time": time.time(), **meta}
            atomic_write_text(tag_dir / META, json.dumps(full_meta, indent=1))
        _barrier()  # every rank's files are on disk past this point
        if self.rank == 0:
            atomic_write_text(self.directory / LATEST, tag)
            self._prune(keep=tag)
        # No rank leaves before `latest` is written: a launcher that tears the job down when its
        # first rank exits (e.g. after a preemption save) must not catch rank 0 mid-write.
        _barrier()
        return time.perf_counter() - start

    def _prune(self, keep: str) -> None:
        tags = sorted((p.name for p in self.directory.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                      key=lambda t: int(TAG_RE.match(t).group(1)))
        old = [t for t in tags[: max(0, len(tags) - self.keep_last)] if t != keep]
        for t in old:
            for path in (self.directory / t, self.directory / f"{t}_universal"):
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------------------- load
    def prepare(self, plan: ResumePlan) -> None:
        """Collective. Make the universal checkpoint (main rank) if the plan needs one."""
        if plan.universal:
            if self.rank == 0 and not (plan.directory / plan.load_tag).exists():
                from .engine import convert_to_universal

                start = time.perf_counter()
                log.info("converting %s (%d ranks) to a universal checkpoint for %d ranks",
                         plan.directory / plan.tag, plan.meta["world_size"], self.world_size)
                convert_to_universal(plan.directory, plan.tag)
                log.info("universal checkpoint ready in %.1fs", time.perf_counter() - start)
            _barrier()

    def load(self, engine, plan: ResumePlan) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Collective. Loads module + optimizer state; returns (client_state, this rank's state or
        None when the checkpoint had no such rank)."""
        path, client_state = engine.load_checkpoint(str(plan.directory), tag=plan.load_tag,
                                                    load_module_strict=True, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {plan.directory / plan.load_tag}")
        from .engine import replay_cpu_adam_steps

        replay_cpu_adam_steps(engine)
        rank_path = plan.directory / plan.tag / rank_file(self.rank)
        rank_state = json.loads(rank_path.read_text(encoding="utf-8")) if rank_path.exists() else None
        return client_state or {}, rank_state


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ================================================================================ export
def load_consolidated(spec: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """(checkpoint dir, meta, fp32 model state without the module prefix) of a checkpoint (any
    ZeRO stage, any number of ranks; a run, its checkpoints/ or one checkpoint directory). One
    process, no distributed setup. `model_factory.get_model` reads training checkpoints with it."""
    from .engine import consolidated_fp32_state

    directory, tag = find_checkpoint(spec)
    tag_dir = directory / tag
    meta = read_meta(tag_dir)
    state = consolidated_fp32_state(directory, tag)
    prefix = meta.get("module_prefix", "model.")
    model_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not model_state:
        raise CheckpointError(f"{tag_dir}: no parameters under {prefix!r} in the checkpoint")
    return tag_dir, meta, model_state


def export_fp32(spec: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Consolidate a checkpoint (any ZeRO stage, any number of ranks) into a vilbert-ds model
    directory (`config.json` + fp32 `model.safetensors`) that `vilbert_ds.load_model` reads.
    Runs in one process, no distributed setup."""
    from .engine import consolidated_fp32_state
    from .model import ViLBert, ViLBertConfig
    from .weights import save_model

    directory, tag = find_checkpoint(spec)
    meta = read_meta(directory / tag)
    state = consolidated_fp32_state(directory, tag)
    prefix = meta.get("module_prefix", "model.")
    model_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not model_state:
        raise CheckpointError(f"{directory / tag}: no parameters under {prefix!r} in the checkpoint")
    model = ViLBert(ViLBertConfig.from_dict(meta["model_config"], source=str(directory / tag / META)))
    own = model.state_dict()
    missing = [k for k in own if k not in model_state and k != "cls.predictions.decoder.weight"]
    unexpected = [k for k in model_state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{directory / tag}: the checkpoint does not match its model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model_state.pop("cls.predictions.decoder.weight", None)
    return save_model(model, out_dir, state=model_state)
