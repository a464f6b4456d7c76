"""A converted original checkpoint reproduces the ORIGINAL code's outputs.

The expected values were produced by facebookresearch/vilbert-multi-task's own `vilbert.py`
(tests/fixtures/parity/README.md says how); no original code runs here. Tolerances are the
issue's: 1e-10 in float64, 1e-5 in float32, for both attention implementations.
"""
from __future__ import annotations

import json

import pytest
import torch

import vilbert_ds
from vilbert_ds.model import ViLBertConfig

TIED_DECODER = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
TASK_EMBEDDINGS = "bert.embeddings.task_embeddings.weight"
TOL = {"f64": 1e-10, "f32": 1e-5}
DTYPE = {"f64": torch.float64, "f32": torch.float32}
# original output name -> vilbert-ds field
FIELDS = {
    "vil_prediction": "vil_prediction", "vil_prediction_gqa": "vil_prediction_gqa", "vil_logit": "vil_logit",
    "vil_binary_prediction": "vil_binary_prediction", "vil_tri_prediction": "vil_tri_prediction",
    "vision_prediction": "vision_prediction", "vision_logit": "vision_logit",
    "linguisic_prediction": "text_prediction", "linguisic_logit": "linguisic_logit",
    "pooled_output_t": "pooled_output_t", "pooled_output_v": "pooled_output_v",
    "sequence_output_t": "sequence_output_t", "sequence_output_v": "sequence_output_v",
}


def original_state(fx: dict, precision: str, pretraining: bool = False) -> dict[str, torch.Tensor]:
    """The state dict the original code saves: tied decoder present; `pretrained_model.bin` has
    no task embeddings and no task heads."""
    state = {k: v.to(DTYPE[precision]) for k, v in fx["weights"].items()}
    state[TIED_DECODER] = state[WORD_EMBEDDINGS]
    if pretraining:
        state = {k: v for k, v in state.items() if k.startswith(("bert.", "cls.")) and k != TASK_EMBEDDINGS}
    return state


def convert(fx: dict, precision: str, impl: str, pretraining: bool = False) -> vilbert_ds.ViLBert:
    # the pretraining run of the original used the same JSON without task tokens
    config = ViLBertConfig.from_dict({**fx["config"], "task_specific_tokens": not pretraining})
    config = config.replace(attention_impl=impl)
    state = original_state(fx, precision, pretraining)
    return vilbert_ds.from_original(state, config).to(DTYPE[precision]).eval()


