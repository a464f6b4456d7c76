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

Trust. DeepSpeed reads its own files with `torch.load(weights_only=False)`, which runs whatever
code a pickle names. A directory that is not this run's own (export, eval --ckpt, finetune
--from, model.init_from, --resume PATH of another run) therefore passes `verify_untrusted`
first: every file in it is loaded with weights_only=True (DeepSpeed's few classes allowed) or
the directory is refused, naming the file, before DeepSpeed opens anything. Resuming the run's
own checkpoints (--resume auto) keeps DeepSpeed's loader after a cheap completeness check
(`verify_complete`).
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


META_KEYS = ("step", "world_size", "zero_stage", "precision", "model_config")
RANK_FILE_RE = re.compile(r"^rank\d{5}\.json$")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a complete vilbert-ds checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is unreadable ({type(e).__name__}: {e}); the file is truncated "
                              "or corrupt") from None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's vilbert_ds.json; CheckpointError naming the file if it is missing,
    truncated, or lacks one of META_KEYS."""
    meta = _read_json(tag_dir / META, "the checkpoint meta")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{tag_dir / META}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{tag_dir / META}: lacks {missing}; not a vilbert-ds checkpoint meta")
    wrong = [k for k, kind in (("step", int), ("world_size", int), ("zero_stage", int), ("precision", str),
                               ("model_config", dict)) if not isinstance(meta[k], kind) or isinstance(meta[k], bool)]
    if wrong or meta["world_size"] < 1 or meta["zero_stage"] not in (0, 1, 2, 3):
        raise CheckpointError(f"{tag_dir / META}: invalid values for {wrong or ['world_size', 'zero_stage']}")
    return meta


def _read_latest(directory: Path) -> str:
    """The tag named by `directory/latest`; CheckpointError if it is empty or not a tag."""
    path = directory / LATEST
    try:
        tag = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if not TAG_RE.match(tag):  # also keeps a hostile `latest` from pointing outside the directory
        raise CheckpointError(f"{path} names {tag[:80]!r}, which is not a checkpoint tag (stepNNNNNNNN)")
    if not (directory / tag).is_dir():
        raise CheckpointError(f"{path} names {tag!r}, which does not exist")
    return tag


def find_checkpoint(spec: str | os.PathLike) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run directory, its checkpoints/ directory, or a tag directory."""
    p = Path(spec)
    for directory in (p / "checkpoints", p):
        if (directory / LATEST).exists():
            return directory, _read_latest(directory)
    if (p / META).exists():
        return p.parent, p.name
    raise CheckpointError(f"{spec}: no checkpoint here (expected a run directory, its checkpoints/ with a "
                          f"'{LATEST}' file, or a checkpoint directory with {META})")


