"""The model on tiny configs: shapes, masks, padding, task tokens, heads, losses, attention
implementations, and the text stream against Hugging Face `BertModel`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vilbert_ds.model import PRETRAIN_HEADS, TASK_HEADS, ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.model.vilbert import additive_mask


def run(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


# ----------------------------------------------------------------------------- shapes
def test_named_outputs_have_the_documented_shapes(random_tiny_model, tiny_batch):
    model = random_tiny_model(task_specific_tokens=True)
    cfg = model.config
    B, L, R = 4, 9, 7
    out = run(model, tiny_batch(cfg, batch=B, text_len=L, regions=R))
    Lt = L + 1  # the task token
    expected = {
        "sequence_output_t": (B, Lt, cfg.hidden_size), "sequence_output_v": (B, R, cfg.v_hidden_size),
        "pooled_output_t": (B, cfg.bi_hidden_size), "pooled_output_v": (B, cfg.bi_hidden_size),
        "pooled_output": (B, cfg.bi_hidden_size), "text_prediction": (B, Lt, cfg.vocab_size),
        "vision_prediction": (B, R, cfg.v_target_size), "seq_relationship": (B, 2),
        "vil_prediction": (B, 3129), "vil_prediction_gqa": (B, 1533), "vil_binary_prediction": (B // 2, 2),
        "vil_logit": (B, 1), "vil_tri_prediction": (B, 3), "vision_logit": (B, R, 1), "linguisic_logit": (B, Lt, 1),
    }
    for name, shape in expected.items():
        assert tuple(getattr(out, name).shape) == shape, name
    assert set(out.heads()) == set(PRETRAIN_HEADS + TASK_HEADS)
    assert out.linguisic_prediction is out.text_prediction  # the original's spelling still works
    assert out.loss is None and out.masked_lm_loss is None  # no labels, no losses


def test_heads_argument_computes_only_what_is_asked(random_tiny_model, tiny_batch):
    model = random_tiny_model()
    batch = tiny_batch(model.config)
    full = run(model, batch)
    some = run(model, batch, heads=["vil_logit", "linguisic_prediction"])  # alias accepted
    assert some.vil_prediction is None and some.vision_prediction is None and some.seq_relationship is None
    assert torch.equal(some.vil_logit, full.vil_logit) and torch.equal(some.text_prediction, full.text_prediction)
    with pytest.raises(ValueError, match="vil_typo"):
        model(**batch, heads=["vil_typo"])
    pretrain_only = random_tiny_model(with_task_heads=False)
    assert not hasattr(pretrain_only, "vil_prediction")
    with pytest.raises(ValueError, match="vil_logit"):
        pretrain_only(**batch, heads=["vil_logit"])


def test_vision_logit_suppresses_padded_regions(random_tiny_model, tiny_batch):
    model = random_tiny_model()
    batch = tiny_batch(model.config, region_lens=[7, 3, 5, 2])
    logit = run(model, batch).vision_logit[..., 0]
    pad = batch["image_attention_mask"] == 0
    assert pad.any()
    assert (logit[pad] < -9000).all() and (logit[~pad] > -1000).all()


def test_additive_mask_is_the_originals():
    mask = torch.tensor([[1, 1, 0]])
    m = additive_mask(mask, torch.float32)
    assert m.shape == (1, 1, 1, 3)
    assert m.flatten().tolist() == [0.0, 0.0, -10000.0]


# ---------------------------------------------------------------------------- padding
def _drop_padding_row(batch, row, t_keep, r_keep):
    one = {k: v[row:row + 1] for k, v in batch.items()}
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        one[k] = one[k][:, :t_keep]
    for k in ("image_feat", "image_loc", "image_attention_mask"):
        one[k] = one[k][:, :r_keep]
    return one


@pytest.mark.parametrize("task_tokens", [False, True])
def test_padding_changes_nothing(random_tiny_model, tiny_batch, task_tokens):
    """Each padded row equals the same example run alone without padding: padded tokens and
    regions (filled with garbage) reach no real position, pooled output or head."""
    model = random_tiny_model(task_specific_tokens=task_tokens)
    batch = tiny_batch(model.config, text_lens=[9, 4, 6, 2], region_lens=[7, 3, 2, 5], seed=3)
    full = run(model, batch)
    for row in range(4):
        t = int(batch["attention_mask"][row].sum())
        r = int(batch["image_attention_mask"][row].sum())
        alone = run(model, _drop_padding_row(batch, row, t, r))
        tt = t + (1 if task_tokens else 0)
        pairs = {
            "pooled_output_t": (full.pooled_output_t[row], alone.pooled_output_t[0]),
            "pooled_output_v": (full.pooled_output_v[row], alone.pooled_output_v[0]),
            "vil_prediction": (full.vil_prediction[row], alone.vil_prediction[0]),
            "vil_logit": (full.vil_logit[row], alone.vil_logit[0]),
            "seq_t": (full.sequence_output_t[row, :tt], alone.sequence_output_t[0]),
            "seq_v": (full.sequence_output_v[row, :r], alone.sequence_output_v[0]),
            "vision_logit": (full.vision_logit[row, :r], alone.vision_logit[0]),
        }
        for name, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"row {row}: {name}")


# ------------------------------------------------------------------------ task tokens
def test_task_token_inserted_at_position_1_without_position_embedding(random_tiny_model, tiny_batch):
    model = random_tiny_model(task_specific_tokens=True)
    emb = model.bert.embeddings
    batch = tiny_batch(model.config, seed=5)
    ids, types, task = batch["input_ids"], batch["token_type_ids"], batch["task_ids"]
    with torch.no_grad():
        with_token = emb(ids, types, task)
        without = emb(ids, types)
        # position 1 holds LayerNorm(task embedding) alone: no position or type embedding added
        alone = emb.LayerNorm(emb.task_embeddings(task))[:, 0]
    assert with_token.shape[1] == ids.shape[1] + 1
    torch.testing.assert_close(with_token[:, 1], alone, rtol=0, atol=1e-12)
    # the text keeps positions 0..L-1 (not shifted by the inserted token)
    torch.testing.assert_close(with_token[:, [0, *range(2, ids.shape[1] + 1)]], without, rtol=0, atol=1e-12)


def test_task_token_is_attended_and_changes_the_output(random_tiny_model, tiny_batch):
    """The text mask is extended with a 1 for the task token: [CLS] attends to it, so the task
    id reaches the pooled output (a masked task token could only change its own position).
    That the rest of the mask is shifted with it is test_padding_changes_nothing[True]."""
    model = random_tiny_model(task_specific_tokens=True)
    batch = tiny_batch(model.config, seed=6)
    a = run(model, batch)
    other = dict(batch, task_ids=(batch["task_ids"] + 1) % model.config.num_task_tokens)
    b = run(model, other)
    assert (a.pooled_output_t - b.pooled_output_t).abs().max() > 1e-3
    assert (a.vil_prediction - b.vil_prediction).abs().max() > 1e-3


def test_task_ids_need_task_tokens(random_tiny_model, tiny_batch):
    model = random_tiny_model()
    batch = tiny_batch(model.config, task_ids=True)
    with pytest.raises(ValueError, match="task_specific_tokens"):
        model(**batch)


# ------------------------------------------------------------------------------ heads
def test_task_heads_are_the_fused_pooled_vector_through_each_classifier(random_tiny_model, tiny_batch):
    model = random_tiny_model()
    out = run(model, tiny_batch(model.config, batch=4))
    h = out.pooled_output_t * out.pooled_output_v
    torch.testing.assert_close(out.pooled_output, h, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out.vil_prediction, model.vil_prediction(h))
        torch.testing.assert_close(out.vil_prediction_gqa, model.vil_prediction_gqa(h))
        torch.testing.assert_close(out.vil_logit, model.vil_logit(h))
        torch.testing.assert_close(out.vil_tri_prediction, model.vil_tri_prediction(h))
        torch.testing.assert_close(out.seq_relationship, model.cls.bi_seq_relationship(h))
        # NLVR2: rows (2i, 2i+1) are the two images of example i
        pair = torch.cat([h[0], h[1]])[None]
        torch.testing.assert_close(out.vil_binary_prediction[:1], model.vil_binary_prediction(pair))
        torch.testing.assert_close(out.vision_logit[0], model.vision_logit(out.sequence_output_v[0]))
        torch.testing.assert_close(out.linguisic_logit, model.linguisic_logit(out.sequence_output_t))
        torch.testing.assert_close(out.text_prediction, model.cls.predictions(out.sequence_output_t))


def test_pooler_is_relu_on_position_0_and_fusion_sum(random_tiny_model, tiny_batch):
    model = random_tiny_model(fusion_method="sum")
    out = run(model, tiny_batch(model.config))
    with torch.no_grad():
        want_t = F.relu(model.bert.t_pooler.dense(out.sequence_output_t[:, 0]))
    torch.testing.assert_close(out.pooled_output_t, want_t)
    assert (out.pooled_output_t >= 0).all() and (out.pooled_output_t == 0).any()
    torch.testing.assert_close(out.pooled_output, out.pooled_output_t + out.pooled_output_v)


def test_odd_batch_binary_head_falls_back_to_alignment_logits(random_tiny_model, tiny_batch):
    model = random_tiny_model()
    out = run(model, tiny_batch(model.config, batch=3), heads=["vil_binary_prediction"])
    assert out.vil_binary_prediction.shape == (3, 2)
    assert torch.equal(out.vil_binary_prediction, out.seq_relationship)


def test_text_batch_of_one_broadcasts_to_the_images(random_tiny_model, tiny_batch):
    """The original's retrieval fast_mode: one caption against N images equals the caption
    repeated N times."""
    model = random_tiny_model(task_specific_tokens=True)
    batch = tiny_batch(model.config, batch=3)
    one = dict(batch, **{k: batch[k][:1] for k in ("input_ids", "token_type_ids", "attention_mask", "task_ids")})
    rep = dict(batch, **{k: batch[k][:1].expand(3, -1) for k in ("input_ids", "token_type_ids", "attention_mask",
                                                                   "task_ids")})
    a, b = run(model, one, heads=["vil_logit"]), run(model, rep, heads=["vil_logit"])
    torch.testing.assert_close(a.vil_logit, b.vil_logit, rtol=0, atol=1e-12)


def test_all_encoded_layers_pool_from_the_last_block(random_tiny_model, tiny_batch):
    """output_all_encoded_layers returns one state per co-attention block and, as the
    original, pools from the last block rather than after the trailing layers."""
    model = random_tiny_model()
    batch = tiny_batch(model.config)
    plain = run(model, batch, heads=["vil_logit"])
    every = run(model, batch, heads=["vil_logit"], output_all_encoded_layers=True)
    n = len(model.config.v_biattention_id)
    assert len(every.all_text_states) == len(every.all_vision_states) == n
    assert torch.equal(every.sequence_output_t, every.all_text_states[-1])
    assert (plain.pooled_output_t - every.pooled_output_t).abs().max() > 1e-6  # trailing layers ignored
    assert plain.all_text_states is None


# ----------------------------------------------------------------------------- losses
def _labels(batch, cfg, seed=0, mlm_p=0.4, region_p=0.4):
    g = torch.Generator().manual_seed(seed)
    B, L = batch["input_ids"].shape
    R = batch["image_feat"].shape[1]
    lm = torch.full((B, L), -1)
    pick = (torch.rand(B, L, generator=g) < mlm_p) & batch["attention_mask"].bool()
    lm[pick] = torch.randint(1, cfg.vocab_size, (int(pick.sum()),), generator=g)
    il = torch.full((B, R - 1), -1)
    il[(torch.rand(B, R - 1, generator=g) < region_p) & batch["image_attention_mask"][:, 1:].bool()] = 1
    target = torch.softmax(torch.randn(B, R - 1, cfg.v_target_size, generator=g, dtype=torch.float64), -1)
    return dict(masked_lm_labels=lm, image_label=il, image_target=target.to(batch["image_feat"].dtype),
                next_sentence_label=torch.randint(0, 2, (B,), generator=g))


@pytest.mark.parametrize("task_tokens", [False, True])
def test_losses_equal_the_full_heads_reference(random_tiny_model, tiny_batch, task_tokens):
    """Losses from masked positions only equal the original formulation over full logits:
    CE(ignore -1) for MLM and alignment, summed KL over masked regions / their count."""
    model = random_tiny_model(task_specific_tokens=task_tokens)
    batch = tiny_batch(model.config, seed=8)
    labels = _labels(batch, model.config)
    out = run(model, batch, **labels, img_weight=0.5)
    text_logits = out.text_prediction
    if task_tokens:  # labels cover the input tokens; the task token has none
        text_logits = torch.cat([text_logits[:, :1], text_logits[:, 2:]], 1)
    mlm = F.cross_entropy(text_logits.reshape(-1, model.config.vocab_size), labels["masked_lm_labels"].reshape(-1),
                          ignore_index=-1)
    region = F.kl_div(F.log_softmax(out.vision_prediction[:, 1:], -1), labels["image_target"], reduction="none")
    picked = labels["image_label"] == 1
    kl = (region * picked[..., None]).sum() / picked.sum()
    align = F.cross_entropy(out.seq_relationship, labels["next_sentence_label"])
    torch.testing.assert_close(out.masked_lm_loss, mlm, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.masked_img_loss, kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.next_sentence_loss, align, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss, mlm + 0.5 * kl + align, rtol=0, atol=1e-12)
    assert out.alignment_loss is out.next_sentence_loss


def test_losses_are_zero_not_nan_with_nothing_masked(random_tiny_model, tiny_batch):
    model = random_tiny_model().train()
    batch = tiny_batch(model.config)
    labels = _labels(batch, model.config, mlm_p=0.0, region_p=0.0)
    labels["next_sentence_label"] = torch.full((4,), -1)
    out = model(**batch, **labels)
    for name in ("masked_lm_loss", "masked_img_loss", "next_sentence_loss", "loss"):
        value = getattr(out, name)
        assert torch.isfinite(value) and value.item() == 0.0, name
    out.loss.backward()  # a graph exists and gives finite (zero) gradients, never NaN
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_objective_style_minus_one_labels(random_tiny_model, tiny_batch):
    """--objective 1: misaligned pairs carry no MLM/region targets (-1); the masked losses then
    come from the aligned rows only, and equal a run on those rows alone."""
    model = random_tiny_model()
    batch = tiny_batch(model.config, seed=9)
    labels = _labels(batch, model.config, seed=9)
    labels["next_sentence_label"] = torch.tensor([0, 1, 0, 1])
    for row in (1, 3):
        labels["masked_lm_labels"][row] = -1
        labels["image_label"][row] = -1
    out = run(model, batch, **labels)
    keep = [0, 2]
    sub = run(model, {k: v[keep] for k, v in batch.items()}, **{k: v[keep] for k, v in labels.items()})
    torch.testing.assert_close(out.masked_lm_loss, sub.masked_lm_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.masked_img_loss, sub.masked_img_loss, rtol=0, atol=1e-12)


def test_feature_regression_target_and_bad_loss_arguments(random_tiny_model, tiny_batch):
    model = random_tiny_model(v_target_size=2048)
    batch = tiny_batch(model.config)
    labels = _labels(batch, model.config)
    labels["image_target"] = torch.randn(4, batch["image_feat"].shape[1] - 1, 2048, dtype=torch.float64)
    out = run(model, batch, **labels, visual_target=1)
    picked = labels["image_label"] == 1
    se = (out.vision_prediction[:, 1:] - labels["image_target"]) ** 2
    want = (se * picked[..., None]).sum() / (picked.sum() * 2048)
    torch.testing.assert_close(out.masked_img_loss, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="visual_target=2"):
        model(**batch, **labels, visual_target=2)
    with pytest.raises(ValueError, match="image_target"):
        model(**batch, image_label=labels["image_label"])


def test_float32_losses_stay_float32_and_float64_stay_float64(random_tiny_model, tiny_batch):
    for dtype in (torch.float32, torch.float64):
        model = random_tiny_model(dtype=dtype)
        batch = tiny_batch(model.config, dtype=dtype)
        out = run(model, batch, **_labels(batch, model.config))
        assert out.loss.dtype == dtype


# ----------------------------------------------------------------- attention and grads
def test_sdpa_equals_the_original_masked_softmax(random_tiny_model, tiny_batch):
    sdpa = random_tiny_model(task_specific_tokens=True)
    eager = ViLBert(sdpa.config.replace(attention_impl="eager")).double().eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = tiny_batch(sdpa.config, seed=11)
    a, b = run(sdpa, batch), run(eager, batch)
    for name in ("sequence_output_t", "sequence_output_v", "pooled_output", "vil_prediction", "vision_logit"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12, msg=name)


def test_q_dense_frozen_and_unused_heads_get_no_gradient(random_tiny_model, tiny_batch):
    model = random_tiny_model().train()
    q_dense = [p for n, p in model.named_parameters() if ".q_dense" in n]
    assert q_dense and not any(p.requires_grad for p in q_dense)
    batch = tiny_batch(model.config)
    model(**batch, heads=["vil_logit"]).vil_logit.sum().backward()
    assert model.vil_logit.weight.grad is not None
    assert model.vil_prediction.logit_fc[0].weight.grad is None
    assert all(p.grad is None for p in q_dense)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_batch):
    torch.manual_seed(0)
    cfg = tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, v_hidden_dropout_prob=0.0,
               v_attention_probs_dropout_prob=0.0)
    plain = ViLBert(cfg).double().train()
    ckpt = ViLBert(cfg.replace(gradient_checkpointing=True)).double().train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    checkpoint = ckpt.bert.encoder.checkpoint_fn
    ckpt.bert.encoder.checkpoint_fn = lambda fn, *args: calls.append(fn) or checkpoint(fn, *args)
    batch = tiny_batch(cfg)
    for m in (plain, ckpt):
        torch.manual_seed(1)  # the heads' fixed p=0.1 dropout draws the same mask in both runs
        m(**batch, heads=["vil_logit"]).vil_logit.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)
    n_layers = cfg.num_hidden_layers + cfg.v_num_hidden_layers + len(cfg.v_biattention_id)
    assert len(calls) == n_layers  # every layer and block ran under the checkpoint function


# ----------------------------------------------------------------- text stream == HF BERT
def test_text_stream_from_hf_bert_equals_bert_model(minilm_dir):
    """Initialised from a local HF BERT checkpoint (MiniLM, 6 layers, 384 wide), the text
    stream's states before the first co-attention block equal HF `BertModel`'s (float64)."""
    from transformers import BertModel

    from vilbert_ds.weights import config_from_hf_bert, load_hf_bert

    cfg = config_from_hf_bert(minilm_dir, base="tiny", t_biattention_id=[3, 5])
    model = ViLBert(cfg)
    report = load_hf_bert(model, minilm_dir)
    assert not any(k.startswith(("bert.encoder.layer.", "bert.embeddings.word")) for k in report.missing)
    model = model.double().eval()
    hf = BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
        x = model.bert.embeddings(ids, types)
        states = [x]
        for layer in model.bert.encoder.layer[: cfg.t_biattention_id[0]]:
            x = layer(x, additive_mask(mask, x.dtype))
            states.append(x)
    assert len(states) == 4  # embeddings + the 3 layers before the first co-attention block
    real = mask.bool()
    for i, state in enumerate(states):
        diff = (state - want[i])[real].abs().max().item()
        assert diff < 1e-10, f"hidden state {i}: max diff {diff:.2e} vs HF BertModel"
