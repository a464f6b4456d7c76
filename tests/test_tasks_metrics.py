"""Task metric functions against hand-computed cases, and the duplicate-free metric merge."""
from __future__ import annotations

import pytest
import torch

from vilbert_ds.tasks.metrics import (
    TaskMetric,
    argmax_accuracy,
    argmax_soft_score,
    box_iou,
    normalize_vqa_answer,
    rank_of_gold,
    recall_at_k,
    soft_scores,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),
        ("  The Red  ", "red"),
        ("black/white", "black white"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes!", "yes"),
        ("an apple", "apple"),
        ("none", "0"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_matches_hand_computed_leave_one_out():
    # c humans of 10 gave the answer: mean over 10 subsets of min(1, matches/3)
    for c, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * c + ["dog"] * (10 - c)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected), c
    # normalisation applies to both sides
    assert vqa_accuracy("Two", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"]) == pytest.approx(1.0)
    # a single reference (GQA, Visual Genome) is exact match
    assert vqa_accuracy("Green.", ["green"]) == 1.0 and vqa_accuracy("red", ["green"]) == 0.0


def test_soft_scores_of_ten_answers():
    answers = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    assert soft_scores(answers) == pytest.approx({"yes": 1.0, "no": 0.6, "maybe": 0.3})


def test_argmax_scores():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    target = torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.9]])
    assert argmax_soft_score(logits, target).tolist() == pytest.approx([0.6, 0.3, 0.9])
    assert argmax_accuracy(logits, torch.tensor([1, 1, -1])).tolist() == [1.0, 0.0, 0.0]


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, b)
    assert iou[0].tolist() == pytest.approx([25.0 / 175.0, 1.0, 0.0])
    assert iou[1].tolist() == [0.0, 0.0, 0.0]  # an empty box overlaps nothing
    # the original refer/pointing convention: x2, y2 are inside the box (+1 on every side length)
    pixel = box_iou(a[:1], torch.tensor([[5.0, 5.0, 15.0, 15.0], [10.0, 0.0, 20.0, 10.0], [0.0, 0.0, 10.0, 10.0]]),
                    pixel_inclusive=True)
    assert pixel[0].tolist() == pytest.approx([36 / (2 * 121 - 36), 11 / (2 * 121 - 11), 1.0])  # touching: 1 pixel column


def test_recall_at_k_and_ties():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.1, 0.2, 0.3]])
    ranks = rank_of_gold(scores, torch.tensor([0, 1, 0]))
    assert ranks.tolist() == [1, 2, 3]  # the tie in row 1 counts against the gold item
    r = recall_at_k(ranks, ks=(1, 2, 5))
    assert r["R@1"] == pytest.approx(100 / 3) and r["R@2"] == pytest.approx(200 / 3) and r["R@5"] == 100.0
    assert r["median_rank"] == 2.0 and r["mean_rank"] == 2.0


def test_metric_merge_counts_padded_duplicates_once():
    rank0, rank1 = TaskMetric("vqa"), TaskMetric("vqa")
    rank0.update({"1": {"score": 1.0, "prediction": "yes"}, "2": {"score": 0.0, "prediction": "no"}})
    # rank 1's last batch was padded with a repeat of example "1"
    rank1.update({"3": {"score": 0.6, "prediction": "2"}, "1": {"score": 1.0, "prediction": "yes"}})
    rank1.update({"4": {"score": None, "prediction": "red"}})  # unlabeled: predicted, not scored
    merged = TaskMetric("vqa").merge([rank0, rank1])
    assert len(merged) == 4
    assert merged.result() == pytest.approx({"score": 1.6 / 3, "count": 3.0})
    assert [k for k, _ in merged.predictions()] == ["1", "2", "3", "4"]
    with pytest.raises(ValueError, match="no 'score'"):
        merged.update({"5": {"prediction": "x"}})


def test_snli_ve_no_consensus_rows_are_scored_wrong(tmp_path):
    """SNLI-VE gold label "-" (annotators disagree): kept with a zero target and counted as wrong,
    as the original scores them; a row without any gold label is unlabeled (not scored)."""
    import json

    from vilbert_ds.model.model import ViLBertOutput
    from vilbert_ds.tasks.registry import build_family, load_registry
    from vilbert_ds.tasks.vl_tri import NO_CONSENSUS, UNLABELED, LabelBatch, one_hot_target

    rows = [{"Flikr30kID": "1.jpg", "sentence2": "a", "gold_label": "entailment", "pairID": "1.jpg#0r1e"},
            {"Flikr30kID": "1.jpg", "sentence2": "b", "gold_label": "-", "pairID": "1.jpg#0r1n"},
            {"Flikr30kID": "2.jpg", "sentence2": "c", "pairID": "2.jpg#0r1c"}]
    (tmp_path / "snli_ve_dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    family = build_family(load_registry(overrides={"snli_ve": {"annotations": str(tmp_path)}})["snli_ve"])
    labels = [e.payload["label"] for e in family.read_annotations("dev")]
    assert labels == [2, NO_CONSENSUS, UNLABELED]
    empty = torch.zeros(3, 1)
    batch = LabelBatch(input_ids=empty, token_type_ids=empty, attention_mask=empty, image_feat=empty, image_loc=empty,
                       image_mask=empty, keys=["a", "b", "c"], label=torch.tensor(labels))
    out = ViLBertOutput(None, None, None, None, None)
    out.vil_tri_prediction = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    records = family.score(out, batch)
    assert [records[k]["score"] for k in "abc"] == [1.0, 0.0, None]
    assert family.new_metric().merge([records]).result() == {"score": 0.5, "count": 2.0}
    assert one_hot_target(batch.label, 3).tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]  # zero target, as the original
