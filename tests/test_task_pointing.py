"""Pointing (Visual7W, GuessWhat pointing): readers of the public formats, candidate GT rows found
by box, IoU targets, the loss and accuracy against hand-computed cases, predictions, and an
end-to-end run on synthetic scenes (build shards, train, evaluate)."""
from __future__ import annotations

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
from vilbert_ds.tasks.pointing import PointingBatch
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks


@pytest.fixture(scope="module")
def pointing_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pointing")
    return load_registry(make_scene_tasks(root, ["visual7w", "guesswhat_pointing"], SceneSpec(images=8)))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_readers_of_the_public_formats(pointing_root):
    v7w = build_family(pointing_root["visual7w"])
    data = json.load(open(f"{pointing_root['visual7w'].annotations}/dataset_v7w_pointing.json"))
    boxes = {b["box_id"]: b for b in data["boxes"]}
    qa = next(img for img in data["images"] if img["split"] == "val")["qa_pairs"][0]
    ex = next(e for e in v7w.read_annotations("val") if e.example_id == str(qa["qa_id"]))
    assert ex.payload["candidate_ids"] == sorted(qa["multiple_choices"] + [qa["answer"]])
    b = boxes[qa["answer"]]
    assert ex.payload["ref_box"] == pytest.approx([b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]])
    assert ex.payload["text"] == qa["question"] and ex.images["gt"] == ex.images[""] == f"v7w_{qa['image_id']}"

    gw = build_family(pointing_root["guesswhat_pointing"])
    game = json.loads(open(f"{pointing_root['guesswhat_pointing'].annotations}/guesswhat.valid.jsonl").readline())
    ex = gw.read_annotations("valid")[0]
    assert ex.example_id == str(game["id"]) and ex.payload["candidate_ids"] == sorted(o["id"] for o in game["objects"])
    assert ex.payload["answer_id"] == game["object_id"]
    first = game["qas"][0]
    assert ex.payload["text"].startswith(f"start {first['question']} answer {first['answer']} stop start ")


def test_candidate_rows_and_targets_hand_computed(pointing_root, tokenizer):
    fam = build_family(pointing_root["visual7w"], tokenizer)
    det = [[0, 0, 10, 10], [5, 5, 20, 20], [50, 50, 60, 60]]
    # the GT feature set stores its boxes in any order; candidates are found by their box
    gt = [[60, 60, 90, 90], [0, 0, 50, 50], [0, 0, 40, 50], [10, 60, 30, 90]]
    task = {"qa_id": 3, "image_id": "1", "text": "which is the red dog?", "candidate_ids": [11, 12, 13, 14],
            "candidate_boxes": [[0, 0, 50, 50], [0, 0, 40, 50], [60, 60, 90, 90], [10, 60, 30, 90]],
            "answer_id": 11, "ref_box": [0, 0, 50, 50]}
    ex = fam.preprocess(task_sample("3", det, gt, task), np.random.default_rng(0))
    # rows: global + 3 detected = 4, then GT rows 4..7 in the GT set's order
    assert ex["candidate_rows"].tolist() == [5, 6, 4, 7]
    # IoU with the answer box, +1-pixel convention (the original): 1, 41*51/51^2 = 0.804, 0, 0
    assert ex["target"] == pytest.approx([1.0, 41 / 51, 0.0, 0.0])
    # detected rows give way to GT rows when both do not fit (max_region_num 6: global + 1 det + 4 GT)
    cfg = pointing_root["visual7w"]
    small = build_family(type(cfg)(**{**cfg.__dict__, "max_region_num": 6}), tokenizer)
    assert small.preprocess(task_sample("3", det, gt, task), np.random.default_rng(0))["candidate_rows"].tolist() == [3, 4, 2, 5]
    bad = dict(task, candidate_boxes=task["candidate_boxes"][:3] + [[1, 1, 2, 2]])
    with pytest.raises(ValueError, match="no GT feature row with the same box"):
        fam.preprocess(task_sample("3", det, gt, bad), np.random.default_rng(0))


