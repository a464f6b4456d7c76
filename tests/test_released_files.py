"""The original's released files: label maps end to end (a synthetic "released" 12-in-1 model and
label maps whose order differs from the derived vocabulary), and the restricted unpickler in
every released-file slot (a code-running pickle is refused naming the file, nothing runs)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert_ds.cli import main as cli
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.model import ViLBert, resolve_config
from vilbert_ds.model.config import tiny
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.loader import EvalLoader
from vilbert_ds.tasks.metrics import vqa_accuracy
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.weights import to_original

from fixtures.model import randomize_
from fixtures.tasks import build_synthetic_tasks

HEAD_OF = {"vqa": "vil_prediction", "gqa": "vil_prediction_gqa", "genomeqa": "vil_prediction"}
# where each task's answers sit in the "released" label maps: an order unlike the derived one
# (derived: most frequent first), the remaining units are answers no question has
POSITIONS = [7, 0, 12, 3, 20]


def _released_answers(real: list[str], width: int) -> list[str]:
    answers = [f"filler {i}" for i in range(width)]
    for pos, answer in zip(POSITIONS, sorted(real, reverse=True)):
        answers[pos] = answer
    return answers


def _write_label_map(cache: Path, label2ans: list[str]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "trainval_label2ans.pkl", "wb") as f:
        pickle.dump(label2ans, f)
    with open(cache / "trainval_ans2label.pkl", "wb") as f:
        pickle.dump({a: i for i, a in enumerate(label2ans)}, f)


def _spread_answers(model, head: str, families, label2ans: list[str]) -> None:
    """Makes a random head answer like a trained one: the units of answers no question has never
    win, and each answer unit prefers the questions near one example (a random head's logits
    hardly vary between inputs: the same unit would win everywhere)."""
    classifier = getattr(model, head)
    feats = []
    hook = classifier.logit_fc[2].register_forward_hook(lambda module, args, out: feats.append(out))
    with torch.no_grad():
        for family in families:
            for batch in EvalLoader(family, family.config.splits.val, DataConfig(num_workers=0), rank=0,
                                    world_size=1, micro_batch_size=64):
                model(**batch.to("cpu", float_dtype=torch.float32).model_inputs(), heads=(head,))
        hook.remove()
        f = torch.cat(feats)
        mean = f.mean(0)
        units = [i for i, a in enumerate(label2ans) if not a.startswith("filler")]
        centers = (f - mean)[torch.linspace(0, len(f) - 1, len(units)).long()]
        last = classifier.logit_fc[3]
        last.bias.fill_(-1e4)
        last.weight[units] = 10 * centers
        last.bias[units] = -(10 * centers) @ mean


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Synthetic VQA/GQA/GenomeQA shards (derived vocabulary), the original's datasets layout
    with VQA and GQA label maps (no Visual Genome one: GenomeQA shares VQA's), and a random
    "released" 12-in-1 checkpoint in the original layout whose heads favour the mapped answers."""
    root = tmp_path_factory.mktemp("released")
    registry_path = build_synthetic_tasks(root / "data", ("vqa", "gqa", "genomeqa"), images=6, questions=2)
    registry = load_registry(registry_path)
    derived = {t: json.loads(Path(registry[t].shards, "assets.json").read_text())["answers"] for t in ("vqa", "gqa")}
    datasets = root / "datasets"
    maps = {}
    for task, folder, width in (("vqa", "VQA", 3129), ("gqa", "gqa", 1533)):
        maps[task] = _released_answers(derived[task], width)
        assert maps[task][: len(derived[task])] != derived[task]  # the derived order would misname units
        _write_label_map(datasets / folder / "cache", maps[task])
    torch.manual_seed(0)
    model = randomize_(ViLBert(tiny(task_specific_tokens=True)), seed=0).eval()
    for head, tasks in (("vil_prediction", ("vqa", "genomeqa")), ("vil_prediction_gqa", ("gqa",))):
        _spread_answers(model, head, [build_family(registry[t], load_tokenizer()) for t in tasks],
                        maps["gqa" if head.endswith("gqa") else "vqa"])
    torch.save(to_original(model), root / "multi_task_model.bin")
    resolve_config("tiny").to_json(root / "bert_tiny.json")
    return {"root": root, "registry": registry, "datasets": datasets, "maps": maps, "model": model,
            "bin": root / "multi_task_model.bin", "config": root / "bert_tiny.json"}


