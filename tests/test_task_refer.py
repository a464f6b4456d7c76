"""Refer (RefCOCO, RefCOCO+, RefCOCOg): the safe refs pickle reader, region rows with GT boxes,
IoU targets, the loss and accuracy against hand-computed cases, predictions, and an end-to-end
run on synthetic scenes in the public format (build shards, train, evaluate)."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vilbert_ds.model import ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.model.model import ViLBertOutput
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.tasks.loader import EvalLoader, build_task_loader, evaluate_task
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.refer import ReferBatch
from vilbert_ds.tasks.released import load_plain_pickle
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def task_sample(key: str, det_boxes, gt_boxes, task: dict, size=(100, 100)) -> dict:
    """A task sample as the loader hands it to preprocess (members as raw bytes)."""
    w, h = size
    sample = {"__key__": key, "json": {"image_id": "1", "image_w": w, "image_h": h, "num_boxes": len(det_boxes)},
              "features.npy": np.random.default_rng(0).random((len(det_boxes), 2048)).astype(np.float16),
              "boxes.npy": np.asarray(det_boxes, dtype=np.float32), "task.json": json.dumps(task).encode()}
    if gt_boxes is not None:
        sample.update({"gt.json": json.dumps({"image_id": "1", "image_w": w, "image_h": h}).encode(),
                       "gt.features.npy": npy(np.ones((len(gt_boxes), 2048), dtype=np.float16)),
                       "gt.boxes.npy": npy(np.asarray(gt_boxes, dtype=np.float32))})
    return sample


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    registry = load_registry(make_scene_tasks(root, ["refcoco", "refcocog"], SceneSpec(images=8)))
    return root, registry


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# ------------------------------------------------------------------------------ reader
class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/refer_pickle_ran_code", "w"))


def test_refs_pickle_is_parsed_safely(tmp_path):
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Evil()}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: refers to \w+\.open.*refusing"):
        load_plain_pickle(str(evil))
    # a Python 2 pickle: byte strings (SHORT_BINSTRING) holding UTF-8 come back as text
    py2 = tmp_path / "py2.p"
    py2.write_bytes(b"\x80\x02]q\x00}q\x01(U\x03rawq\x02U\x05caf\xc3\xa9q\x03U\x07sent_idq\x04K\x07ua.")
    assert load_plain_pickle(str(py2)) == [{"raw": "café", "sent_id": 7}]
    for protocol in (0, 2, 4):  # plain data of any protocol
        p = tmp_path / f"p{protocol}.p"
        p.write_bytes(pickle.dumps([{"a": [1, 2.5, "x"], "b": None}], protocol=protocol))
        assert load_plain_pickle(str(p)) == [{"a": [1, 2.5, "x"], "b": None}]
    (tmp_path / "bad.p").write_bytes(b"\x80\x02]q")
    with pytest.raises(ValueError, match="bad.p: not a readable pickle"):
        load_plain_pickle(str(tmp_path / "bad.p"))


def test_reader_reads_unc_and_umd_splits(refer_root):
    _, registry = refer_root
    fam = build_family(registry["refcoco"])
    train = fam.read_annotations("train")
    refs = load_plain_pickle(f"{registry['refcoco'].annotations}/refs(unc).p")
    instances = json.load(open(f"{registry['refcoco'].annotations}/instances.json"))
    anns = {a["id"]: a for a in instances["annotations"]}
    n_sent = sum(len(r["sentences"]) for r in refs if r["split"] == "train")
    assert len(train) == n_sent and n_sent > 0
    ex = train[0]
    ref = next(r for r in refs if ex.payload["ref_id"] == r["ref_id"])
    x, y, w, h = anns[ref["ann_id"]]["bbox"]
    assert ex.payload["ref_box"] == pytest.approx([x, y, x + w, y + h])
    assert ex.images == {"": str(ref["image_id"]), "gt": str(ref["image_id"])}
    assert ex.payload["train_targets"] and not fam.read_annotations("testB")[0].payload["train_targets"]
    assert {e.example_id for e in train}.isdisjoint(e.example_id for e in fam.read_annotations("testA"))
    gfam = build_family(registry["refcocog"])
    assert gfam.refs_file == "refs(umd).p" and len(gfam.read_annotations("test")) > 0
    with pytest.raises(ValueError, match="has no split 'testC'"):
        fam.read_annotations("testC")


def test_released_root_without_refcoco_files_reads_the_annotations(refer_root, tmp_path):
    """A released root that lacks refcoco/ leaves the annotations' refs and instances in use (as for
    every absent released file); one that has them is preferred."""
    import dataclasses
    import shutil

    _, registry = refer_root
    cfg = registry["refcoco"]
    expected = len(build_family(cfg).read_annotations("train"))
    empty = dataclasses.replace(cfg, released=str(tmp_path / "datasets" / "refcoco"))
    assert build_family(empty).refer_root == cfg.annotations
    assert len(build_family(empty).read_annotations("train")) == expected
    released = tmp_path / "datasets" / "refcoco" / "refcoco"
    released.mkdir(parents=True)
    for name in ("refs(unc).p", "instances.json"):
        shutil.copy(f"{cfg.annotations}/{name}", released / name)
    assert build_family(empty).refer_root == str(released)


# ------------------------------------------------------------------------------ targets, loss, metric
def test_region_rows_and_iou_targets_hand_computed(refer_root, tokenizer):
    _, registry = refer_root
    fam = build_family(registry["refcoco"], tokenizer)
    det = [[0, 0, 50, 50], [10, 10, 60, 60]]
    gt = [[0, 0, 50, 50], [60, 60, 90, 90]]
    base = {"text": "the red dog", "ref_box": [0, 0, 50, 50], "sent_id": 1, "ref_id": 2, "image_id": "1"}
    train = fam.preprocess(task_sample("a", det, gt, {**base, "train_targets": True}), np.random.default_rng(0))
    # IoUs in the original's +1-pixel convention (areas (x2-x1+1)(y2-y1+1)):
    # rows: global (0,0,100,100) 51^2/101^2 = 0.255 | det 1, 41^2/(2*51^2-41^2) = 0.477 | gt 1, 0 -> below 0.5 zeroed
    assert train["target"] == pytest.approx([0.0, 1.0, 0.0, 1.0, 0.0])
    feat, loc = train["images"][0]
    assert feat.shape == (5, 2048) and loc[0].tolist() == [0, 0, 1, 1, 1]
    assert loc[3].tolist() == pytest.approx([0, 0, 0.5, 0.5, 0.25])  # first GT row, normalised
    assert np.allclose(feat[3].astype(np.float32), 1.0)
    evaluation = fam.preprocess(task_sample("b", det, gt, {**base, "train_targets": False}), np.random.default_rng(0))
    # no GT rows, raw IoU (continuous coordinates would give 0.25 and 1600/3400 = 0.471)
    assert evaluation["target"] == pytest.approx([2601 / 10201, 1.0, 1681 / 3521], abs=1e-6)
    assert evaluation["images"][0][0].shape[0] == 3
    # the original truncates from the end: with room for 3 rows no GT row is left
    cfg = registry["refcoco"]
    small = build_family(type(cfg)(**{**cfg.__dict__, "max_region_num": 3}), tokenizer)
    rows = small.preprocess(task_sample("c", det, gt, {**base, "train_targets": True}), np.random.default_rng(0))
    assert rows["target"] == pytest.approx([0.0, 1.0, 0.0])


def test_loss_and_accuracy_hand_computed(refer_root, tokenizer):
    _, registry = refer_root
    fam = build_family(registry["refcoco"], tokenizer)
    # 2 examples, R = 3 (example 1 has a padded third region: logit -10000 from the model)
    logits = torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.2, -10000.0]])
    target = torch.tensor([[0.0, 0.9, 0.6], [0.3, 0.7, 0.0]])
    batch = ReferBatch(input_ids=torch.zeros(2, 3, dtype=torch.int64), token_type_ids=torch.zeros(2, 3, dtype=torch.int64),
                       attention_mask=torch.ones(2, 3, dtype=torch.int64), image_feat=torch.zeros(2, 3, 2048),
                       image_loc=torch.zeros(2, 3, 5), image_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), keys=["7", "8"],
                       target=target,
                       info=[{"sent_id": 7, "ref_id": 1, "image_id": "5", "iou": np.array([0.0, 0.9, 0.6]),
                              "boxes": np.arange(12, dtype=np.float32).reshape(3, 4)},
                             {"sent_id": 8, "ref_id": 2, "image_id": "5", "iou": np.array([0.3, 0.7]),
                              "boxes": np.arange(12, 20, dtype=np.float32).reshape(2, 4)}])
    out = ViLBertOutput(None, None, None, None, None)
    out.vision_logit = logits[..., None]
    loss, metrics = fam.loss(out, batch)
    # BCE(mean over B x R) x R: per-example sum over regions / B; the padded region adds 0
    real = [(0.5, 0.0), (2.0, 0.9), (-1.0, 0.6), (1.0, 0.3), (0.2, 0.7)]  # (logit, target) of real regions
    manual = sum(-(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x)))) for x, t in real)
    assert float(loss) == pytest.approx(manual / 2, rel=1e-5)
    assert float(F.binary_cross_entropy_with_logits(logits, target) * 3) == pytest.approx(float(loss))
    # argmax regions: 1 (IoU 0.9 > 0.5, correct) and 0 (IoU 0.3, wrong)
    assert float(metrics["score"]) == 0.5
    records = fam.score(out, batch)
    assert records["7"]["score"] == 1.0 and records["8"]["score"] == 0.0
    assert records["7"]["prediction"] == 1 and records["7"]["box"] == [4.0, 5.0, 6.0, 7.0]
    entry = fam.prediction_entry("7", records["7"])
    assert entry == {"sent_id": 7, "ref_id": 1, "image_id": "5", "bbox": [4.0, 5.0, 2.0, 2.0], "iou": 0.9,
                     "correct": True}


# ------------------------------------------------------------------------------ end to end
def test_refcoco_end_to_end(refer_root, tokenizer, tmp_path):
    """Public-format files -> task shards -> a few training steps -> evaluation and predictions."""
    _, registry = refer_root
    report = build_task(registry, "refcoco", TaskBuildConfig(max_count=16))
    assert {s["split"] for s in report["splits"]} == {"train", "val", "testA", "testB"}
    cfg = registry["refcoco"]
    fam = build_family(cfg, tokenizer)
    data = DataConfig(num_workers=0)
    loader = build_task_loader(fam, "train", data, rank=0, world_size=1, micro_batch_size=8, seed=0)
    torch.manual_seed(0)
    model = ViLBert(tiny(with_task_heads=True, task_specific_tokens=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in loader:
        batch = batch.to("cpu", float_dtype=torch.float32)
        # training rows: global + detected + GT boxes; GT rows have targets 1 for the referred object
        assert batch.image_feat.size(1) > 9 and bool((batch.target == 1.0).any())
        loss, _ = fam.loss(fam.forward(model, batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) >= 5 and np.mean(losses[-3:]) < losses[0]
    model.eval()
    for split in ("val", "testA"):
        metric = evaluate_task(model, fam, EvalLoader(fam, split, data, rank=0, world_size=1, micro_batch_size=16), "cpu")
        result = metric.result()
        assert 0.0 <= result["score"] <= 1.0 and result["count"] == len(fam.read_annotations(split))
    path = fam.write_predictions(metric, tmp_path / "refcoco_testA.json")
    entries = json.loads(path.read_text())
    assert len(entries) == len(fam.read_annotations("testA")) and set(entries[0]) == {
        "sent_id", "ref_id", "image_id", "bbox", "iou", "correct"}


def test_clean_train_sets_removes_other_tasks_test_images(tmp_path):
    """A refcocog training ref on an image of refcoco's testA split is dropped at build time."""
    registry = load_registry(make_scene_tasks(tmp_path, ["refcoco", "refcocog"], SceneSpec(images=4)))
    test_image = build_family(registry["refcoco"]).read_annotations("testA")[0].images[""]
    refs_path = f"{registry['refcocog'].annotations}/refs(umd).p"
    refs = load_plain_pickle(refs_path)
    moved = next(r for r in refs if r["split"] == "train")
    moved["image_id"] = int(test_image)
    inst_path = f"{registry['refcocog'].annotations}/instances.json"
    instances = json.load(open(inst_path))
    next(a for a in instances["annotations"] if a["id"] == moved["ann_id"])["image_id"] = int(test_image)
    json.dump(instances, open(inst_path, "w"))
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    report = build_task(registry, "refcocog", TaskBuildConfig(splits=["train"], max_count=64))
    train = report["splits"][0]
    assert train["removed_by_clean_train_sets"] == len(moved["sentences"])
    assert train["samples"] == train["examples_read"] - len(moved["sentences"])