def inputs(fx: dict, precision: str, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    x = fx["inputs"]
    return {
        "input_ids": x["input_ids"][rows], "image_feat": x["image_feat"][rows].to(DTYPE[precision]),
        "image_loc": x["image_loc"][rows].to(DTYPE[precision]), "token_type_ids": x["token_type_ids"][rows],
        "attention_mask": x["attention_mask"][rows], "image_attention_mask": x["image_attention_mask"][rows],
        "task_ids": x["task_ids"][rows],
    }


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs original {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol, f"{name}: max |ours - original| = {diff:.3e} > {tol:g}"


@pytest.fixture(scope="module", params=[(p, i) for p in ("f64", "f32") for i in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, parity_fixture):
    precision, impl = request.param
    return precision, convert(parity_fixture, precision, impl)


def test_every_head_and_pooled_output(converted, parity_fixture):
    precision, model = converted
    want = parity_fixture["expected"][precision]
    with torch.no_grad():
        out = model(**inputs(parity_fixture, precision))
    for original_name, field in FIELDS.items():
        assert_close(original_name, getattr(out, field), want[f"vl/{original_name}"], TOL[precision])


def test_odd_batch_binary_fallback(converted, parity_fixture):
    """With an odd batch the original returns the alignment logits as vil_binary_prediction."""
    precision, model = converted
    want = parity_fixture["expected"][precision]
    with torch.no_grad():
        out = model(**inputs(parity_fixture, precision, slice(0, 3)))
    assert_close("vil_binary_prediction (odd)", out.vil_binary_prediction, want["vl_odd/vil_binary_prediction"],
                 TOL[precision])
    assert_close("vil_logit (odd)", out.vil_logit, want["vl_odd/vil_logit"], TOL[precision])


def test_output_all_encoded_layers(converted, parity_fixture):
    """Per-block states, and the original's quirk of pooling from the last co-attention block."""
    precision, model = converted
    want = parity_fixture["expected"][precision]
    with torch.no_grad():
        out = model(**inputs(parity_fixture, precision), output_all_encoded_layers=True)
    n_blocks = len(model.config.v_biattention_id)
    assert len(out.all_text_states) == len(out.all_vision_states) == n_blocks
    for k in range(n_blocks):
        assert_close(f"text block {k}", out.all_text_states[k], want[f"all_layers/text_{k}"], TOL[precision])
        assert_close(f"vision block {k}", out.all_vision_states[k], want[f"all_layers/vision_{k}"], TOL[precision])
    assert_close("pooled_output_t (all layers)", out.pooled_output_t, want["all_layers/pooled_output_t"], TOL[precision])
    assert_close("pooled_output_v (all layers)", out.pooled_output_v, want["all_layers/pooled_output_v"], TOL[precision])


def test_fast_mode_broadcast(converted, parity_fixture):
    """A text batch of 1 against N images equals the original's fast_mode (retrieval eval)."""
    precision, model = converted
    want = parity_fixture["expected"][precision]
    x = inputs(parity_fixture, precision)
    for key in ("input_ids", "token_type_ids", "attention_mask", "task_ids"):
        x[key] = x[key][:1]
    with torch.no_grad():
        out = model(**x, heads=["vil_logit", "vision_logit"])
    assert_close("fast_mode vil_logit", out.vil_logit, want["fast_mode/vil_logit"], TOL[precision])
    assert_close("fast_mode vision_logit", out.vision_logit, want["fast_mode/vision_logit"], TOL[precision])


@pytest.mark.parametrize("precision", ["f64", "f32"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pretraining_logits_and_losses(parity_fixture, precision, impl):
    """`pretrained_model.bin` (bert.* + cls.*): the model has no task heads and the three losses
    equal BertForMultiModalPreTraining's with labels."""
    model = convert(parity_fixture, precision, impl, pretraining=True)
    assert not model.config.with_task_heads and not model.config.task_specific_tokens
    want = parity_fixture["expected"][precision]
    x = inputs(parity_fixture, precision)
    del x["task_ids"]
    labels = {k: parity_fixture["inputs"][k] for k in ("masked_lm_labels", "image_label", "next_sentence_label")}
    labels["image_target"] = parity_fixture["inputs"]["image_target"].to(DTYPE[precision])
    with torch.no_grad():
        out = model(**x, **labels)
    for name in ("text_prediction", "vision_prediction", "seq_relationship"):
        assert_close(name, getattr(out, name), want[f"pretrain/{name}"], TOL[precision])
    for name in ("masked_lm_loss", "masked_img_loss", "next_sentence_loss"):
        assert_close(name, getattr(out, name).reshape(1), want[f"pretrain/{name}"], TOL[precision])


def test_checkpoint_files_with_and_without_module_prefix(parity_fixture, tmp_path):
    """The original's .bin files (torch pickles, DDP `module.` prefix or not) convert to the same
    outputs through the file path API."""
    state = original_state(parity_fixture, "f64")
    plain, prefixed = tmp_path / "multi_task_model.bin", tmp_path / "module_multi_task_model.bin"
    torch.save(state, plain)
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    config = ViLBertConfig.from_dict(parity_fixture["config"])
    want = parity_fixture["expected"]["f64"]
    for path in (plain, prefixed):
        model = vilbert_ds.from_original(path, config).double().eval()
        with torch.no_grad():
            out = model(**inputs(parity_fixture, "f64"), heads=["vil_prediction", "vision_logit"])
        assert_close(f"{path.name} vil_prediction", out.vil_prediction, want["vl/vil_prediction"], TOL["f64"])
        assert_close(f"{path.name} vision_logit", out.vision_logit, want["vl/vision_logit"], TOL["f64"])


def test_fixture_is_small_and_exercises_padding(parity_fixture):
    """The fixture stays small, and its inputs really contain text and region padding."""
    from fixtures.model import PARITY_DIR

    assert (PARITY_DIR / "tiny_parity.safetensors").stat().st_size < 2_000_000
    x = parity_fixture["inputs"]
    assert (x["attention_mask"] == 0).any() and (x["image_attention_mask"] == 0).any()
    assert (x["masked_lm_labels"] != -1).any() and (x["image_label"] == 1).any()


# ------------------------------------------------------------------------------ further cases
# tests/fixtures/parity/tiny_parity_cases.safetensors (same generator, same inputs): the model
# without task tokens, visual_target 1, and vilbert_beta; original_keys.json: the key sets and
# shapes of the original classes' state dicts.
BETA_ABSENT_HEADS = ["vil_prediction.", "vil_prediction_gqa.", "vil_binary_prediction.", "vil_tri_prediction."]


@pytest.fixture(scope="module")
def parity_cases() -> dict:
    from safetensors.torch import load_file

    from fixtures.model import PARITY_DIR

    out: dict = {"vt1_weights": {}, "beta_weights": {}, "expected": {"f64": {}, "f32": {}}}
    for key, value in load_file(str(PARITY_DIR / "tiny_parity_cases.safetensors")).items():
        kind, rest = key.split("/", 1)
        if kind == "expected":
            precision, name = rest.split("/", 1)
            out["expected"][precision][name] = value
        else:
            out[kind][rest] = value
    out["keys"] = json.loads((PARITY_DIR / "original_keys.json").read_text())
    return out


def beta_state(cases: dict, precision: str, pretraining: bool = False) -> dict[str, torch.Tensor]:
    state = {k: v.to(DTYPE[precision]) for k, v in cases["beta_weights"].items()}
    state[TIED_DECODER] = state[WORD_EMBEDDINGS]
    if pretraining:
        state = {k: v for k, v in state.items() if k.startswith(("bert.", "cls."))}
    return state


def no_task_config(fx: dict, impl: str, **extra) -> ViLBertConfig:
    return ViLBertConfig.from_dict({**fx["config"], "task_specific_tokens": False, **extra}).replace(attention_impl=impl)


PRECISION_IMPL = [(p, i) for p in ("f64", "f32") for i in ("sdpa", "eager")]


@pytest.mark.parametrize("precision,impl", PRECISION_IMPL)
def test_model_without_task_tokens(parity_fixture, parity_cases, precision, impl):
    """`VILBertForVLTasks` without task tokens (the original's default): every head."""
    state = {k: v for k, v in original_state(parity_fixture, precision).items() if k != TASK_EMBEDDINGS}
    model = vilbert_ds.from_original(state, no_task_config(parity_fixture, impl)).to(DTYPE[precision]).eval()
    assert not model.config.task_specific_tokens
    x = inputs(parity_fixture, precision)
    x["task_ids"] = None
    want = parity_cases["expected"][precision]
    with torch.no_grad():
        out = model(**x)
    for name, field in FIELDS.items():
        if f"notask/{name}" in want:
            assert_close(f"no task tokens: {name}", getattr(out, field), want[f"notask/{name}"], TOL[precision])


@pytest.mark.parametrize("precision,impl", PRECISION_IMPL)
def test_pretraining_visual_target_1(parity_fixture, parity_cases, precision, impl):
    """`visual_target 1`: the region head regresses the unmasked features (MSE over the masked
    regions), v_target_size = v_feature_size."""
    state = original_state(parity_fixture, precision, pretraining=True)
    state.update({k: v.to(DTYPE[precision]) for k, v in parity_cases["vt1_weights"].items()})
    cfg = no_task_config(parity_fixture, impl, v_target_size=parity_fixture["config"]["v_feature_size"])
    model = vilbert_ds.from_original(state, cfg).to(DTYPE[precision]).eval()
    x = inputs(parity_fixture, precision)
    del x["task_ids"]
    labels = {k: parity_fixture["inputs"][k] for k in ("masked_lm_labels", "image_label", "next_sentence_label")}
    want = parity_cases["expected"][precision]
    with torch.no_grad():
        out = model(**x, **labels, image_target=x["image_feat"][:, 1:], visual_target=1)
    assert_close("visual_target 1 vision_prediction", out.vision_prediction, want["vt1/vision_prediction"],
                 TOL[precision])
    for name in ("masked_lm_loss", "masked_img_loss", "next_sentence_loss"):
        assert_close(f"visual_target 1 {name}", getattr(out, name).reshape(1), want[f"vt1/{name}"], TOL[precision])


@pytest.mark.parametrize("precision,impl", PRECISION_IMPL)
def test_vilbert_beta_pretraining(parity_fixture, parity_cases, precision, impl):
    """vilbert_beta's BertForMultiModalPreTraining (the NeurIPS'19 code): logits and losses."""
    model = vilbert_ds.from_original(beta_state(parity_cases, precision, pretraining=True),
                                     no_task_config(parity_fixture, impl)).to(DTYPE[precision]).eval()
    x = inputs(parity_fixture, precision)
    del x["task_ids"]
    labels = {k: parity_fixture["inputs"][k] for k in ("masked_lm_labels", "image_label", "next_sentence_label")}
    labels["image_target"] = parity_fixture["inputs"]["image_target"].to(DTYPE[precision])
    want = parity_cases["expected"][precision]
    with torch.no_grad():
        out = model(**x, **labels)
    for name in ("text_prediction", "vision_prediction", "seq_relationship"):
        assert_close(f"beta {name}", getattr(out, name), want[f"beta_pretrain/{name}"], TOL[precision])
    for name in ("masked_lm_loss", "masked_img_loss", "next_sentence_loss"):
        assert_close(f"beta {name}", getattr(out, name).reshape(1), want[f"beta_pretrain/{name}"], TOL[precision])


@pytest.mark.parametrize("precision,impl", PRECISION_IMPL)
def test_vilbert_beta_vl_heads(parity_fixture, parity_cases, precision, impl):
    """vilbert_beta's VILBertForVLTasks: its vil_logit, vision_logit and linguisic_logit heads and
    the pretraining heads it returns (its weight-norm vil_prediction has no 12-in-1 counterpart:
    dropped by the converter, named in the load report)."""
    model = vilbert_ds.from_original(beta_state(parity_cases, precision), no_task_config(parity_fixture, impl),
                                     allow_missing=BETA_ABSENT_HEADS).to(DTYPE[precision]).eval()
    assert any(k.startswith("vil_prediction.main.") for k in model.load_report.dropped)
    x = inputs(parity_fixture, precision)
    x["task_ids"] = None
    want = parity_cases["expected"][precision]
    with torch.no_grad():
        out = model(**x)  # every head (the missing 12-in-1 heads are fresh and not compared)
    for name, field in (("vil_logit", "vil_logit"), ("vision_logit", "vision_logit"),
                        ("linguisic_logit", "linguisic_logit"), ("linguisic_prediction", "text_prediction"),
                        ("vision_prediction", "vision_prediction"), ("vil_binary_prediction", "seq_relationship")):
        assert_close(f"beta VL {name}", getattr(out, field), want[f"beta_vl/{name}"], TOL[precision])


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def test_to_original_has_the_original_classes_keys_and_shapes(parity_fixture, parity_cases):
    """`to_original` writes exactly the key set and shapes of the original classes' state dicts
    (the strict `load_state_dict` into the original classes ran where they are available:
    tests/fixtures/parity/README.md)."""
    keys = parity_cases["keys"]
    full = original_state(parity_fixture, "f32")
    cases = {
        "vl_task_tokens": (full, ViLBertConfig.from_dict(parity_fixture["config"])),
        "vl": ({k: v for k, v in full.items() if k != TASK_EMBEDDINGS}, no_task_config(parity_fixture, "sdpa")),
        "pretraining": (original_state(parity_fixture, "f32", pretraining=True), no_task_config(parity_fixture, "sdpa")),
        "beta_pretraining": (beta_state(parity_cases, "f32", pretraining=True), no_task_config(parity_fixture, "sdpa")),
    }
    assert set(cases) == set(keys)
    for name, (state, cfg) in cases.items():
        got = _shapes(vilbert_ds.to_original(vilbert_ds.from_original(state, cfg)))
        assert got == keys[name], f"{name}: keys only in ours {sorted(set(got) - set(keys[name]))[:5]}, only in the " \
                                  f"original {sorted(set(keys[name]) - set(got))[:5]}"


def test_case_fixtures_are_small():
    from fixtures.model import PARITY_DIR

    assert (PARITY_DIR / "tiny_parity_cases.safetensors").stat().st_size < 1_000_000
    assert (PARITY_DIR / "original_keys.json").stat().st_size < 200_000