def test_loss_and_accuracy_hand_computed(pointing_root, tokenizer):
    fam = build_family(pointing_root["guesswhat_pointing"], tokenizer)
    # example 0: 3 candidates at rows 4, 5, 6; example 1: 2 candidates at rows 5, 4 (third padded)
    vision = torch.full((2, 7), -3.0)
    vision[0, 4:7] = torch.tensor([0.5, 2.0, -1.0])
    vision[1, 4:6] = torch.tensor([1.5, 0.0])
    batch = PointingBatch(input_ids=torch.zeros(2, 3, dtype=torch.int64), token_type_ids=torch.zeros(2, 3, dtype=torch.int64),
                          attention_mask=torch.ones(2, 3, dtype=torch.int64), image_feat=torch.zeros(2, 7, 2048),
                          image_loc=torch.zeros(2, 7, 5), image_mask=torch.ones(2, 7, dtype=torch.int64), keys=["10", "11"],
                          candidate_rows=torch.tensor([[4, 5, 6], [5, 4, 0]]),
                          candidate_mask=torch.tensor([[True, True, True], [True, True, False]]),
                          target=torch.tensor([[0.0, 1.0, 0.6], [1.0, 0.0, 0.0]]), gold=torch.tensor([1, 0]),
                          candidate_ids=[[7, 8, 9], [20, 21]])
    out = ViLBertOutput(None, None, None, None, None)
    out.vision_logit = vision[..., None]
    loss, metrics = fam.loss(out, batch)
    real = [(0.5, 0.0), (2.0, 1.0), (-1.0, 0.6), (0.0, 1.0), (1.5, 0.0)]  # (logit, target) of real candidates
    manual = sum(-(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x)))) for x, t in real)
    assert loss.item() == pytest.approx(manual / 2, rel=1e-5)  # BCE(mean) x C = per-example sum / B
    # predictions: candidate 1 (gold 1: right), candidate 1 of example 1 = row 4 (1.5) vs gold 0: wrong
    assert float(metrics["score"]) == 0.5
    records = fam.score(out, batch)
    assert records["10"] == {"score": 1.0, "prediction": 8, "gold": 8}
    assert records["11"] == {"score": 0.0, "prediction": 21, "gold": 20}
    assert fam.prediction_entry("11", records["11"]) == {"game_id": 11, "object_id": 21}
    v7w = build_family(pointing_root["visual7w"], tokenizer)
    assert v7w.prediction_entry("10", records["10"]) == {"qa_id": 10, "answer": 8}


@pytest.mark.parametrize("task, val", [("visual7w", "val"), ("guesswhat_pointing", "valid")])
def test_pointing_end_to_end(pointing_root, tokenizer, task, val, tmp_path):
    """Public-format files -> task shards (regions + GT sets) -> training steps -> evaluation."""
    report = build_task(pointing_root, task, TaskBuildConfig(max_count=16))
    assert all(s["samples"] > 0 for s in report["splits"])
    fam = build_family(pointing_root[task], tokenizer)
    data = DataConfig(num_workers=0)
    loader = build_task_loader(fam, pointing_root[task].splits.train, data, rank=0, world_size=1, micro_batch_size=4,
                               seed=0)
    torch.manual_seed(0)
    model = ViLBert(tiny(with_task_heads=True, task_specific_tokens=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        for batch in loader:
            batch = batch.to("cpu", float_dtype=torch.float32)
            assert bool((batch.target.max(dim=1).values == 1.0).all())  # the answer box is a candidate
            loss, _ = fam.loss(fam.forward(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        loader.set_epoch(1)
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < losses[0]
    model.eval()
    metric = evaluate_task(model, fam, EvalLoader(fam, val, data, rank=0, world_size=1, micro_batch_size=8), "cpu")
    assert 0.0 <= metric.result()["score"] <= 1.0 and metric.result()["count"] == len(fam.read_annotations(val))
    entries = json.loads(fam.write_predictions(metric, tmp_path / "p.json").read_text())
    assert len(entries) == len(fam.read_annotations(val))