def expected_answers(released, task: str) -> dict[str, str]:
    """The original's answers: argmax of the head logits, named by its label2ans (plain pickle.load
    of the test's own file), question by question."""
    registry = released["registry"]
    family = build_family(registry[task], load_tokenizer())
    folder = {"vqa": "VQA", "gqa": "gqa", "genomeqa": "VQA"}[task]
    with open(released["datasets"] / folder / "cache" / "trainval_label2ans.pkl", "rb") as f:
        label2ans = pickle.load(f)
    out = {}
    model = released["model"]
    loader = EvalLoader(family, registry[task].splits.val, DataConfig(num_workers=0), rank=0, world_size=1,
                        micro_batch_size=64)
    with torch.no_grad():
        for batch in loader:
            batch = batch.to("cpu", float_dtype=torch.float32)
            logits = getattr(model(**batch.model_inputs(), heads=(HEAD_OF[task],)), HEAD_OF[task])
            for key, unit in zip(batch.keys, logits.argmax(dim=1).tolist()):
                out[key] = label2ans[unit]
    return out


def _human_answers(registry, task: str) -> dict[str, list[str]]:
    family = build_family(registry[task])
    return {ex.example_id: ex.payload["answers"] for ex in family.read_annotations(registry[task].splits.val)}


def _eval(capsys, released, task: str, ckpt: Path, out: Path, registry: str | None = None) -> tuple[dict, dict]:
    code = cli(["eval", "--task", task, "--ckpt", str(ckpt), "--registry", registry or released["registry"].path,
                "--out", str(out), "--workers", "0"])
    _, err = capsys.readouterr()
    assert code == 0, err
    split = released["registry"][task].splits.val
    preds = json.loads((out / f"{task}_{split}_predictions.json").read_text())
    key = "questionId" if task == "gqa" else "question_id"
    value = "prediction" if task == "gqa" else "answer"
    return {str(p[key]): p[value] for p in preds}, json.loads((out / f"{task}_{split}_metrics.json").read_text())


@pytest.mark.parametrize("task", ["vqa", "gqa", "genomeqa"])
def test_released_checkpoint_answers_as_the_original(released, task, capsys, tmp_path):
    """convert --label-maps -> eval names every answer as the original model + label map does;
    the derived vocabulary misnames them; shards built from the released maps agree too."""
    root = released["root"]
    expected = expected_answers(released, task)
    humans = _human_answers(released["registry"], task)
    assert len(set(expected.values())) > 1  # the model's answers vary between questions
    # converted without label maps: the units are named by the shards' derived vocabulary
    plain = tmp_path / "plain"
    assert cli(["convert", str(released["bin"]), str(plain), "--config", str(released["config"])]) == 0
    derived, metrics = _eval(capsys, released, task, plain, tmp_path / "eval_plain")
    assert derived.keys() == expected.keys()
    wrong = sum(derived[k] != expected[k] for k in expected)
    assert wrong > 0, "the derived vocabulary should misname some answers of a released model"
    assert "derived" in metrics["label_map"] or "the assets of task" in metrics["label_map"]
    # converted with the released label maps: every answer is the original's
    model_dir = root / "converted"
    if not (model_dir / "label_maps.json").exists():
        assert cli(["convert", str(released["bin"]), str(model_dir), "--config", str(released["config"]),
                    "--label-maps", str(released["datasets"])]) == 0
        written = json.loads((model_dir / "label_maps.json").read_text())["tasks"]
        assert set(written) == {"vqa", "gqa"} and written["vqa"]["answers"] == released["maps"]["vqa"]
    got, metrics = _eval(capsys, released, task, model_dir, tmp_path / "eval_released")
    assert got == expected
    assert "label_maps.json" in metrics["label_map"] and "trainval_label2ans.pkl" in metrics["label_map"]
    # the score is the VQA accuracy of the original's answer (the shards' targets, looked up by answer)
    accuracy = np.mean([vqa_accuracy(expected[k], humans[k]) if task != "gqa" else float(expected[k] == humans[k][0])
                        for k in expected])
    assert metrics["score"] == pytest.approx(accuracy, abs=1e-4)
    # task shards built from the released files carry the label map themselves
    rel_registry = load_registry(released["registry"].path, released_root=released["datasets"],
                                 overrides={t: {"shards": str(root / "released_shards" / t)} for t in HEAD_OF})
    for t in ("vqa", task):
        if not Path(rel_registry[t].shards, "build.json").exists():
            build_task(rel_registry, t, TaskBuildConfig())
    assets = json.loads(Path(rel_registry[task].shards, "assets.json").read_text())
    assert assets["answers"] == released["maps"]["gqa" if task == "gqa" else "vqa"]
    assert assets["source"]["kind"] == ("task" if task == "genomeqa" else "released")
    reg_file = root / "released_tasks.yaml"
    import yaml

    raw = yaml.safe_load(Path(released["registry"].path).read_text())
    for t in HEAD_OF:
        raw["tasks"][t]["shards"] = rel_registry[t].shards
    reg_file.write_text(yaml.safe_dump(raw))
    from_shards, _ = _eval(capsys, released, task, plain, tmp_path / "eval_released_shards", registry=str(reg_file))
    assert from_shards == expected


