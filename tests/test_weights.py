"""Weights in and out: the original key layout, conversion round trips, refused checkpoints,
vilbert-ds model directories and original-format JSON configs."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import vilbert_ds
from vilbert_ds import CheckpointError
from vilbert_ds.model import ViLBert, count_parameters, resolve_config
from vilbert_ds.weights import TIED_DECODER, WORD_EMBEDDINGS, read_state_dict, to_original

# ------------------------------------------------------- the original base key list
# /work/shared/reference/original_keys_base6_tasktokens.tsv (560 lines "key<TAB>shape", read from
# the original VILBertForVLTasks on bert_base_6layer_6conect.json with task tokens), encoded
# as templates; ORIGINAL_TSV_SHA256 proves the expansion reproduces that file byte for byte.
ORIGINAL_TSV_SHA256 = "43718dfd7dafc17e00289c3d2d6db871ead4d9dcf9ea2b54d7818ba16e741c4f"
BASE_PARAMS_WITH_TASK_TOKENS = 268_028_859
BASE_PARAMS_WITHOUT_TASK_TOKENS = 268_013_499


def _layer(w: int, inner: int) -> list[tuple[str, str]]:
    keys = [(f"attention.self.{p}.{s}", f"{w}x{w}" if s == "weight" else f"{w}")
            for p in ("query", "key", "value") for s in ("weight", "bias")]
    keys += [("attention.output.dense.weight", f"{w}x{w}"), ("attention.output.dense.bias", f"{w}"),
             ("attention.output.LayerNorm.weight", f"{w}"), ("attention.output.LayerNorm.bias", f"{w}"),
             ("intermediate.dense.weight", f"{inner}x{w}"), ("intermediate.dense.bias", f"{inner}"),
             ("output.dense.weight", f"{w}x{inner}"), ("output.dense.bias", f"{w}"),
             ("output.LayerNorm.weight", f"{w}"), ("output.LayerNorm.bias", f"{w}")]
    return keys


def _c_layer(t: int, v: int, c: int, t_inner: int, v_inner: int) -> list[tuple[str, str]]:
    keys = [(f"biattention.{p}1.{s}", f"{c}x{v}" if s == "weight" else f"{c}")
            for p in ("query", "key", "value") for s in ("weight", "bias")]
    keys += [(f"biattention.{p}2.{s}", f"{c}x{t}" if s == "weight" else f"{c}")
             for p in ("query", "key", "value") for s in ("weight", "bias")]
    for i, w in (("1", v), ("2", t)):
        keys += [(f"biOutput.dense{i}.weight", f"{w}x{c}"), (f"biOutput.dense{i}.bias", f"{w}"),
                 (f"biOutput.LayerNorm{i}.weight", f"{w}"), (f"biOutput.LayerNorm{i}.bias", f"{w}"),
                 (f"biOutput.q_dense{i}.weight", f"{w}x{c}"), (f"biOutput.q_dense{i}.bias", f"{w}")]
    for s, w, inner in (("v", v, v_inner), ("t", t, t_inner)):
        keys += [(f"{s}_intermediate.dense.weight", f"{inner}x{w}"), (f"{s}_intermediate.dense.bias", f"{inner}"),
                 (f"{s}_output.dense.weight", f"{w}x{inner}"), (f"{s}_output.dense.bias", f"{w}"),
                 (f"{s}_output.LayerNorm.weight", f"{w}"), (f"{s}_output.LayerNorm.bias", f"{w}")]
    return keys


def _classifier(name: str, i: int, h: int, o: int) -> list[tuple[str, str]]:
    return [(f"{name}.logit_fc.0.weight", f"{h}x{i}"), (f"{name}.logit_fc.0.bias", f"{h}"),
            (f"{name}.logit_fc.2.weight", f"{h}"), (f"{name}.logit_fc.2.bias", f"{h}"),
            (f"{name}.logit_fc.3.weight", f"{o}x{h}"), (f"{name}.logit_fc.3.bias", f"{o}")]


def original_base_keys() -> list[tuple[str, str]]:
    keys = [("bert.embeddings.word_embeddings.weight", "30522x768"),
            ("bert.embeddings.position_embeddings.weight", "512x768"),
            ("bert.embeddings.token_type_embeddings.weight", "2x768"),
            ("bert.embeddings.LayerNorm.weight", "768"), ("bert.embeddings.LayerNorm.bias", "768"),
            ("bert.embeddings.task_embeddings.weight", "20x768"),
            ("bert.v_embeddings.image_embeddings.weight", "1024x2048"), ("bert.v_embeddings.image_embeddings.bias", "1024"),
            ("bert.v_embeddings.image_location_embeddings.weight", "1024x5"),
            ("bert.v_embeddings.image_location_embeddings.bias", "1024"),
            ("bert.v_embeddings.LayerNorm.weight", "1024"), ("bert.v_embeddings.LayerNorm.bias", "1024")]
    keys += [(f"bert.encoder.layer.{i}.{k}", s) for i in range(12) for k, s in _layer(768, 3072)]
    keys += [(f"bert.encoder.v_layer.{i}.{k}", s) for i in range(6) for k, s in _layer(1024, 1024)]
    keys += [(f"bert.encoder.c_layer.{i}.{k}", s) for i in range(6) for k, s in _c_layer(768, 1024, 1024, 3072, 1024)]
    keys += [("bert.t_pooler.dense.weight", "1024x768"), ("bert.t_pooler.dense.bias", "1024"),
             ("bert.v_pooler.dense.weight", "1024x1024"), ("bert.v_pooler.dense.bias", "1024"),
             ("cls.predictions.bias", "30522"),
             ("cls.predictions.transform.dense.weight", "768x768"), ("cls.predictions.transform.dense.bias", "768"),
             ("cls.predictions.transform.LayerNorm.weight", "768"), ("cls.predictions.transform.LayerNorm.bias", "768"),
             ("cls.predictions.decoder.weight", "30522x768"),
             ("cls.bi_seq_relationship.weight", "2x1024"), ("cls.bi_seq_relationship.bias", "2"),
             ("cls.imagePredictions.transform.dense.weight", "1024x1024"),
             ("cls.imagePredictions.transform.dense.bias", "1024"),
             ("cls.imagePredictions.transform.LayerNorm.weight", "1024"),
             ("cls.imagePredictions.transform.LayerNorm.bias", "1024"),
             ("cls.imagePredictions.decoder.weight", "1601x1024"), ("cls.imagePredictions.decoder.bias", "1601")]
    keys += _classifier("vil_prediction", 1024, 2048, 3129)
    keys += _classifier("vil_prediction_gqa", 1024, 2048, 1533)
    keys += _classifier("vil_binary_prediction", 2048, 2048, 2)
    keys += [("vil_logit.weight", "1x1024"), ("vil_logit.bias", "1"), ("vil_tri_prediction.weight", "3x1024"),
             ("vil_tri_prediction.bias", "3"), ("vision_logit.weight", "1x1024"), ("vision_logit.bias", "1"),
             ("linguisic_logit.weight", "1x768"), ("linguisic_logit.bias", "1")]
    return keys


def _tsv(keys) -> str:
    return "".join(f"{k}\t{s}\n" for k, s in keys)


def _ours(model) -> list[tuple[str, str]]:
    return [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]


def test_base_model_has_the_original_keys_shapes_and_parameter_count():
    expected = original_base_keys()
    assert len(expected) == 560
    assert hashlib.sha256(_tsv(expected).encode()).hexdigest() == ORIGINAL_TSV_SHA256
    with torch.device("meta"):  # shapes only: no 1 GB of random numbers
        with_tokens = ViLBert(resolve_config("base_6layer_6conect", task_specific_tokens=True))
        without = ViLBert(resolve_config("base_6layer_6conect"))
    assert _ours(with_tokens) == expected  # same keys, same shapes, same order
    assert _ours(without) == [kv for kv in expected if kv[0] != "bert.embeddings.task_embeddings.weight"]
    assert count_parameters(with_tokens) == BASE_PARAMS_WITH_TASK_TOKENS
    assert count_parameters(without) == BASE_PARAMS_WITHOUT_TASK_TOKENS
    q_dense = sum(p.numel() for n, p in with_tokens.named_parameters() if ".q_dense" in n)
    trainable = sum(p.numel() for p in {id(p): p for p in with_tokens.parameters() if p.requires_grad}.values())
    assert trainable == BASE_PARAMS_WITH_TASK_TOKENS - q_dense and q_dense == 6 * (1024 * 1025 + 768 * 1025)


# -------------------------------------------------------------------- conversion
def test_round_trip_ours_original_ours_is_bitwise(random_tiny_model, tmp_path):
    model = random_tiny_model(task_specific_tokens=True, dtype=torch.float32)
    original = to_original(model)
    assert torch.equal(original[TIED_DECODER], original[WORD_EMBEDDINGS])
    assert original[TIED_DECODER].data_ptr() != original[WORD_EMBEDDINGS].data_ptr()  # a real copy, as saved
    torch.save(original, tmp_path / "multi_task_model.bin")
    for source in (original, tmp_path / "multi_task_model.bin"):
        back = vilbert_ds.from_original(source, model.config)
        assert back.config.task_specific_tokens and back.config.with_task_heads
        assert back.load_report.missing == [] and back.load_report.dropped == []
        mine, theirs = model.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight  # still tied


def test_pretraining_checkpoint_gets_no_task_heads_unless_asked(random_tiny_model):
    state = to_original(random_tiny_model(with_task_heads=False, dtype=torch.float32))
    model = vilbert_ds.from_original(state, "tiny")  # the preset says with_task_heads=true: keys decide
    assert not model.config.with_task_heads and not hasattr(model, "vil_prediction")
    fresh = vilbert_ds.from_original(state, "tiny", task_heads=True)
    assert fresh.config.with_task_heads and hasattr(fresh, "vil_prediction")
    assert "vil_prediction.logit_fc.0.weight" in fresh.load_report.missing
    assert all(k.startswith(("vil_", "vision_logit", "linguisic_logit")) for k in fresh.load_report.missing)


def test_module_prefix_and_tf_gamma_beta_names(random_tiny_model):
    model = random_tiny_model(dtype=torch.float32)
    state = to_original(model)
    renamed = {}
    for k, v in state.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        k = k.replace("LayerNorm1.weight", "LayerNorm1.gamma").replace("LayerNorm2.bias", "LayerNorm2.beta")
        renamed[f"module.{k}"] = v
    assert any(k.endswith(".gamma") for k in renamed) and any(k.endswith("LayerNorm2.beta") for k in renamed)
    back = vilbert_ds.from_original(renamed, model.config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_vilbert_beta_weight_norm_head_is_dropped_and_reported(random_tiny_model):
    """vilbert_beta VL checkpoints: same trunk keys; `vil_prediction.main.*` (weight-norm) has no
    12-in-1 counterpart and is dropped, named in the report."""
    model = random_tiny_model(dtype=torch.float32)
    state = {k: v for k, v in to_original(model).items() if not k.startswith(("vil_prediction", "vil_binary",
                                                                                "vil_tri"))}
    state.update({"vil_prediction.main.0.weight_g": torch.ones(()), "vil_prediction.main.0.weight_v": torch.ones(4, 3),
                  "vil_prediction.main.0.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"missing keys .*vil_prediction\.logit_fc"):
        vilbert_ds.from_original(state, model.config)
    beta = vilbert_ds.from_original(state, model.config, allow_missing=True)
    assert any("vil_prediction.main.0.weight_g" in d and "vilbert_beta" in d for d in beta.load_report.dropped)
    assert torch.equal(beta.vil_logit.weight, model.vil_logit.weight)
    assert torch.equal(beta.bert.encoder.c_layer[0].biattention.query1.weight,
                       model.bert.encoder.c_layer[0].biattention.query1.weight)


# ------------------------------------------------------------- refused checkpoints
@pytest.fixture
def tiny_state(random_tiny_model):
    return to_original(random_tiny_model(dtype=torch.float32))


def test_missing_unexpected_and_mismatched_keys_are_named(tiny_state):
    cfg = resolve_config("tiny")
    missing = dict(tiny_state)
    del missing["bert.encoder.c_layer.1.biattention.key2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): bert\.encoder\.c_layer\.1\.biattention\.key2\.bias"
                                              r".*--allow-missing"):
        vilbert_ds.from_original(missing, cfg)
    extra = dict(tiny_state, **{"bert.encoder.layer.9.output.dense.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): bert\.encoder\.layer\.9\.output\.dense\.weight"):
        vilbert_ds.from_original(extra, cfg)
    bad = dict(tiny_state, **{"bert.t_pooler.dense.weight": torch.zeros(7, 32)})
    with pytest.raises(CheckpointError, match=r"bert\.t_pooler\.dense\.weight: file \(7, 32\) vs model \(40, 32\)"):
        vilbert_ds.from_original(bad, cfg)
    untied = dict(tiny_state, **{TIED_DECODER: tiny_state[TIED_DECODER] + 1})
    with pytest.raises(CheckpointError, match="tied"):
        vilbert_ds.from_original(untied, cfg)


def test_allow_missing_lists_the_keys_left_at_fresh_init(tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("bert.v_pooler.")}
    model = vilbert_ds.from_original(state, "tiny", allow_missing=True)
    assert model.load_report.missing == ["bert.v_pooler.dense.bias", "bert.v_pooler.dense.weight"]
    assert "2 keys left at fresh init: bert.v_pooler.dense.bias" in model.load_report.summary()
    assert torch.equal(model.bert.t_pooler.dense.weight, tiny_state["bert.t_pooler.dense.weight"])


def test_pickle_with_code_is_refused_and_never_run(tiny_state, tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.bin"
    torch.save({**tiny_state, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.bin: cannot be read as a weights-only .*must not be able to run code"):
        vilbert_ds.from_original(path, "tiny")
    assert not marker.exists()


def test_truncated_non_tensor_and_absent_files(tiny_state, tmp_path):
    whole = tmp_path / "whole.bin"
    torch.save(tiny_state, whole)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.bin: cannot be read"):
        vilbert_ds.from_original(cut, "tiny")
    mixed = tmp_path / "mixed.bin"
    torch.save({"bert.t_pooler.dense.weight": torch.zeros(2), "epoch": 3}, mixed)
    with pytest.raises(CheckpointError, match=r"mixed\.bin: not a state dict of tensors .*epoch"):
        read_state_dict(mixed)
    not_dict = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], not_dict)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        read_state_dict(not_dict)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        vilbert_ds.from_original(tmp_path / "nope.bin", "tiny")


def test_original_format_safetensors_file_converts(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != TIED_DECODER}  # safetensors refuses shared tensors
    save_file(state, str(tmp_path / "model.safetensors"))
    model = vilbert_ds.from_original(tmp_path / "model.safetensors", "tiny")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, tiny_state[WORD_EMBEDDINGS])


# --------------------------------------------------------- vilbert-ds model directories
def test_save_model_and_load_model(random_tiny_model, tiny_batch, tmp_path):
    model = random_tiny_model(task_specific_tokens=True, dtype=torch.float32)
    vilbert_ds.save_model(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert TIED_DECODER not in stored and len(stored) == len(model.state_dict()) - 1
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["task_specific_tokens"] is True and config["v_biattention_id"] == [0, 1]
    loaded = vilbert_ds.load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    batch = tiny_batch(model.config, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**batch).vil_prediction, loaded(**batch).vil_prediction)
    with pytest.raises(FileNotFoundError, match="not a vilbert-ds model directory.*vilbert-ds convert"):
        vilbert_ds.load_model(tmp_path)


# ------------------------------------------------------------- original JSON configs
TINY_ORIGINAL_JSON = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 32,
    "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 64, "num_attention_heads": 2,
    "num_hidden_layers": 3, "type_vocab_size": 2, "vocab_size": 120, "v_feature_size": 2048, "v_target_size": 1601,
    "v_hidden_size": 24, "v_num_hidden_layers": 2, "v_num_attention_heads": 2, "v_intermediate_size": 24,
    "bi_hidden_size": 16, "bi_num_attention_heads": 2, "bi_intermediate_size": 1024, "bi_attention_type": 1,
    "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu", "v_hidden_dropout_prob": 0.1,
    "v_initializer_range": 0.02, "v_biattention_id": [0, 1], "t_biattention_id": [1, 2], "pooling_method": "mul",
    "task_specific_tokens": True,
}


def test_build_model_from_an_original_format_json(tmp_path):
    path = tmp_path / "bert_tiny_2conect.json"
    path.write_text(json.dumps(TINY_ORIGINAL_JSON))
    model = vilbert_ds.build_model(path)
    assert model.bert.embeddings.task_embeddings.weight.shape == (20, 32)
    assert model.config.v_biattention_id == [0, 1] and model.config.hidden_size == 32
    assert len(model.bert.encoder.c_layer) == 2 and len(model.bert.encoder.v_layer) == 2
    # keys the original never reads are kept for the round trip, not interpreted
    model.config.to_json(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["pooling_method"] == "mul" and again["bi_intermediate_size"] == 1024
    assert {k: again[k] for k in TINY_ORIGINAL_JSON} == TINY_ORIGINAL_JSON


@pytest.mark.parametrize("change, message", [
    ({"hiden_size": 32}, r"unknown ViLBERT config keys \['hiden_size'\]"),
    ({"dynamic_attention": True}, "dynamic_attention=True is an original option vilbert-ds does not implement"),
    ({"in_batch_pairs": True}, "in_batch_pairs=True"),
    ({"with_coattention": False}, "with_coattention=False"),
    ({"t_biattention_id": [1]}, "must have the same length"),
    ({"v_biattention_id": [0, 5]}, "must be < v_num_hidden_layers=2"),
    ({"fusion_method": "concat"}, "fusion_method='concat'"),
])
def test_bad_configs_are_refused_with_the_key_named(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY_ORIGINAL_JSON, **change}))
    with pytest.raises(ValueError, match=message):
        vilbert_ds.build_model(path)
