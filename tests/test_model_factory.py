"""`model_factory.get_model`, the one way training, evaluation and export get a model: fresh,
text stream from a local HF BERT, a vilbert-ds model directory, an original checkpoint file (a
training checkpoint is covered end to end by tests/test_multitask.py and test_train_distributed.py)."""
from __future__ import annotations

import pytest
import torch

from vilbert_ds.model_factory import TASK_PARTS, get_model, source_kind
from vilbert_ds.weights import CheckpointError, save_model, to_original


def test_fresh_model_dir_and_original_file_give_the_same_weights(tmp_path):
    torch.manual_seed(0)
    fresh = get_model(config="tiny", overrides={"with_task_heads": False})
    assert source_kind("") == "fresh" and not fresh.config.with_task_heads
    save_model(fresh, tmp_path / "dir")
    torch.save(to_original(fresh), tmp_path / "pretrained_model.bin")
    assert source_kind(tmp_path / "dir") == "model_dir" and source_kind(tmp_path / "pretrained_model.bin") == "original"
    from_dir = get_model(tmp_path / "dir")
    from_bin = get_model(tmp_path / "pretrained_model.bin", config="tiny")
    for model in (from_dir, from_bin):
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    # a task run starts from a pretraining model: task heads and task tokens start fresh, the rest is loaded
    for source in (tmp_path / "dir", tmp_path / "pretrained_model.bin"):
        tasks = get_model(source, config="tiny", overrides={"with_task_heads": True, "task_specific_tokens": True},
                          allow_missing=TASK_PARTS)
        assert tasks.config.with_task_heads and tasks.config.task_specific_tokens
        assert torch.equal(tasks.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
                           fresh.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(CheckpointError, match="missing keys"):  # without allow_missing a lacking head is an error
        get_model(tmp_path / "dir", overrides={"with_task_heads": True})
    with pytest.raises(CheckpointError, match="not a model directory"):
        get_model(tmp_path / "nonexistent")


def test_text_stream_from_minilm_takes_its_sizes_over_the_overrides(minilm_dir):
    """The demo config sets a 64-wide text stream; model.init_text_from=minilm (384 wide) used to
    die with a shape traceback. The checkpoint's sizes win (named in the log), the rest stays."""
    model = get_model(config="tiny", overrides={"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                                                "v_hidden_size": 64, "bi_hidden_size": 64}, text_from=str(minilm_dir))
    assert model.config.hidden_size == 384 and model.config.v_hidden_size == 64 and model.config.bi_hidden_size == 64