def test_training_runs_write_their_label_maps(released, tmp_path, caplog):
    from vilbert_ds.tasks.label_maps import LABEL_MAPS_NAME, read_label_maps, write_run_label_maps

    registry = released["registry"]
    families = {t: build_family(registry[t]) for t in ("vqa", "gqa", "genomeqa")}
    write_run_label_maps(tmp_path, families, init_from=str(released["root"] / "converted"))
    maps = read_label_maps(tmp_path / LABEL_MAPS_NAME)
    assert maps["genomeqa"]["answers"] == maps["vqa"]["answers"] == families["vqa"].assets["answers"]
    if (released["root"] / "converted" / LABEL_MAPS_NAME).exists():  # the released order differs: said
        assert "another answer order" in caplog.text


def test_genomeqa_shares_the_vqa_label_map(released):
    registry = released["registry"]
    vqa = json.loads(Path(registry["vqa"].shards, "assets.json").read_text())
    genome = json.loads(Path(registry["genomeqa"].shards, "assets.json").read_text())
    assert genome["answers"] == vqa["answers"] and genome["source"] == {"kind": "task", "task": "vqa"}
    # GenomeQA's val split is cleaned as the original cleans it (train and val)
    family = build_family(registry["genomeqa"])
    assert family.is_cleaned_split("val") and family.is_cleaned_split("train")
    assert not build_family(registry["vqa"]).is_cleaned_split("minval")


# ------------------------------------------------------------------------------ restricted unpickler
MARKER = "/tmp/vilbert_ds_released_pickle_ran_code"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _evil_bytes(protocol: int) -> bytes:
    return pickle.dumps({"answer": _Evil()}, protocol=protocol)


@pytest.fixture(scope="module")
def scene_registry(tmp_path_factory):
    from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks

    root = tmp_path_factory.mktemp("scenes")
    return load_registry(make_scene_tasks(root, ["retrieval_flickr30k", "refcoco"], SceneSpec(images=6)))


SLOTS = [  # (command, released-file path under datasets/)
    ("convert", "VQA/cache/trainval_ans2label.pkl"), ("convert", "VQA/cache/trainval_label2ans.pkl"),
    ("convert", "gqa/cache/trainval_ans2label.pkl"), ("convert", "gqa/cache/trainval_label2ans.pkl"),
    ("vqa", "VQA/cache/trainval_ans2label.pkl"), ("vqa", "VQA/cache/trainval_label2ans.pkl"),
    ("gqa", "gqa/cache/trainval_ans2label.pkl"), ("gqa", "gqa/cache/trainval_label2ans.pkl"),
    ("genomeqa", "visual_genome/cache/trainval_ans2label.pkl"), ("genomeqa", "visual_genome/cache/trainval_label2ans.pkl"),
    ("retrieval_flickr30k", "flickr30k/hard_negative_cleaned.pkl"),
    ("retrieval_flickr30k --no-clean-train-sets", "flickr30k/hard_negative.pkl"), ("refcoco", "refcoco/refcoco/refs(unc).p"),
]


