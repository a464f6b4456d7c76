"""Model weights in and out: vilbert-ds directories, original ViLBERT checkpoints, HF BERT.

A vilbert-ds model directory holds `config.json` (the original JSON format plus vilbert-ds keys)
and `model.safetensors`. State-dict keys are the original's; the tied MLM decoder is stored
once (as `bert.embeddings.word_embeddings.weight`). Untrusted `.bin` files are read with
`torch.load(weights_only=True)`, which cannot run code.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ViLBert, ViLBertConfig, resolve_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_DECODER = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
TASK_EMBEDDINGS = "bert.embeddings.task_embeddings.weight"
TASK_HEAD_PREFIXES = ("vil_prediction.", "vil_prediction_gqa.", "vil_binary_prediction.", "vil_logit.",
                      "vil_tri_prediction.", "vision_logit.", "linguisic_logit.")


class CheckpointError(ValueError):
    """A checkpoint (weights file, training checkpoint, resume request) that cannot be used as
    asked: the message names the file or keys and says what to do. The one such error type."""


# ------------------------------------------------------------------------- raw files
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.bin`/`.pt` (torch pickle, read safely) or `.safetensors` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {str(e)[:300]}). "
            "Files that need arbitrary unpickling are refused: a checkpoint must not be able to run code."
        ) from None
    for key in ("state_dict", "model", "module"):  # common wrappers around a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5] if isinstance(obj, dict) else []
        raise CheckpointError(f"{path}: not a state dict of tensors (non-tensor entries: {bad or type(obj).__name__})")
    return obj


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` prefix and rename TF-era LayerNorm `gamma/beta` to `weight/bias`."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        key = re.sub(r"LayerNorm(\d?)\.gamma$", r"LayerNorm\1.weight", key)
        key = re.sub(r"LayerNorm(\d?)\.beta$", r"LayerNorm\1.bias", key)
        out[key] = value
    return out


# ----------------------------------------------------------------- loading into a model
@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # left at their fresh initialisation
    dropped: list[str] = field(default_factory=list)  # in the file, not used (with the reason)

    def summary(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} keys left at fresh init: {_abbrev(self.missing)}")
        if self.dropped:
            lines.append(f"{len(self.dropped)} keys dropped: {_abbrev(self.dropped)}")
        return "; ".join(lines) or "all keys matched"


def _abbrev(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_into(
    model: ViLBert,
    state: dict[str, torch.Tensor],
    *,
    allow_missing: bool | list[str] = False,
    drop: dict[str, str] | None = None,
    source: str = "checkpoint",
) -> LoadReport:
    """Copy `state` into `model`, strictly: unexpected keys and shape mismatches always fail;
    missing keys fail unless `allow_missing` (True, or the list of prefixes that may be missing).
    `drop` maps keys of `state` to the reason they are skipped on purpose."""
    drop = drop or {}
    own = model.state_dict()
    report = LoadReport(dropped=[f"{k} ({why})" for k, why in drop.items()])
    state = {k: v for k, v in state.items() if k not in drop}
    if TIED_DECODER in state and WORD_EMBEDDINGS in state:
        if not torch.equal(state[TIED_DECODER], state[WORD_EMBEDDINGS]):
            raise CheckpointError(f"{source}: {TIED_DECODER} differs from {WORD_EMBEDDINGS}, but they are tied")
        state.pop(TIED_DECODER)
    expected = {k for k in own if k != TIED_DECODER}
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(state) & expected) if state[k].shape != own[k].shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_abbrev(mismatched)}")
    if missing:
        allowed = allow_missing is True or (
            isinstance(allow_missing, list) and all(any(k.startswith(p) for p in allow_missing) for k in missing)
        )
        if not allowed:
            problems.append(
                f"missing keys ({len(missing)}): {_abbrev(missing)} (pass allow_missing / --allow-missing to "
                "leave them at a fresh random init)"
            )
        report.missing = missing
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    return report


def _infer_heads(config: ViLBertConfig, state: dict[str, torch.Tensor]) -> ViLBertConfig:
    """Original checkpoints do not say which class wrote them; the keys do."""
    has_task_tokens = TASK_EMBEDDINGS in state
    has_task_heads = any(k.startswith(TASK_HEAD_PREFIXES) for k in state)
    # Task heads follow the keys alone: `with_task_heads` defaults to true and is absent from
    # original JSON configs, so `or`-ing it in would make every pretrained_model.bin "miss" its
    # task heads. (Use from_original(task_heads=True) to add fresh ones.)
    changes = {"task_specific_tokens": has_task_tokens or config.task_specific_tokens,
               "with_task_heads": has_task_heads}
    if has_task_tokens:
        changes["num_task_tokens"] = state[TASK_EMBEDDINGS].shape[0]
    return config.replace(**changes)


def _beta_head_drops(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """vilbert_beta's `vil_prediction.main.*` (weight-normed Linear-ReLU-Linear) has no
    12-in-1 counterpart: its trunk converts, that head does not."""
    return {k: "vilbert_beta weight-norm VQA head, no 12-in-1 equivalent" for k in state
            if k.startswith("vil_prediction.main.")}


def from_original(
    state_dict_or_path: dict[str, torch.Tensor] | str | os.PathLike,
    config: ViLBertConfig | str | os.PathLike | dict = "base_6layer_6conect",
    *,
    allow_missing: bool | list[str] = False,
    task_heads: bool | None = None,
) -> ViLBert:
    """Convert an original checkpoint (`pretrained_model.bin`, `multi_task_model.bin`, a
    vilbert_beta trunk) into a ready `ViLBert`, in memory.

    `config` is an original-format JSON path, a preset name or a config. Whether the model has
    task tokens and task heads is read from the checkpoint's keys; `task_heads=True` adds
    (freshly initialised, listed in `model.load_report`) task heads to a pretraining checkpoint.
    """
    source = os.fspath(state_dict_or_path) if not isinstance(state_dict_or_path, dict) else "state dict"
    state = read_state_dict(state_dict_or_path) if not isinstance(state_dict_or_path, dict) else state_dict_or_path
    state = _normalise_keys(state)
    drop = _beta_head_drops(state)
    cfg = _infer_heads(resolve_config(config), {k: v for k, v in state.items() if k not in drop})
    if task_heads is not None:
        cfg = cfg.replace(with_task_heads=task_heads)
    model = ViLBert(cfg)
    if task_heads and not any(k.startswith(TASK_HEAD_PREFIXES) for k in state if k not in drop):
        allow_missing = list(TASK_HEAD_PREFIXES) if allow_missing is False else allow_missing
    model.load_report = load_into(model, state, allow_missing=allow_missing, drop=drop, source=source)
    return model


def to_original(model: ViLBert) -> dict[str, torch.Tensor]:
    """The state dict the original code loads: same keys, tied decoder included as a copy."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[TIED_DECODER] = state[WORD_EMBEDDINGS].clone()
    return state


