"""ViLBERT model configuration, read from and written to the original JSON format.

The original `BertConfig` copies every JSON key into its `__dict__`; released configs such as
`bert_base_6layer_6conect.json` therefore carry a few keys that the model never reads. Those are
accepted here (listed in `IGNORED_ORIGINAL_KEYS`) and written back with their values so that a
round trip leaves the file readable by the original code. Any other unknown key is an error:
a typo must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Keys present in released JSON configs (or original BertConfig defaults) that the original
# model never reads. Values are kept for round trips; they change nothing.
IGNORED_ORIGINAL_KEYS = {
    "v_initializer_range",  # init always uses initializer_range
    "bi_intermediate_size",  # co-attention FFNs use each stream's own intermediate size
    "bi_attention_type",
    "pooling_method",  # the code reads fusion_method
    "visual_target",  # a training choice; vilbert-ds keeps it in the pretraining config
    "objective",  # likewise
    "num_negative",
    "visualization",
    "fast_mode",  # vilbert-ds broadcasts a batch-1 text stream automatically (see ViLBert.forward)
}

# Original options whose non-default value vilbert-ds does not implement: refused, not ignored.
UNSUPPORTED_ORIGINAL_OPTIONS = {
    "dynamic_attention": False,
    "in_batch_pairs": False,
    "with_coattention": True,
    "model": "bert",
}

ACTIVATIONS = ("gelu", "relu", "swish")
FUSIONS = ("mul", "sum")
ATTENTION_IMPLS = ("sdpa", "eager")


@dataclass
class ViLBertConfig:
    """Every field the ViLBERT forward pass reads, with the original names and defaults of
    `bert_base_6layer_6conect.json` (the 12-in-1 base model)."""

    # text stream (BERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # vision stream
    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    # co-attention
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    fusion_method: str = "mul"
    # 12-in-1
    task_specific_tokens: bool = False
    num_task_tokens: int = 20
    # leading layers run without gradients (the original's freezing)
    fixed_t_layer: int = 0
    fixed_v_layer: int = 0
    # vilbert-ds additions (not in original files; the original code ignores unknown keys)
    with_task_heads: bool = True  # VILBertForVLTasks heads (vil_*, vision_logit, linguisic_logit)
    num_vqa_labels: int = 3129  # hard-coded in the original
    num_gqa_labels: int = 1533  # hard-coded in the original
    attention_impl: str = "sdpa"  # "eager" is the original's explicit masked softmax
    gradient_checkpointing: bool = False
    layer_norm_eps: float = 1e-12
    # original keys that change nothing, kept for round trips
    ignored: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        errors = []
        if len(self.v_biattention_id) != len(self.t_biattention_id):
            errors.append(
                f"v_biattention_id {self.v_biattention_id} and t_biattention_id {self.t_biattention_id} "
                "must have the same length (one co-attention block per pair)"
            )
        if self.v_biattention_id != sorted(self.v_biattention_id) or self.t_biattention_id != sorted(
            self.t_biattention_id
        ):
            errors.append("v_biattention_id and t_biattention_id must be non-decreasing")
        if self.v_biattention_id and max(self.v_biattention_id) >= max(self.v_num_hidden_layers, 1):
            errors.append(f"v_biattention_id {self.v_biattention_id} must be < v_num_hidden_layers={self.v_num_hidden_layers}")
        if self.t_biattention_id and max(self.t_biattention_id) >= self.num_hidden_layers:
            errors.append(f"t_biattention_id {self.t_biattention_id} must be < num_hidden_layers={self.num_hidden_layers}")
        for width, heads, name in (
            (self.hidden_size, self.num_attention_heads, "hidden_size/num_attention_heads"),
            (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size/v_num_attention_heads"),
            (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size/bi_num_attention_heads"),
        ):
            if heads <= 0 or width % heads:
                errors.append(f"{name}: {width} is not a multiple of {heads}")
        for name in ("hidden_act", "v_hidden_act"):
            if getattr(self, name) not in ACTIVATIONS:
                errors.append(f"{name}={getattr(self, name)!r}: choose one of {ACTIVATIONS}")
        if self.fusion_method not in FUSIONS:
            errors.append(f"fusion_method={self.fusion_method!r}: choose one of {FUSIONS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            errors.append(f"attention_impl={self.attention_impl!r}: choose one of {ATTENTION_IMPLS}")
        first_t = self.t_biattention_id[0] if self.t_biattention_id else self.num_hidden_layers
        first_v = self.v_biattention_id[0] if self.v_biattention_id else self.v_num_hidden_layers
        if not 0 <= self.fixed_t_layer <= first_t:
            errors.append(f"fixed_t_layer={self.fixed_t_layer} must be within [0, {first_t}] (the first co-attention text id)")
        if not 0 <= self.fixed_v_layer <= first_v:
            errors.append(f"fixed_v_layer={self.fixed_v_layer} must be within [0, {first_v}] (the first co-attention vision id)")
        if errors:
            raise ValueError("invalid ViLBERT config:\n  " + "\n  ".join(errors))

    # ---------------------------------------------------------------- JSON (original format)
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ViLBertConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"ignored"}
        kwargs: dict[str, Any] = {}
        ignored: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in IGNORED_ORIGINAL_KEYS:
                ignored[key] = value
            elif key in UNSUPPORTED_ORIGINAL_OPTIONS:
                if value != UNSUPPORTED_ORIGINAL_OPTIONS[key]:
                    raise ValueError(
                        f"{source}: {key}={value!r} is an original option vilbert-ds does not implement "
                        f"(supported: {UNSUPPORTED_ORIGINAL_OPTIONS[key]!r})"
                    )
                ignored[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{source}: unknown ViLBERT config keys {sorted(unknown)}")
        for key in ("v_biattention_id", "t_biattention_id"):
            if key in kwargs:
                kwargs[key] = [int(i) for i in kwargs[key]]
        return cls(**kwargs, ignored=ignored)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ViLBertConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a ViLBERT config must be a JSON object")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ignored"}
        data.update(self.ignored)
        return data

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> "ViLBertConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------- presets
def base_6layer_6conect(**overrides: Any) -> ViLBertConfig:
    """`bert_base_6layer_6conect.json`: BERT-base text stream, 6 vision layers, 6 co-attention blocks."""
    return ViLBertConfig(**overrides)


def base_2layer_2conect(**overrides: Any) -> ViLBertConfig:
    """`bert_base_2layer_2conect.json`: 2 vision layers, co-attention after text layers 10 and 11."""
    cfg = dict(v_num_hidden_layers=2, v_biattention_id=[0, 1], t_biattention_id=[10, 11])
    cfg.update(overrides)
    return ViLBertConfig(**cfg)


def large_6layer_6conect(**overrides: Any) -> ViLBertConfig:
    """`bert_large_6layer_6conect.json`: BERT-large text stream, the base vision stream."""
    cfg = dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        t_biattention_id=[18, 19, 20, 21, 22, 23],
    )
    cfg.update(overrides)
    return ViLBertConfig(**cfg)


def tiny(**overrides: Any) -> ViLBertConfig:
    """A test-sized model with every structural feature of the base one: leading text layers,
    co-attention blocks, a trailing vision and text layer, and task heads."""
    cfg = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        v_feature_size=2048,
        v_target_size=1601,
        v_hidden_size=48,
        v_num_hidden_layers=3,
        v_num_attention_heads=2,
        v_intermediate_size=48,
        bi_hidden_size=40,
        bi_num_attention_heads=2,
        v_biattention_id=[0, 1],
        t_biattention_id=[1, 2],
        num_vqa_labels=3129,
        num_gqa_labels=1533,
    )
    cfg.update(overrides)
    return ViLBertConfig(**cfg)


PRESETS = {
    "base_6layer_6conect": base_6layer_6conect,
    "base_2layer_2conect": base_2layer_2conect,
    "large_6layer_6conect": large_6layer_6conect,
    "tiny": tiny,
}


def resolve_config(spec: "str | os.PathLike | ViLBertConfig | dict", **overrides: Any) -> ViLBertConfig:
    """A config from a preset name, an original-format JSON path, a dict or a config."""
    if isinstance(spec, ViLBertConfig):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, dict):
        return ViLBertConfig.from_dict({**spec, **overrides})
    spec = os.fspath(spec)
    if spec in PRESETS:
        return PRESETS[spec](**overrides)
    if os.path.isdir(spec):
        spec = os.path.join(spec, "config.json")
    if not os.path.exists(spec):
        raise FileNotFoundError(
            f"model config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file"
        )
    cfg = ViLBertConfig.from_json(spec)
    return cfg.replace(**overrides) if overrides else cfg