@pytest.mark.parametrize("command,slot", SLOTS, ids=[f"{c}:{s}" for c, s in SLOTS])
def test_code_running_pickles_are_refused_in_every_slot(released, scene_registry, command, slot, tmp_path, capsys):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    datasets = tmp_path / "datasets"
    # every other file of the slot's set is valid, so the evil one is what the reader meets
    for task, folder in (("vqa", "VQA"), ("gqa", "gqa"), ("genomeqa", "visual_genome")):
        _write_label_map(datasets / folder / "cache", released["maps"]["gqa" if task == "gqa" else "vqa"])
    path = datasets / slot
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_evil_bytes(protocol=2 if slot.endswith(".p") else 4))
    if command == "convert":
        argv = ["convert", str(released["bin"]), str(tmp_path / "model"), "--config", str(released["config"]),
                "--label-maps", str(datasets)]
    else:
        task, *extra = command.split()
        registry = released["registry"] if task in HEAD_OF else scene_registry
        argv = ["shards", "task", "--task", task, "--registry", registry.path, "--released", str(datasets), *extra]
    code = cli(argv)
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) and "Traceback" not in err, err
    assert str(path) in lines[-1] and "refusing" in lines[-1] and "posix.system" in lines[-1], lines[-1]
    assert not os.path.exists(MARKER)
    assert not (tmp_path / "model").exists()  # convert refused before writing anything


# ------------------------------------------------------------------------------ clean_train_sets id lists
def test_shipped_test_ids_replace_the_derived_ones(released, tmp_path, capsys):
    """cache/coco_test_ids.npy in VQA's released folder is what clean_train_sets removes (not the
    ids derived from the registry's test splits); genome_test_ids.npy cleans GenomeQA train AND
    val; an object .npy is refused (allow_pickle=False) naming the file."""
    registry = released["registry"]
    vqa_train = build_family(registry["vqa"]).read_annotations("trainval")
    vqa_images = sorted({e.images[""] for e in vqa_train})
    genome = build_family(registry["genomeqa"])
    genome_val = {e.images[""] for e in genome.read_annotations("val")}
    genome_train = {e.images[""] for e in genome.read_annotations("train")}
    datasets = tmp_path / "datasets"
    (datasets / "VQA" / "cache").mkdir(parents=True)
    (datasets / "visual_genome" / "cache").mkdir(parents=True)
    np.save(datasets / "VQA" / "cache" / "coco_test_ids.npy", np.array([int(vqa_images[0]), int(vqa_images[1]), 999999]))
    drop = [sorted(genome_val)[0], sorted(genome_train)[0]]
    np.save(datasets / "visual_genome" / "cache" / "genome_test_ids.npy", np.array([int(i) for i in drop]))
    reg = load_registry(registry.path, released_root=datasets,
                        overrides={t: {"shards": str(tmp_path / "shards" / t)} for t in ("vqa", "genomeqa")})
    report = build_task(reg, "vqa", TaskBuildConfig(splits=["trainval"]))
    removed = sum(e.images[""] in vqa_images[:2] for e in vqa_train)
    assert report["splits"][0]["removed_by_clean_train_sets"] == removed > 0
    assert report["clean_notes"] == [f"{datasets}/VQA/cache/coco_test_ids.npy: 3 ids (the shipped list; replaces the "
                                     f"derived test ids)"]
    derived = build_task(load_registry(registry.path, overrides={"vqa": {"shards": str(tmp_path / "derived")}}), "vqa",
                         TaskBuildConfig(splits=["trainval"]))
    assert derived["splits"][0]["removed_by_clean_train_sets"] != removed  # the derived list is another one
    report = build_task(reg, "genomeqa", TaskBuildConfig())
    by_split = {s["split"]: s["removed_by_clean_train_sets"] for s in report["splits"]}
    assert by_split["train"] > 0 and by_split["val"] > 0  # the original cleans GenomeQA's val split too
    np.save(datasets / "VQA" / "cache" / "coco_test_ids.npy", np.array([object()], dtype=object), allow_pickle=True)
    code = cli(["shards", "task", "--task", "vqa", "--registry", registry.path, "--released", str(datasets),
                "--splits", "trainval"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{datasets}/VQA/cache/coco_test_ids.npy: not a plain numeric/text .npy array" in err, err