# --------------------------------------------------------------- vilbert-ds directories
def save_model(model: ViLBert, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (fp32 unless the tensors say otherwise).

    Atomic: both files are written into a temporary sibling directory, which then takes the
    place of `directory`, so a reader (or a crash, or a full disk) never meets weights beside
    another model's config. A `directory` that holds other files too keeps them: its two model
    files are replaced (config.json removed first, so an interruption leaves a directory that
    `load_model` refuses rather than a mismatched pair). Temporary directories of killed saves
    are removed by the next save beside them.
    """
    import shutil

    directory = check_output_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent, glob.escape(directory.name))
    state = dict(state if state is not None else model.state_dict())
    state.pop(TIED_DECODER, None)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = directory.with_name(f".{directory.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.config.to_json(tmp / CONFIG_NAME)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "vilbert-ds"})
        _fsync_files(tmp, (CONFIG_NAME, WEIGHTS_NAME))
        if not directory.exists():
            os.rename(tmp, directory)
        elif {p.name for p in directory.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}:
            old = directory.with_name(f".{directory.name}.old{os.getpid()}")
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:  # other files live here: replace ours only, config last
            (directory / CONFIG_NAME).unlink(missing_ok=True)
            os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
            os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return directory


def _fsync_files(directory: Path, names: tuple[str, ...]) -> None:
    for name in names:
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_dir(directory: str | os.PathLike) -> Path:
    """`directory` as a Path if a model directory can be written there; else an OSError naming
    what is in the way (a plain file on the path, a parent without write permission)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    parent = directory.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{directory}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{directory}: {parent} is not writable")
    return directory


def remove_stale_temporaries(parent: Path, name_glob: str) -> list[Path]:
    """Remove the directories `parent/.<name>.partialPID` and `.<name>.oldPID` (name matching
    `name_glob`) that a killed save or conversion left behind: those whose process is gone.
    Returns what was removed."""
    import shutil

    removed = []
    for tmp in parent.glob(f".{name_glob}.*"):
        m = re.fullmatch(r"\.(.+)\.(?:partial|old)(\d*)", tmp.name)
        if m and tmp.is_dir() and not (m.group(2) and _alive(int(m.group(2)))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **config_overrides) -> ViLBert:
    """Load a vilbert-ds model directory (config.json + model.safetensors) into a ready module."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(
            f"{path} is not a vilbert-ds model directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(convert original .bin files with `vilbert-ds convert`)"
        )
    cfg = ViLBertConfig.from_json(path / CONFIG_NAME)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    model = ViLBert(cfg)
    load_into(model, load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
    return model.to(map_location)


def build_model(config: ViLBertConfig | str | os.PathLike | dict = "base_6layer_6conect", **overrides) -> ViLBert:
    """A freshly initialised model from an original-format JSON config (or preset name)."""
    return ViLBert(resolve_config(config, **overrides))


# ------------------------------------------------------------------ Hugging Face BERT
HF_TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size")


def read_hf_config(path: str | os.PathLike) -> dict:
    """The config.json of a local HF BERT directory."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; pass a local Hugging Face BERT directory (no hub downloads)")
    return json.loads(cfg_file.read_text())


