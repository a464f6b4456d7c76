"""The task registry: the 18 original tasks, the 12 of 12-in-1, lookup and validation."""
from __future__ import annotations

import pytest
import yaml

from vilbert_ds.tasks.registry import FAMILIES, build_family, default_registry_path, load_registry, select_tasks

TWELVE = [1, 2, 4, 7, 8, 9, 10, 11, 12, 13, 15, 17]


def test_packaged_registry_has_the_original_tasks():
    reg = load_registry(data_root="/data")
    assert sorted(c.id for c in reg) == list(range(1, 19))
    assert sorted(c.id for c in reg.twelve_in_one()) == TWELVE
    vqa = reg["vqa"]
    assert (vqa.head, vqa.num_labels, vqa.max_seq_length, vqa.max_region_num, vqa.batch_size, vqa.lr) == (
        "vil_prediction", 3129, 23, 101, 128, 4e-5)
    assert vqa.splits.train == "trainval" and vqa.splits.val == "minval"
    assert vqa.features["regions"] == "/data/features/coco" and vqa.shards == "/data/tasks/vqa"
    assert reg["gqa"].head == "vil_prediction_gqa" and reg["gqa"].num_labels == 1533
    assert reg["nlvr2"].head == "vil_binary_prediction" and reg["nlvr2"].splits.val == "dev"
    assert reg["guesswhat_pointing"].max_region_num == 306 and reg["vcr_q_a"].num_epoch == 10
    assert reg["flickr_grounding"].lr == 2e-6


def test_lookup_by_key_title_id_and_original_list():
    reg = load_registry()
    assert reg.resolve("refcoco+").name == "refcoco_plus"
    assert reg.resolve("TASK12").name == reg.resolve("12").name == "nlvr2"
    assert [c.name for c in select_tasks(reg, "1-2-15")] == ["vqa", "genomeqa", "gqa"]
    assert [c.name for c in select_tasks(reg, "vqa,VCR_Q-A")] == ["vqa", "vcr_q_a"]
    assert len(select_tasks(reg, "twelve_in_one")) == 12
    with pytest.raises(KeyError, match="unknown task 'vqa3'"):
        reg.resolve("vqa3")
    with pytest.raises(ValueError, match="twice"):
        select_tasks(reg, "vqa,1")


def test_unimplemented_family_is_a_clear_error():
    reg = load_registry()
    with pytest.raises(NotImplementedError, match="family 'visdial'"):
        build_family(reg["visdial"])
    for name in ("vqa", "gqa", "genomeqa", "snli_ve", "guesswhat", "nlvr2"):
        fam = build_family(reg[name])
        assert fam.config.head in fam.heads and type(fam) in FAMILIES.values()


def test_validation_names_task_and_key(tmp_path):
    raw = yaml.safe_load(open(default_registry_path()))
    raw["tasks"]["vqa"]["head"] = "vil_nonsense"
    bad = tmp_path / "tasks.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="task 'vqa'.*head='vil_nonsense'"):
        load_registry(bad)
    raw = yaml.safe_load(open(default_registry_path()))
    raw["tasks"]["gqa"]["id"] = 1
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="share id 1"):
        load_registry(bad)
    with pytest.raises(ValueError, match="options"):
        build_family(load_registry(overrides={"vqa": {"options": {"holdot": 3}}})["vqa"])
