"""VCR (Q->A, QA->R, Q->AR): the public jsonl reader, person names, `[CLS] context [SEP] choice
[SEP]` with segments and truncation, 4 rows per example with the image replicated, the loss,
Q->AR and the leaderboard CSV against hand-computed cases, and an end-to-end run."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from test_task_refer import task_sample
from vilbert_ds.model import ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.model.model import ViLBertOutput
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.tasks.loader import EvalLoader, build_task_loader, evaluate_task
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.metrics import TaskMetric
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_scenes import NAMES, SceneSpec, make_scene_tasks
from vilbert_ds.tasks.vcr import main as vcr_cli
from vilbert_ds.tasks.vcr import q_ar_accuracy, render, write_leaderboard_csv

DATA = DataConfig(num_workers=0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcr")
    return load_registry(make_scene_tasks(root, ["vcr_q_a", "vcr_qa_r"], SceneSpec(images=8)))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def family(registry, name, tokenizer=None, **changes):
    cfg = registry[name]
    fam = build_family(type(cfg)(**{**cfg.__dict__, **changes}), tokenizer)
    fam.set_assets({"names": list(NAMES)})
    return fam


def test_reader_q_a_and_qa_r(registry):
    rows = [json.loads(line) for line in open(f"{registry['vcr_q_a'].annotations}/val.jsonl")]
    qa = build_family(registry["vcr_q_a"]).read_annotations("val")
    assert [e.example_id for e in qa] == [r["annot_id"] for r in rows]
    assert qa[0].payload["label"] == rows[0]["answer_label"] and qa[0].payload["choices"] == rows[0]["answer_choices"]
    assert qa[0].images == {"": rows[0]["img_fn"], "gt": rows[0]["img_fn"]}
    qar = build_family(registry["vcr_qa_r"]).read_annotations("val")
    gold = rows[0]["answer_label"]
    assert qar[0].payload["answer"] == rows[0]["answer_choices"][gold] and qar[0].payload["conditioned_on"] == gold
    assert qar[0].payload["choices"] == rows[0]["rationale_choices"] and qar[0].payload["label"] == rows[0]["rationale_label"]
    # the unlabelled test split: Q->A unlabelled, QA->R conditioned on each of the 4 answers
    n_test = sum(1 for _ in open(f"{registry['vcr_q_a'].annotations}/test.jsonl"))
    assert all(e.payload["label"] == -1 for e in build_family(registry["vcr_q_a"]).read_annotations("test"))
    test_qar = build_family(registry["vcr_qa_r"]).read_annotations("test")
    assert len(test_qar) == 4 * n_test and test_qar[1].example_id == "test-0-a1"
    assert [e.payload["conditioned_on"] for e in test_qar[:4]] == [0, 1, 2, 3]


def test_names_segments_and_truncation(registry, tokenizer):
    assert render(["is", [0, 2], "happy", "?"], ["Casey", "dog", "Riley"]) == "is Casey Riley happy ?"
    fam = family(registry, "vcr_qa_r", tokenizer)
    task = {"annot_id": "val-9", "image_id": "x", "objects": ["person", "dog"], "question": ["why", "is", [0], "here", "?"],
            "answer": ["to", "walk", [1]], "choices": [["because", [0], "likes", [1]]] * 4, "label": 2, "conditioned_on": 1}
    ex = fam.preprocess(task_sample("val-9", [[0, 0, 5, 5]], [[1, 1, 4, 4]], task), np.random.default_rng(3))
    ids, types = ex["texts"][0]
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    name = words[3]
    assert name.capitalize() in NAMES or name in tokenizer.tokenize(" ".join(NAMES))
    sep = [i for i, w in enumerate(words) if w == "[SEP]"]
    assert words[0] == "[CLS]" and len(sep) == 3  # [CLS] question [SEP] answer [SEP] rationale [SEP]
    assert words[sep[0] + 1:sep[1]] == ["to", "walk", "dog"] and "dog" in words[sep[1]:]
    assert types.tolist() == [0] * (sep[1] + 1) + [1] * (len(ids) - sep[1] - 1)
    assert len(ex["texts"]) == 4 and ex["label"] == 2 and ex["info"] == {"annot_id": "val-9", "conditioned_on": 1}
    # regions: global + 1 detected + 1 GT; the global feature weights the means by counts + 1
    feat, loc = ex["images"][0]
    assert feat.shape == (3, 2048) and loc[0].tolist() == [0, 0, 1, 1, 1]
    short = family(registry, "vcr_q_a", tokenizer, max_seq_length=12)  # budget 9 word pieces
    ids, types = short.encode_choice(list(range(1000, 1004)), list(range(2000, 2010)))
    assert ids.tolist() == [101, 1000, 1001, 1002, 1003, 102, 2000, 2001, 2002, 2003, 2004, 102]  # choice cut first
    ids, _ = short.encode_choice(list(range(1000, 1010)), list(range(2000, 2010)))
    assert ids.tolist() == [101, *range(1000, 1006), 102, 2000, 2001, 2002, 102]  # a third of the budget kept


def test_collate_replicates_the_image_and_loss(registry, tokenizer):
    fam = family(registry, "vcr_q_a", tokenizer)
    base = {"image_id": "x", "objects": ["person", "car"], "question": ["what", "color", "is", [1], "?"],
            "choices": [["it", "is", c] for c in ("red", "blue", "green", "yellow")], "conditioned_on": None}
    examples = [fam.preprocess(task_sample(k, [[0, 0, 5, 5], [1, 1, 9, 9]], [[2, 2, 6, 6]], {**base, "annot_id": k, "label": lab}),
                               np.random.default_rng(0)) for k, lab in (("val-0", 1), ("test-0", -1))]
    batch = fam.collate(examples)
    assert batch.input_ids.shape[0] == 8 and batch.row_offsets.tolist() == [0, 4, 8]
    assert torch.equal(batch.image_feat[0], batch.image_feat[3]) and batch.label.tolist() == [1, -1]
    out = ViLBertOutput(None, None, None, None, None)
    out.vil_logit = torch.tensor([[0.0], [1.0], [2.0], [-1.0], [5.0], [0.0], [0.0], [0.0]])
    loss, metrics = fam.loss(out, batch)
    # only the labelled example counts: CE of [0, 1, 2, -1] at index 1
    assert loss.item() == pytest.approx(-1.0 + np.log(np.exp([0.0, 1.0, 2.0, -1.0]).sum()), rel=1e-6)
    assert float(metrics["score"]) == 0.0
    records = fam.score(out, batch)
    assert records["val-0"]["score"] == 0.0 and records["val-0"]["prediction"] == 2
    assert records["test-0"]["score"] is None and records["test-0"]["probs"][0] == pytest.approx(np.exp(5) / (np.exp(5) + 3), rel=1e-5)
    unlabelled = fam.collate([examples[1]])
    out.vil_logit = out.vil_logit[4:]
    loss, _ = fam.loss(out, unlabelled)
    assert loss.item() == 0.0


def test_q_ar_and_leaderboard_hand_computed(tmp_path):
    qa, qar = TaskMetric("vcr_q_a"), TaskMetric("vcr_qa_r")
    qa.update({"a": {"score": 1.0, "annot_id": "a", "probs": [0.7, 0.1, 0.1, 0.1]},
               "b": {"score": 1.0, "annot_id": "b", "probs": [0.1, 0.7, 0.1, 0.1]},
               "c": {"score": 0.0, "annot_id": "c", "probs": [0.1, 0.1, 0.7, 0.1]}})
    qar.update({"a": {"score": 1.0, "annot_id": "a"}, "b": {"score": 0.0, "annot_id": "b"},
                "c": {"score": 1.0, "annot_id": "c"}})
    assert q_ar_accuracy(qa, qar) == {"q_a": pytest.approx(2 / 3), "qa_r": pytest.approx(2 / 3),
                                      "q_ar": pytest.approx(1 / 3), "count": 3.0}
    # leaderboard: rationale probabilities conditioned on every answer of every annotation
    test_qar = TaskMetric("vcr_qa_r")
    for annot in "abc":
        for k in range(4):
            test_qar.update({f"{annot}-a{k}": {"score": None, "annot_id": annot, "conditioned_on": k,
                                               "probs": [float(k), 0.0, 0.0, 1.0]}})
    path = write_leaderboard_csv(qa, test_qar, tmp_path / "lb.csv")
    rows = list(csv.reader(open(path)))
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3", "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3" and len(rows[0]) == 21 and len(rows) == 4
    assert rows[1][0] == "a" and float(rows[1][1]) == 0.7 and float(rows[1][5 + 4 * 2]) == 2.0
    del test_qar.records["b-a3"]
    with pytest.raises(ValueError, match="annotation b has no QA->R record conditioned on answers \\[3\\]"):
        write_leaderboard_csv(qa, test_qar, tmp_path / "lb2.csv")


def test_vcr_end_to_end(registry, tokenizer, tmp_path):
    """Shards for both tasks -> training steps -> val Q->A, QA->R, Q->AR; test predictions ->
    leaderboard CSV through the command line."""
    model_cfg = tiny(with_task_heads=True, task_specific_tokens=True)
    torch.manual_seed(0)
    model = ViLBert(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics, files = {}, {}
    for name in ("vcr_q_a", "vcr_qa_r"):
        build_task(registry, name, TaskBuildConfig(max_count=16))
        fam = build_family(registry[name], tokenizer)
        assert fam.assets["names"] == list(NAMES)
        loader = build_task_loader(fam, "train", DATA, rank=0, world_size=1, micro_batch_size=4, seed=0)
        model.train()
        for batch in loader:
            batch = batch.to("cpu", float_dtype=torch.float32)
            assert batch.input_ids.shape[0] == 4 * batch.num_examples
            assert batch.image_feat.size(1) > 8  # global + 8 detected + GT rows
            loss, _ = fam.loss(fam.forward(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert np.isfinite(loss.item())
        model.eval()
        metrics[name] = evaluate_task(model, fam, EvalLoader(fam, "val", DATA, rank=0, world_size=1, micro_batch_size=4), "cpu")
        assert 0.0 <= metrics[name].result()["score"] <= 1.0
        for split in ("val", "test"):
            metric = metrics[name] if split == "val" else evaluate_task(
                model, fam, EvalLoader(fam, split, DATA, rank=0, world_size=1, micro_batch_size=4), "cpu")
            files[name, split] = fam.write_predictions(metric, tmp_path / f"{name}_{split}_predictions.json")
    joint = q_ar_accuracy(metrics["vcr_q_a"], metrics["vcr_qa_r"])
    assert joint["count"] == len(build_family(registry["vcr_q_a"]).read_annotations("val"))
    assert joint["q_ar"] <= min(joint["q_a"], joint["qa_r"])
    assert vcr_cli(["q-ar", "--qa", str(files["vcr_q_a", "val"]), "--qar", str(files["vcr_qa_r", "val"]),
                    "--annotations", f"{registry['vcr_q_a'].annotations}/val.jsonl"]) == 0
    out = tmp_path / "vcr_test.csv"
    assert vcr_cli(["leaderboard", "--qa", str(files["vcr_q_a", "test"]), "--qar", str(files["vcr_qa_r", "test"]),
                    "--out", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    n_test = len(build_family(registry["vcr_q_a"]).read_annotations("test"))
    assert len(rows) == 1 + n_test and all(len(r) == 21 for r in rows)
    assert all(abs(sum(map(float, r[1:5])) - 1.0) < 1e-4 for r in rows[1:])