def read_hf_bert(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a local HF BERT directory (safetensors or .bin weights)."""
    path = Path(path)
    hf_cfg = read_hf_config(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return hf_cfg, read_state_dict(path / name)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin")


def config_from_hf_bert(path: str | os.PathLike, base: ViLBertConfig | str = "base_6layer_6conect",
                        **overrides) -> ViLBertConfig:
    """A ViLBERT config whose text stream has the shape of the HF BERT at `path`; vision and
    co-attention sizes come from `base`. Co-attention text ids are shifted to end at the last
    text layer when the HF model is shallower than the base."""
    hf_cfg = read_hf_config(path)  # the config only: no weights are read
    base = resolve_config(base)
    n = hf_cfg["num_hidden_layers"]
    t_ids = base.t_biattention_id
    if t_ids and max(t_ids) >= n:
        shift = max(t_ids) - (n - 1)
        t_ids = [max(0, i - shift) for i in t_ids]
    changes = {k: hf_cfg[k] for k in HF_TEXT_CONFIG_KEYS if k in hf_cfg}
    changes.update(num_hidden_layers=n, t_biattention_id=t_ids,
                   hidden_act=hf_cfg.get("hidden_act", "gelu"),
                   layer_norm_eps=hf_cfg.get("layer_norm_eps", base.layer_norm_eps))
    changes.update(overrides)
    return base.replace(**changes)


def load_hf_bert(model: ViLBert, path: str | os.PathLike) -> LoadReport:
    """Initialise the text stream (and the MLM head, when the checkpoint has one) from a local HF
    `BertModel`/`BertForPreTraining` directory. Everything else keeps its initialisation."""
    hf_cfg, state = read_hf_bert(path)
    cfg = model.config
    mismatch = [f"{k}: HF {hf_cfg.get(k)} vs ViLBERT {getattr(cfg, k)}" for k in HF_TEXT_CONFIG_KEYS
                if k in hf_cfg and hf_cfg[k] != getattr(cfg, k)]
    if hf_cfg.get("num_hidden_layers") != cfg.num_hidden_layers:
        mismatch.append(f"num_hidden_layers: HF {hf_cfg.get('num_hidden_layers')} vs ViLBERT {cfg.num_hidden_layers}")
    if mismatch:
        raise CheckpointError(
            f"{path}: the BERT checkpoint does not match the text stream ({'; '.join(mismatch)}); "
            "build the config with vilbert_ds.weights.config_from_hf_bert"
        )
    state = _normalise_keys(state)
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel
        state = {f"bert.{k}": v for k, v in state.items()}
    own = model.state_dict()
    taken, dropped = {}, []
    for key, value in state.items():
        if key.endswith(("position_ids", "token_type_ids")):
            continue  # non-persistent buffers in recent transformers
        if key == "cls.predictions.decoder.bias":
            continue  # HF ties it to cls.predictions.bias
        if key == "cls.predictions.decoder.weight":
            continue  # tied to the word embeddings
        is_text = key.startswith(("bert.embeddings.", "bert.encoder.layer.", "cls.predictions."))
        if is_text and key in own:
            if own[key].shape != value.shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, model {tuple(own[key].shape)}")
            taken[key] = value
        else:
            dropped.append(key)  # bert.pooler.* (ViLBERT has its own ReLU pooler), cls.seq_relationship.*
    expected = [k for k in own if k.startswith(("bert.embeddings.", "bert.encoder.layer."))
                and k != TASK_EMBEDDINGS]
    missing = [k for k in expected if k not in taken]
    if missing:
        raise CheckpointError(f"{path}: text-stream keys missing from the BERT checkpoint: {_abbrev(missing)}")
    with torch.no_grad():
        for key, value in taken.items():
            own[key].copy_(value.to(own[key].dtype))
    untouched = sorted(k for k in own if k not in taken and k != TIED_DECODER)
    return LoadReport(missing=untouched, dropped=dropped)
