"""vilbert-ds: DeepSpeed-scaled training of ViLBERT and 12-in-1 multi-task ViLBERT.

Python API:
    build_model(config_json_or_preset)       a freshly initialised ViLBert
    from_original(state_dict_or_path, cfg)   convert an original checkpoint in memory
    load_model(directory)                    load a vilbert-ds model directory
    get_model(source, config=...)            fresh, model directory, original checkpoint or training
                                             run: the one model source of training, eval and export
    save_model(model, directory)             write config.json + model.safetensors
    Predictor.from_pretrained(directory)     ask the model: answers, classes, boxes, rankings, embeddings
"""
from .model import ViLBert, ViLBertConfig, ViLBertOutput, count_parameters, resolve_config
from .weights import (
    CheckpointError,
    build_model,
    config_from_hf_bert,
    from_original,
    load_hf_bert,
    load_model,
    save_model,
    to_original,
)

from .model_factory import get_model  # noqa: E402 - above weights and checkpoint
from .predict import Predictor, Query  # noqa: E402 - above the model factory

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Predictor",
    "Query",
    "ViLBert",
    "ViLBertConfig",
    "ViLBertOutput",
    "build_model",
    "config_from_hf_bert",
    "count_parameters",
    "from_original",
    "get_model",
    "load_hf_bert",
    "load_model",
    "resolve_config",
    "save_model",
    "to_original",
]