# ========================================================================= verification
def verify_complete(tag_dir: Path) -> dict[str, Any]:
    """The meta of a complete checkpoint, or CheckpointError naming the first missing or
    truncated file. Cheap: presence, JSON parse of the vilbert-ds files, and for each DeepSpeed
    file the zip directory torch.save writes at its end (a truncated file has none). No tensor
    byte and no pickle is read: 1-2 ms for a 1.8 GB ZeRO-2 or ZeRO-3 checkpoint, where loading
    every file with weights_only (memory-mapped, as `verify_untrusted` does) takes 70-80 ms, on
    every rank, and proves nothing more about completeness for files the run wrote itself."""
    meta = read_meta(tag_dir)
    world, stage = int(meta["world_size"]), int(meta["zero_stage"])
    for r in range(world):
        if not isinstance(_read_json(tag_dir / rank_file(r), "the rank state"), dict):
            raise CheckpointError(f"{tag_dir / rank_file(r)}: expected a JSON object")
    expected = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3
                else ["mp_rank_00_model_states.pt"])
    files = [tag_dir / name for name in expected]
    if stage > 0:  # optimizer partitions: zero_pp_rank_R_... (fp32) or bf16_zero_pp_rank_R_...
        for r in range(world):
            found = sorted(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
            if not found:
                raise CheckpointError(f"{tag_dir}: the optimizer partition of rank {r} "
                                      f"(*zero_pp_rank_{r}_mp_rank_00_optim_states.pt) is missing")
            files += found
    for path in files:
        _check_torch_zip(path)
    return meta


def _check_torch_zip(path: Path) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a complete checkpoint") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: truncated or not a torch file ({type(e).__name__}: {e})") from None
    if not any(n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{path}: not a torch checkpoint file (no data.pkl)")


def verify_untrusted(tag_dir: Path) -> None:
    """Refuse a checkpoint directory that could run code when DeepSpeed loads it.

    Every file under `tag_dir` (recursively, through symlinks: DeepSpeed's converters walk the
    tree and pick files by name prefix) must load with torch.load(weights_only=True), with
    DeepSpeed's few checkpoint classes allowed (engine.DEEPSPEED_SAFE_GLOBALS); the vilbert-ds
    JSON files are the only exception (they are parsed as JSON, never unpickled). The first file
    that fails is named in a one-line CheckpointError. Tensor bytes are memory-mapped, not read:
    the check costs the pickles, not the checkpoint's size.
    """
    from .engine import load_weights_only

    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: not a checkpoint directory")
    seen: set[str] = set()
    for root, dirs, names in os.walk(tag_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        for name in sorted(names):
            path = Path(root) / name
            if Path(root) == tag_dir and (name == META or RANK_FILE_RE.match(name)):
                continue
            if not path.is_file():
                raise CheckpointError(f"{path}: refused: not a regular file")
            load_weights_only(path, mmap=True)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """plan_resume runs twice per rank (the pre-check and the run); say each thing once."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _tags(directory: Path) -> list[str]:
    """Checkpoint tags under `directory`, newest first."""
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)), reverse=True)


def newest_complete(checkpoint_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(tag, meta) of the checkpoint `--resume auto` continues from, or None for a fresh start.

    The checkpoint `latest` names is verified (`verify_complete`); if it is incomplete, or
    `latest` is missing, empty or names nothing, older checkpoints are tried newest first, with
    one warning line for each one skipped. When none is complete: refused if `latest` exists
    (the run had a complete checkpoint once, and starting over would discard it silently), a
    fresh start otherwise (a first save that was interrupted).
    """
    tags = _tags(checkpoint_dir)
    has_latest = (checkpoint_dir / LATEST).exists()
    if not has_latest and not tags:
        return None
    order = tags
    if has_latest:
        try:
            named = _read_latest(checkpoint_dir)
        except CheckpointError as e:
            _warn_once(f"{e}; looking for the newest complete checkpoint instead")
        else:
            # Newer directories than `latest` are saves that never completed (`latest` moves last).
            order = [named] + [t for t in tags if int(TAG_RE.match(t).group(1)) < int(TAG_RE.match(named).group(1))]
    else:
        _warn_once(f"{checkpoint_dir}: no '{LATEST}' file; looking for the newest complete checkpoint")
    skipped = []
    for tag in order:
        try:
            return tag, verify_complete(checkpoint_dir / tag)
        except CheckpointError as e:
            skipped.append(tag)
            _warn_once(f"--resume auto: skipping {checkpoint_dir / tag}: {e}")
    if has_latest:
        raise CheckpointError(f"{checkpoint_dir}: no complete checkpoint to resume from (skipped: "
                              f"{', '.join(skipped) or 'none found'}); restore one, or start a new run in another "
                              "train.output_dir")
    _warn_once(f"--resume auto: {checkpoint_dir} holds no complete checkpoint (skipped: {', '.join(skipped)}); "
               "starting fresh")
    return None


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan_resume(
    spec: str,
    checkpoint_dir: Path,
    *,
    world_size: int,
    zero_stage: int,
    precision: str,
    model_config: dict[str, Any] | None = None,
) -> ResumePlan | None:
    """Decide what to load before any engine (or process group) exists: a universal load must be
    configured up front, and every refusal is one line, before any rank waits on another.

    spec: "none" (fresh start; refused when the run already has checkpoints, so that a
    forgotten flag cannot overwrite them), "auto" (the newest complete checkpoint of this run,
    see `newest_complete`, or a fresh start if there is none), or a path (run dir / checkpoints
    dir / tag dir), which must be complete, and which is checked with `verify_untrusted` when it
    is not this run's own. Refused: changing ZeRO stage between {0}, {1, 2} and {3}; changing
    precision; a `model_config` (the run's `ViLBertConfig.to_dict()`) that differs from the one
    the checkpoint was saved with.
    """
    if spec == "none":
        if (checkpoint_dir / LATEST).exists():
            raise CheckpointError(
                f"{checkpoint_dir} already holds checkpoints (latest: "
                f"{(checkpoint_dir / LATEST).read_text(errors='replace').strip()[:80]}); pass --resume auto to "
                "continue the run, or choose another train.output_dir"
            )
        return None
    if spec == "auto":
        found = newest_complete(checkpoint_dir)
        if found is None:
            return None
        directory = checkpoint_dir
        tag, meta = found
    else:
        directory, tag = find_checkpoint(spec)
        meta = verify_complete(directory / tag)
        if not _same_directory(directory, checkpoint_dir):
            # Another run's files: DeepSpeed will unpickle them (and convert them, for another
            # number of ranks), so nothing in them may run code.
            verify_untrusted(directory / tag)
            if (directory / f"{tag}_universal").exists():
                verify_untrusted(directory / f"{tag}_universal")
    if model_config is not None:
        check_model_config(directory / tag, meta, model_config)
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


def check_model_config(tag_dir: Path, meta: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Refuse resuming with a model config other than the checkpoint's, naming the keys (the
    state dict would not fit, or worse, fit with another meaning)."""
    def normal(d: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(d, sort_keys=True, default=str))  # tuples -> lists, as in the meta

    saved, now = normal(meta["model_config"]), normal(model_config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, run {now.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise CheckpointError(f"{tag_dir / META}: the model config differs from this run's: {diffs}{more}; resume "
                              "with the checkpoint's model settings, or start a new run from its weights with "
                              "model.init_from")


def source_model_config(spec: str | os.PathLike) -> dict[str, Any]:
    """The model config (as a dict) of a vilbert-ds model directory or of a checkpoint's meta."""
    p = Path(spec)
    if (p / "config.json").exists():
        return _read_json(p / "config.json", "the model config")
    directory, tag = find_checkpoint(p)
    return read_meta(directory / tag)["model_config"]


def verify_source(spec: str | os.PathLike) -> None:
    """Check a `model.init_from` / `--from` / `--ckpt` source before any process group starts: a
    vilbert-ds model directory (JSON + safetensors, which cannot run code) passes as it is; a run
    or checkpoint directory must be complete (`read_meta`) and pass `verify_untrusted`."""
    p = Path(spec)
    if (p / "config.json").exists() and (p / "model.safetensors").exists():
        return
    directory, tag = find_checkpoint(p)
    read_meta(directory / tag)
    verify_untrusted(directory / tag)


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
    ZeRO stage, any number of ranks; a run, its checkpoints/ or one checkpoint directory). Every
    file is checked with `verify_untrusted` before DeepSpeed's consolidation opens any. One
    process, no distributed setup. `model_factory.get_model` reads training checkpoints with it."""
    from .engine import consolidated_fp32_state

    directory, tag = find_checkpoint(spec)
    tag_dir = directory / tag
    meta = read_meta(tag_dir)
    verify_untrusted(tag_dir)
    state = consolidated_fp32_state(directory, tag)
    prefix = meta.get("module_prefix", "model.")
    model_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not model_state:
        raise CheckpointError(f"{tag_dir}: no parameters under {prefix!r} in the checkpoint")
    return tag_dir, meta, model_state


def export_fp32(spec: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Consolidate a checkpoint (any ZeRO stage, any number of ranks) into a vilbert-ds model
    directory (`config.json` + fp32 `model.safetensors`) that `vilbert_ds.load_model` reads,
    written atomically (`weights.save_model`). Runs in one process, no distributed setup."""
    from .model import ViLBert, ViLBertConfig
    from .weights import check_output_dir, save_model

    check_output_dir(out_dir)  # before the consolidation, which can take minutes
    tag_dir, meta, model_state = load_consolidated(spec)
    directory, tag = tag_dir.parent, tag_dir.name
    model = ViLBert(ViLBertConfig.from_dict(meta["model_config"], source=str(directory / tag / META)))
    own = model.state_dict()
    missing = [k for k in own if k not in model_state and k != "cls.predictions.decoder.weight"]
    unexpected = [k for k in model_state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{directory / tag}: the checkpoint does not match its model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model_state.pop("cls.predictions.decoder.weight", None)
    return save_model(model, out_dir, state=model_state)
