"""The ViLBERT model: config, trunk, heads and pretraining losses (forward pass only)."""
from .config import PRESETS, ViLBertConfig, resolve_config
from .model import PRETRAIN_HEADS, TASK_HEADS, ViLBert, ViLBertOutput, count_parameters

__all__ = [
    "PRESETS",
    "PRETRAIN_HEADS",
    "TASK_HEADS",
    "ViLBert",
    "ViLBertConfig",
    "ViLBertOutput",
    "count_parameters",
    "resolve_config",
]
