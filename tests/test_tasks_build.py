"""Task shards from the public annotation formats: build, layout, clean_train_sets, collate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vilbert_ds.data.manifest import load_source
from vilbert_ds.data.tario import iter_members, split_name
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.build import TaskBuildConfig, build_task, held_out_image_ids
from vilbert_ds.tasks.loader import EvalLoader, build_task_loader, eval_positions
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.registry import build_family, load_registry

from fixtures.tasks import ALL_TASKS


def _members(tar_path):
    with open(tar_path, "rb") as f:
        out = {}
        for _, m in iter_members(f, str(tar_path)):
            key, ext = split_name(m.name)
            out.setdefault(key, {})[ext] = m.data
    return out


@pytest.fixture(scope="module")
def registry(synthetic_tasks):
    return load_registry(synthetic_tasks)


def test_every_task_builds_all_splits_with_manifests(registry):
    counts = {}
    for task in ALL_TASKS:
        cfg = registry[task]
        report = json.loads((open(f"{cfg.shards}/build.json")).read())
        for split in cfg.splits.all():
            m = load_source(f"{cfg.split_dir(split)}/manifest.json")
            assert m.num_samples > 0, (task, split)
            counts[(task, split)] = m.num_samples
        assert [s["split"] for s in report["splits"]] == cfg.splits.all()
    # 8 images x 2 questions; VQA trainval = train 16 + val 16 - 8 held out (minval) - 8 cleaned
    assert counts[("vqa", "trainval")] == 16 and counts[("vqa", "minval")] == 8
    assert counts[("nlvr2", "train")] == 16 and counts[("gqa", "testdev")] == 16


def test_task_sample_layout(registry):
    cfg = registry["nlvr2"]
    tar = f"{cfg.split_dir('train')}/train-000000.tar"
    samples = _members(tar)
    key, members = next(iter(samples.items()))
    assert {"task.json", "json", "features.npy", "boxes.npy", "img1.json", "img1.features.npy",
            "img1.boxes.npy"} <= set(members)
    task = json.loads(members["task.json"])
    assert task["task"] == "nlvr2" and task["image_ids"]["img1"].endswith("-img1") and task["label"] in (0, 1)
    assert json.loads(members["img1.json"])["image_id"] == task["image_ids"]["img1"]
    vqa = _members(f"{registry['vqa'].split_dir('minval')}/minval-000000.tar")
    t = json.loads(next(iter(vqa.values()))["task.json"])
    assert len(t["answers"]) == 10 and len(t["labels"]) == len(t["scores"]) and max(t["scores"]) <= 1.0
    answers = json.load(open(f"{registry['vqa'].shards}/assets.json"))["answers"]
    assert set(answers) <= {"red", "blue", "green", "yes", "no"} and len(answers) >= 4


def test_clean_train_sets_removes_test_images_of_the_domain(registry, tmp_path):
    ids, notes = held_out_image_ids(registry, "coco")
    assert {"100", "101", "102", "103"} <= ids  # GuessWhat test images (also VQA training images)
    report = json.load(open(f"{registry['vqa'].shards}/build.json"))
    trainval = report["splits"][0]
    assert trainval["removed_by_clean_train_sets"] == 8 and report["clean_train_sets"] is True
    keys = set(_members(f"{registry['vqa'].split_dir('trainval')}/trainval-000000.tar"))
    assert not any(k.startswith(("100", "101", "102", "103")) and len(k) == 4 for k in keys)
    # off: the images stay (build into a copy of the shard root)
    reg2 = load_registry(registry.path, overrides={"vqa": {"shards": str(tmp_path / "vqa")}})
    kept = build_task(reg2, "vqa", TaskBuildConfig(splits=["trainval"], clean_train_sets=False))
    assert kept["splits"][0]["samples"] == 24 and kept["splits"][0]["removed_by_clean_train_sets"] == 0


def test_missing_images_are_an_error_naming_them(registry, tmp_path):
    reg = load_registry(registry.path, overrides={"snli_ve": {"features": {"regions": registry["vqa"].features["regions"]},
                                                              "shards": str(tmp_path / "snli")}})
    with pytest.raises(ValueError, match="not in the feature sets.*'4000'"):
        build_task(reg, "snli_ve", TaskBuildConfig(splits=["dev"]))
    report = build_task(reg, "snli_ve", TaskBuildConfig(splits=["dev"], allow_missing=True, clean_train_sets=False))
    assert report["splits"][0]["samples"] == 0 and report["splits"][0]["missing_images"] == 8


def test_collate_flattens_nlvr2_pairs_and_builds_soft_targets(registry):
    tok = load_tokenizer()
    data = DataConfig(num_workers=0)
    nlvr2 = build_family(registry["nlvr2"], tok)
    b = next(iter(build_task_loader(nlvr2, "train", data, rank=0, world_size=1, micro_batch_size=3, seed=0)))
    assert b.input_ids.shape[0] == 6 and b.num_examples == 3 and b.row_offsets.tolist() == [0, 2, 4, 6]
    assert torch.equal(b.input_ids[0], b.input_ids[1]) and not torch.equal(b.image_feat[0], b.image_feat[1])
    assert (b.task_ids == registry["nlvr2"].id).all() and b.image_loc[:, 0].tolist() == [[0, 0, 1, 1, 1]] * 6
    vqa = build_family(registry["vqa"], tok)
    v = next(iter(build_task_loader(vqa, "trainval", data, rank=0, world_size=1, micro_batch_size=4, seed=0)))
    assert v.target.shape == (4, 3129) and ((v.target > 0).sum(1) >= 1).all() and v.target.max() <= 1.0
    # batch keys are the original example ids (SNLI-VE pairIDs keep their dots; sample keys cannot)
    snli = build_family(registry["snli_ve"], tok)
    s = next(iter(build_task_loader(snli, "train", data, rank=0, world_size=1, micro_batch_size=2, seed=0)))
    assert all(".jpg#" in k for k in s.keys), s.keys
    # the global region is the mean of the detected ones
    feats = v.image_feat.float()
    n = int(v.image_mask[0].sum())
    assert torch.allclose(feats[0, 0], feats[0, 1:n].mean(0), atol=2e-2)


def test_eval_positions_cover_every_sample_once_plus_padding():
    total, world, mb = 11, 2, 4
    per_rank = [eval_positions(total, r, world, mb) for r in range(world)]
    assert all(len(p) == 2 for p in per_rank)  # same number of batches on every rank
    flat = [i for p in per_rank for b in p for i in b]
    assert set(flat) == set(range(total)) and len(flat) == 16  # 5 padded repeats


def test_eval_loader_two_ranks_gather_every_example_once(registry):
    fam = build_family(registry["gqa"], load_tokenizer())
    keys = []
    for rank in range(3):
        loader = EvalLoader(fam, "minval", DataConfig(num_workers=0), rank=rank, world_size=3, micro_batch_size=2)
        assert len(loader) == 2
        keys += [k for b in loader for k in b.keys]
    assert len(set(keys)) == 8 and len(keys) == 12
    assert np.isin(sorted(set(keys)), sorted(set(keys))).all()
