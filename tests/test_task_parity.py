"""vilbert-ds's task pipelines against the ORIGINAL 12-in-1 dataset classes and scoring.

The expected values were produced by facebookresearch/vilbert-multi-task's own dataset classes,
`task_utils.ForwardModelsVal`/`EvaluatingModel`, `eval_retrieval.py` and the Conceptual Captions
loader, run unmodified on small synthetic inputs in the original file formats
(tests/fixtures/task_parity/README.md says how); no original code runs here. This test writes the
same inputs (feature LMDBs in the original `convert_to_lmdb.py` layout, the public annotation
files, and the original's released files where its `datasets.tar.gz` puts them: label maps,
`coco_test_ids.npy`, `hard_negative.pkl`, the refer toolkit's files), builds them with vilbert-ds's
shard builders (`shards build --format lmdb-pickle` / `cc-lmdb`, then `tasks.build` with that
datasets/ folder as the registry's released_root, what `shards task --released` sets), preprocesses
and collates with the task families, and compares: token ids, segment ids, masks, region features
(float16) and boxes, targets, and the loss and score of the original's scoring on the same fixed
logits.

Deliberate differences, each checked by the equivalence that must hold:
- dynamic padding: vilbert-ds pads text and regions to the longest row of the batch, the original
  to max_seq_length / max_region_num; the unpadded prefix is equal and the padding is masked;
- the global region is averaged in float32 and stored in float16 (the original keeps float32):
  equal to float16 precision;
- randomness (retrieval negatives, pretraining masking and negative captions) comes from
  per-sample generators, not Python's `random`: the deterministic parts are compared, the drawn
  parts checked for structure, and the pretraining masking is checked conditionally (vilbert-ds's
  masking code, fed the original's decisions, reproduces the original's batch);
- SNLI-VE "-" rows carry the label NO_CONSENSUS (-2), not a class: the same all-zero target and the
  same score (counted wrong) as the original, told apart from unlabeled rows (-1, unscored);
- NLVR2 keeps each image of a pair in its own row (test_nlvr2_short_left_image).
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vilbert_ds.cli import main as cli
from vilbert_ds.data.config import DataConfig
from vilbert_ds.data.cc_batches import PretrainCollate
from vilbert_ds.data.sample import decode
from vilbert_ds.data.tario import iter_members, split_name
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.vl_tri import NO_CONSENSUS, one_hot_target

from fixtures.task_parity.regions import class_probs, content_score, projection, region_features

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "task_parity"

lmdb = pytest.importorskip("lmdb")  # a test dependency (setup.py extra "test")

INPUTS = json.loads((FIXTURE / "inputs.json").read_text())
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
P = projection()

RETRIEVAL_SPLITS = {"train": "train", "val": "val", "test": []}
# task -> (feature sets by source, registry overrides, original split -> vilbert-ds split). `options`
# are merged into the packaged task's options (GenomeQA keeps `answers_from: vqa`).
SETUP = {
    "vqa": ({"regions": "coco_vqa"}, dict(max_seq_length=10, max_region_num=6, options={"holdout": 4, "min_answer_count": 1},
                                          splits={"train": "train", "val": "minval", "test": []})),
    "genomeqa": ({"regions": "vg_genomeqa"}, dict(options={"holdout": 5, "min_answer_count": 1})),
    "gqa": ({"regions": "gqa"}, dict(options={"holdout": 4, "min_answer_count": 1})),
    "nlvr2": ({"regions": "nlvr2"}, dict(max_region_num=5)),
    "snli_ve": ({"regions": "flickr_snli"}, {}),
    "refcoco": ({"regions": "refcoco_det", "gt": "refcoco_gt"}, dict(max_region_num=8)),
    "refcoco_plus": ({"regions": "refcoco_plus_det", "gt": "refcoco_plus_gt"}, dict(max_region_num=8)),
    "refcocog": ({"regions": "refcocog_det", "gt": "refcocog_gt"}, dict(max_region_num=8)),
    "visual7w": ({"regions": "visual7w_det", "gt": "visual7w_gt"}, {}),
    "guesswhat_pointing": ({"regions": "guesswhat_det", "gt": "guesswhat_gt"}, {}),
    # no test split in the inputs (the paper protocol's 1k set is then taken from val)
    "retrieval_coco": ({"regions": "retrieval_coco_features"}, dict(max_region_num=8, splits=RETRIEVAL_SPLITS)),
    "retrieval_flickr30k": ({"regions": "retrieval_flickr30k_features"}, dict(max_region_num=8, splits=RETRIEVAL_SPLITS)),
}
# The original's datasets.tar.gz, unpacked as datasets/: each task's folder is its `dataroot` in the
# original vilbert_tasks.yml; the refer toolkit reads {dataroot}/{dataset}/refs(*).p + instances.json.
# These are the files the original read; the test hands datasets/ to vilbert-ds as a user does
# (`--released`, i.e. the registry's released_root), so its builders read them from there.
DATAROOT = {"vqa": "VQA", "genomeqa": "visual_genome", "gqa": "gqa", "retrieval_coco": "cocoRetreival",
            "retrieval_flickr30k": "flickr30k", "refcoco": "refcoco/refcoco", "refcoco_plus": "refcoco/refcoco+",
            "refcocog": "refcoco/refcocog"}
REFER_FILES = ("refs(unc).p", "refs(umd).p", "instances.json")  # in the refer toolkit's folder, not annotations/
# Training annotation files of tasks whose parity run uses other splits only: written empty, since
# the builder reads the training split for a task's assets even when the family has none.
EMPTY_TRAIN = {"nlvr2": "train.json", "snli_ve": "snli_ve_train.jsonl", "guesswhat_pointing": "guesswhat.train.jsonl"}
CLASSIFIERS = ("vqa", "genomeqa", "gqa")
REFER = ("refcoco", "refcoco_plus", "refcocog")
POINTING = ("visual7w", "guesswhat_pointing")
RETRIEVAL = ("retrieval_coco", "retrieval_flickr30k")
GLOBAL_ROW_TOL = 5e-3  # projection of a float16-rounded mean row (|x| <= 2) onto unit directions


# ------------------------------------------------------------------------------ inputs
def _write_feature_lmdb(path: Path, name: str, images: list[dict]) -> None:
    """The original downstream feature LMDB (script/convert_to_lmdb.py): pickled dicts keyed
    str(image_id), plus 'keys'."""
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        keys = []
        for img in images:
            boxes = np.asarray(img["boxes"], dtype=np.float32)
            item = {"image_id": img["image_id"], "image_h": img["h"], "image_w": img["w"], "num_boxes": len(boxes),
                    "boxes": boxes, "features": region_features(f"{name}/{img['image_id']}", len(boxes))}
            keys.append(str(img["image_id"]).encode())
            txn.put(keys[-1], pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(keys))
    env.close()


def _write_cc_lmdb(path: Path, images: list[dict]) -> None:
    """The original CC LMDB as tensorpack's LMDBSerializer writes it (msgpack lists, `__keys__`)."""
    import msgpack
    import msgpack_numpy

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, meminit=False)
    with env.begin(write=True) as txn:
        keys = []
        for i, img in enumerate(images):
            n = len(img["boxes"])
            tag = f"cc/{img['image_id']}"
            dp = [region_features(tag, n), class_probs(tag, n), np.asarray(img["boxes"], dtype=np.float32), str(n),
                  str(img["h"]), str(img["w"]), img["image_id"], img["caption"]]
            keys.append(f"{i:08}".encode())
            txn.put(keys[-1], msgpack.dumps(dp, default=msgpack_numpy.encode, use_bin_type=True))
        txn.put(b"__keys__", msgpack.dumps(keys, use_bin_type=True))
    env.close()


def _write_file(path: Path, spec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kind, content = spec["kind"], spec["content"]
    if kind == "json":
        path.write_text(json.dumps(content))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    elif kind == "pickle":  # the refer toolkit's refs(*.p): a Python 2 era pickle of plain data
        path.write_bytes(pickle.dumps(content, protocol=2))


def _write_hard_negatives(path: Path, pool: dict[str, list[str]]) -> None:
    """`hard_negative.pkl` as the original reads it: `train_image_list` (image ids) and
    `train_hard_pool` [images, K] of indices into that list, column 0 the image itself."""
    images = sorted(pool, key=int)
    index = {img: k for k, img in enumerate(images)}
    table = np.asarray([[index[img]] + [index[j] for j in pool[img]] for img in images])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"train_image_list": [int(i) for i in images], "train_hard_pool": table}, protocol=2))


def _write_label_map(cache: Path, label2ans: list[str]) -> None:
    """The released `cache/trainval_ans2label.pkl` ({answer: label}) and `trainval_label2ans.pkl`."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "trainval_ans2label.pkl").write_bytes(pickle.dumps({a: i for i, a in enumerate(label2ans)}))
    (cache / "trainval_label2ans.pkl").write_bytes(pickle.dumps(label2ans))


def _write_released(datasets: Path) -> None:
    """The parity inputs' released files where the original's datasets.tar.gz puts them: label maps
    (VQA, GenomeQA, GQA), VQA's coco_test_ids.npy, the retrieval hard-negative pools (uncleaned:
    the parity build runs without clean_train_sets) and the refer toolkit's files."""
    for task, folder in DATAROOT.items():
        spec = INPUTS["tasks"][task]
        if "label2ans" in spec:
            _write_label_map(datasets / folder / "cache", spec["label2ans"])
        if "coco_test_ids" in spec:
            np.save(datasets / folder / "cache" / "coco_test_ids.npy", np.asarray(spec["coco_test_ids"]))
        if "hard_pool" in spec:
            _write_hard_negatives(datasets / folder / "hard_negative.pkl", spec["hard_pool"])
        for rel, file in spec["files"].items():
            if rel in REFER_FILES:
                _write_file(datasets / folder / rel, file)


def _overrides(task: str, root: Path, **extra) -> dict:
    """Registry overrides for a parity task: its paths under `root`, the sizes of SETUP, and its
    options merged into the packaged ones."""
    features, sizes = SETUP[task]
    packaged = load_registry()[task]
    out = {"annotations": str(root / "annotations" / task), "shards": str(root / "tasks" / task),
           "features": {src: str(root / "features" / fs) for src, fs in features.items()}, **sizes, **extra}
    out["options"] = {**packaged.options, **sizes.get("options", {})}
    if "label2ans" in INPUTS["tasks"][task]:  # the head as wide as the released map (the fixed logits' width)
        out["num_labels"] = len(INPUTS["tasks"][task]["label2ans"])
    return out


def _read_split(url_dir: str) -> list[dict]:
    samples = []
    for tar in sorted(Path(url_dir).glob("*.tar")):
        with open(tar, "rb") as f:
            by_key: dict[str, dict] = {}
            for _, m in iter_members(f, str(tar)):
                key, ext = split_name(m.name)
                by_key.setdefault(key, {"__key__": key, "__url__": str(tar)})[ext] = bytes(m.data)
        samples.extend(by_key.values())
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every task built by vilbert-ds from the parity inputs, with the original's released files
    under datasets/ as `--released`; returns (registry, families, {task: {split: {example id:
    preprocessed example}}})."""
    root = tmp_path_factory.mktemp("task_parity")
    for name, images in INPUTS["feature_sets"].items():
        if name == "cc":
            continue
        _write_feature_lmdb(root / "lmdb" / name, name, images)
        assert cli(["shards", "build", "--format", "lmdb-pickle", "--trust-pickle", "--input", str(root / "lmdb" / name),
                    "--output", str(root / "features" / name), "--missing-caption", "none", "--no-progress"]) == 0
    _write_released(root / "datasets")
    for task in SETUP:
        for rel, spec in INPUTS["tasks"][task]["files"].items():
            if rel not in REFER_FILES:
                _write_file(root / "annotations" / task / rel, spec)
        if task in EMPTY_TRAIN:
            (root / "annotations" / task / EMPTY_TRAIN[task]).write_text("")
    registry = load_registry(None, data_root=str(root), released_root=str(root / "datasets"),
                             overrides={task: _overrides(task, root) for task in SETUP})
    tokenizer = load_tokenizer()
    families, examples, samples = {}, {}, {}
    rng = np.random.default_rng(0)
    for task in SETUP:
        splits = INPUTS["tasks"][task]["splits"]
        build_task(registry, task, TaskBuildConfig(splits=list(splits.values()), clean_train_sets=False, progress=False))
        family = families[task] = build_family(registry[task], tokenizer)
        examples[task] = {}
        samples[task] = {}
        for original_split, split in splits.items():
            raw = _read_split(registry[task].split_dir(split))
            pre = [family.preprocess(s, rng) for s in raw]
            examples[task][original_split] = {str(p["example_id"]): p for p in pre}
            samples[task][original_split] = {str(p["example_id"]): s for p, s in zip(pre, raw)}
    return SimpleNamespace(root=root, registry=registry, families=families, examples=examples, samples=samples,
                           tokenizer=tokenizer)


def expected(task: str, split: str) -> list[dict]:
    return EXPECTED[task][split]["examples"]


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURE / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def batch_of(built, task: str, split: str, ids: list[str]):
    """vilbert-ds's batch of the examples `ids`, in that order (the original's dataset order)."""
    ex = built.examples[task][split]
    missing = [i for i in ids if i not in ex]
    assert not missing, f"{task}/{split}: vilbert-ds has no examples {missing}; it has {sorted(ex)}"
    return built.families[task].collate([ex[i] for i in ids])


def check_row(where: str, want: dict, arrays: dict, key: str, input_ids, types, text_mask, feat, loc, image_mask):
    """One model row of vilbert-ds (dynamically padded) against the original's (padded to the
    maximum): equal unpadded prefix, masked padding."""
    n_text = int(text_mask.sum())
    assert input_ids[:n_text].tolist() == want["ids"], f"{where}: token ids"
    assert types[:n_text].tolist() == want["seg"], f"{where}: segment ids"
    assert not text_mask[n_text:].any() and not input_ids[n_text:].any(), f"{where}: text padding"
    assert len(input_ids) <= want["padded_len"]
    n = int(image_mask.sum())
    assert n == want["regions"], f"{where}: {n} regions, original {want['regions']}"
    assert image_mask[:n].all() and not image_mask[n:].any(), f"{where}: region mask"
    np.testing.assert_allclose(loc[:n].numpy(), arrays[f"{key}/loc"], rtol=0, atol=1e-6, err_msg=f"{where}: boxes")
    proj = feat[:n].double().numpy() @ P
    want_proj = arrays[f"{key}/feat_proj"]
    np.testing.assert_allclose(proj[1:], want_proj[1:], rtol=0, atol=1e-4, err_msg=f"{where}: region features")
    np.testing.assert_allclose(proj[0], want_proj[0], rtol=0, atol=GLOBAL_ROW_TOL, err_msg=f"{where}: global region")


def check_rows(built, arrays, task: str, split: str, batch, rows: list[int] | None = None) -> None:
    for i, want in enumerate(expected(task, split)):
        r = i if rows is None else rows[i]
        check_row(f"{task}/{split} example {want['id']}", want, arrays, f"{task}/{split}/{want['id']}",
                  batch.input_ids[r], batch.token_type_ids[r], batch.attention_mask[r], batch.image_feat[r],
                  batch.image_loc[r], batch.image_mask[r])


# ------------------------------------------------------------------------------ VL classifier
CLASSIFIER_SPLITS = [("vqa", "train"), ("vqa", "minval"), ("genomeqa", "val"), ("gqa", "minval"), ("gqa", "test")]


def _qid(task: str, example_id: str) -> str:
    """The original's question ids are ints (GQA's "02930152" becomes 2930152); vilbert-ds keeps
    the public id. Compared as ints."""
    return str(int(example_id))


def classifier_batch(built, task, split):
    want = expected(task, split)
    by_int = {_qid(task, k): k for k in built.examples[task][split]}
    return batch_of(built, task, split, [by_int[w["id"]] for w in want]), want


@pytest.mark.parametrize("task,split", CLASSIFIER_SPLITS)
def test_classifier_inputs_and_targets(built, arrays, task, split):
    batch, want = classifier_batch(built, task, split)
    check_rows(built, arrays, task, split, batch)
    for i, w in enumerate(want):
        target = arrays[f"{task}/{split}/{w['id']}/target"]
        np.testing.assert_allclose(batch.target[i].numpy(), target, rtol=0, atol=1e-6,
                                   err_msg=f"{task}/{split} {w['id']}: soft-score target")
    assert batch.task_ids.eq(built.registry[task].id).all()


@pytest.mark.parametrize("task,split", [s for s in CLASSIFIER_SPLITS if s[1] != "test"])
def test_classifier_loss_score_and_answers(built, arrays, task, split):
    """ForwardModelsVal's loss (BCE mean x labels) and score (soft score of the argmax), and
    EvaluatingModel's answer strings, on the same logits."""
    batch, want = classifier_batch(built, task, split)
    head = built.registry[task].head
    logits = torch.from_numpy(arrays[f"{task}/{split}/logits/{head}"])
    family = built.families[task]
    loss, metrics = family.loss(SimpleNamespace(**{head: logits}), batch)
    original = EXPECTED[task][split]["score"]
    assert loss.item() == pytest.approx(original["loss"], rel=1e-6)
    assert metrics["score"].item() * len(want) == pytest.approx(original["batch_score"], abs=1e-5)
    records = family.score(SimpleNamespace(**{head: logits}), batch)
    key = "questionId" if task == "gqa" else "question_id"
    answer = "prediction" if task == "gqa" else "answer"
    got = {_qid(task, k): r["prediction"] for k, r in records.items()}
    assert got == {str(int(r[key])): r[answer] for r in original["results"]}


def test_gqa_question_ids_keep_leading_zeros(built):
    """Deliberate: the original int()s GQA question ids ("02930152" -> 2930152), so its
    prediction file names questions the evaluation server does not know; vilbert-ds keeps them."""
    family = built.families["gqa"]
    entry = family.prediction_entry("02930152", {"prediction": "left"})
    assert entry == {"questionId": "02930152", "prediction": "left"}
    assert "02930152" in built.examples["gqa"]["minval"]


@pytest.mark.parametrize("task", CLASSIFIERS)
def test_released_label_map_is_read_by_the_builder(built, task):
    """The builder (no assets.json beforehand) took the answer vocabulary from the original's
    cache/trainval_ans2label.pkl + trainval_label2ans.pkl in the task's datasets.tar.gz folder, so
    label i means the original's answer i (what lets the targets and scores above compare index by
    index). GenomeQA keeps its registry's `answers_from: vqa`; a released visual_genome map is
    used as given, as the original reads that file."""
    cfg = built.registry[task]
    assets = json.loads((Path(cfg.shards) / "assets.json").read_text())
    cache = built.root / "datasets" / DATAROOT[task] / "cache"
    assert assets["answers"] == INPUTS["tasks"][task]["label2ans"]
    assert assets["source"]["kind"] == "released"
    assert assets["source"]["files"] == [str(cache / "trainval_ans2label.pkl"), str(cache / "trainval_label2ans.pkl")]
    assert cfg.options.get("answers_from", "") == ("vqa" if task == "genomeqa" else "")


def test_clean_train_sets_reads_the_shipped_test_ids(built, tmp_path):
    """The original's --clean_train_sets drops training questions on the images listed in the
    released VQA/cache/coco_test_ids.npy; vilbert-ds with the same datasets/ as `--released`."""
    reg = load_registry(None, data_root=str(built.root), released_root=str(built.root / "datasets"),
                        overrides={"vqa": _overrides("vqa", built.root, shards=str(tmp_path / "vqa"))})
    report = build_task(reg, "vqa", TaskBuildConfig(splits=["train"], clean_train_sets=True, progress=False))
    shipped = built.root / "datasets" / "VQA" / "cache" / "coco_test_ids.npy"
    assert report["clean_notes"] == [f"{shipped}: 1 ids (the shipped list; replaces the derived test ids)"]
    kept = sorted(int(s["__key__"]) for s in _read_split(reg["vqa"].split_dir("train")))
    assert kept == EXPECTED["vqa"]["train_cleaned"]["question_ids"]


# ------------------------------------------------------------------------------ NLVR2, SNLI-VE
NLVR2_SHORT = "dev-77-0-1"  # its left image has 2 boxes (max_region_num 5 holds 4 + the global region)


def test_nlvr2_pairs(built, arrays):
    """Two consecutive rows per example, left then right image (the original's "nlvr" view of its
    concatenated region array), sentence repeated; loss and score of the pair head."""
    order = EXPECTED["nlvr2"]["dev"]["order"]
    batch = batch_of(built, "nlvr2", "dev", order)
    assert batch.row_offsets.tolist() == list(range(0, 2 * len(order) + 1, 2))
    for r, want in enumerate(expected("nlvr2", "dev")):  # ordered (example, image): model row r
        if want["id"].split("#")[0] != NLVR2_SHORT:
            check_row(f"nlvr2 {want['id']}", want, arrays, f"nlvr2/dev/{want['id']}", batch.input_ids[r],
                      batch.token_type_ids[r], batch.attention_mask[r], batch.image_feat[r], batch.image_loc[r],
                      batch.image_mask[r])
    logits = torch.from_numpy(arrays["nlvr2/dev/logits/vil_binary_prediction"])
    loss, metrics = built.families["nlvr2"].loss(SimpleNamespace(vil_binary_prediction=logits), batch)
    original = EXPECTED["nlvr2"]["dev"]["score"]
    assert loss.item() == pytest.approx(original["loss"], rel=1e-6)
    assert metrics["score"].item() * len(order) == pytest.approx(original["batch_score"])
    for i, identifier in enumerate(order):
        target = arrays[f"nlvr2/dev/{identifier}#0/target"]
        assert batch.label[i].item() == int(target.argmax())


def test_nlvr2_short_left_image(built, arrays):
    """Deliberate difference: the original concatenates both images' regions into one array of
    2 x max_region_num rows and splits it in the middle, so a left image with fewer than
    max_region_num - 1 boxes pulls the right image's first regions into the left row (and the right
    row loses its global region). With the released 100-box features this never happens;
    vilbert-ds keeps each image in its own row."""
    order = EXPECTED["nlvr2"]["dev"]["order"]
    batch = batch_of(built, "nlvr2", "dev", order)
    i = order.index(NLVR2_SHORT)
    left, right = 2 * i, 2 * i + 1
    n_left, n_right = int(batch.image_mask[left].sum()), int(batch.image_mask[right].sum())
    assert (n_left, n_right) == (3, 5)
    want = {w["id"]: w for w in expected("nlvr2", "dev")}
    orig_left = arrays[f"nlvr2/dev/{NLVR2_SHORT}#0/feat_proj"]
    assert want[f"{NLVR2_SHORT}#0"]["regions"] == 5 and want[f"{NLVR2_SHORT}#1"]["regions"] == 3
    ours_left = batch.image_feat[left, :n_left].double().numpy() @ P
    ours_right = batch.image_feat[right, :n_right].double().numpy() @ P
    np.testing.assert_allclose(orig_left[:3], ours_left, atol=GLOBAL_ROW_TOL)  # the left image's own rows
    np.testing.assert_allclose(orig_left[3:], ours_right[:2], atol=GLOBAL_ROW_TOL)  # + the right image's first two


def snli_batch(built):
    want = expected("snli_ve", "dev")
    return batch_of(built, "snli_ve", "dev", [w["id"] for w in want]), want


def test_snli_ve_inputs_labels_and_training_score(built, arrays):
    batch, want = snli_batch(built)
    check_rows(built, arrays, "snli_ve", "dev", batch)
    for i, w in enumerate(want):
        target = arrays[f"snli_ve/dev/{w['id']}/target"]
        # an all-zero target is a "-" row (no annotator consensus): scored as wrong, unlike an
        # unlabeled row, so vilbert-ds marks it NO_CONSENSUS; its one-hot target is all zero too
        assert batch.label[i].item() == (int(target.argmax()) if target.any() else NO_CONSENSUS)
        np.testing.assert_array_equal(one_hot_target(batch.label[i: i + 1], 3)[0].numpy(), target)
    logits = torch.from_numpy(arrays["snli_ve/dev/logits/vil_tri_prediction"])
    loss, metrics = built.families["snli_ve"].loss(SimpleNamespace(vil_tri_prediction=logits), batch)
    original = EXPECTED["snli_ve"]["dev"]["score"]
    assert loss.item() == pytest.approx(original["loss"], rel=1e-6)  # "-" rows: all-zero target in both
    assert metrics["score"].item() * len(want) == pytest.approx(original["batch_score"])


def test_snli_ve_evaluation_score_counts_dash_rows(built, arrays):
    batch, want = snli_batch(built)
    family = built.families["snli_ve"]
    logits = torch.from_numpy(arrays["snli_ve/dev/logits/vil_tri_prediction"])
    metric = family.new_metric()
    metric.update(family.score(SimpleNamespace(vil_tri_prediction=logits), batch))
    original = EXPECTED["snli_ve"]["dev"]["score"]
    assert metric.result()["score"] == pytest.approx(original["batch_score"] / original["batch_size"])


# ------------------------------------------------------------------------------ refer
def refer_batch(built, task, split):
    want = expected(task, split)
    return batch_of(built, task, split, [w["id"] for w in want]), want


@pytest.mark.parametrize("task", REFER)
@pytest.mark.parametrize("split", ["train", "val"])
def test_refer_regions(built, arrays, task, split):
    """Training rows: global + detected + GT boxes truncated to max_region_num from the end;
    other splits: detected boxes only (the original's ReferExpressionDataset)."""
    batch, want = refer_batch(built, task, split)
    check_rows(built, arrays, task, split, batch)
    # targets are zero on the same rows (thresholded IoU; the +1-pixel convention moves values only)
    for i, w in enumerate(want):
        target = arrays[f"{task}/{split}/{w['id']}/target"][: w["regions"]]
        got = batch.target[i, : w["regions"]].numpy()
        if split == "train":
            assert ((got > 0) == (target > 0)).all(), f"{task}/{split} {w['id']}: rows above the IoU threshold"


@pytest.mark.parametrize("task", REFER)
@pytest.mark.parametrize("split", ["train", "val"])
def test_refer_targets_and_score(built, arrays, task, split):
    batch, want = refer_batch(built, task, split)
    for i, w in enumerate(want):
        target = arrays[f"{task}/{split}/{w['id']}/target"][: w["regions"]]
        np.testing.assert_allclose(batch.target[i, : w["regions"]].numpy(), target, rtol=0, atol=1e-6)
    stored = arrays[f"{task}/{split}/logits/vision_logit"]
    logits = torch.from_numpy(stored[:, : batch.image_feat.size(1)])
    loss, metrics = built.families[task].loss(SimpleNamespace(vision_logit=logits), batch)
    original = EXPECTED[task][split]["score"]
    assert loss.item() == pytest.approx(original["loss"], rel=1e-5)
    assert metrics["score"].item() * len(want) == pytest.approx(original["batch_score"])


# ------------------------------------------------------------------------------ pointing
def pointing_batch(built, task, split):
    want = expected(task, split)
    return batch_of(built, task, split, [w["id"] for w in want]), want


POINTING_SPLITS = [("visual7w", "val"), ("guesswhat_pointing", "valid")]


@pytest.mark.parametrize("task,split", POINTING_SPLITS)
def test_pointing_regions_and_candidates(built, arrays, task, split):
    """Rows = global + 100 detected + the image's GT boxes; the candidates are the GT rows the
    original gathers with `vision_logit[:, 101:].gather(1, multiple_choice_ids)` (its padding
    index for GuessWhat's 204 slots is a padded region, vilbert-ds masks padded candidates)."""
    batch, want = pointing_batch(built, task, split)
    check_rows(built, arrays, task, split, batch)
    for i, w in enumerate(want):
        mc = [m for m in w["mc"] if 101 + m < w["regions"]]
        c = int(batch.candidate_mask[i].sum())
        assert batch.candidate_rows[i, :c].tolist() == [101 + m for m in mc], f"{task} {w['id']}: candidate rows"
        target = arrays[f"{task}/{split}/{w['id']}/target"][: len(mc)]
        assert batch.gold[i].item() == int(target.argmax())
        assert ((batch.target[i, :c].numpy() > 0) == (target > 0)).all()


@pytest.mark.parametrize("task,split", POINTING_SPLITS)
def test_pointing_score(built, arrays, task, split):
    batch, want = pointing_batch(built, task, split)
    logits = torch.from_numpy(arrays[f"{task}/{split}/logits/vision_logit"][:, : batch.image_feat.size(1)])
    _, metrics = built.families[task].loss(SimpleNamespace(vision_logit=logits), batch)
    assert metrics["score"].item() * len(want) == pytest.approx(EXPECTED[task][split]["score"]["batch_score"])


@pytest.mark.parametrize("task,split", POINTING_SPLITS)
def test_pointing_targets_and_loss(built, arrays, task, split):
    batch, want = pointing_batch(built, task, split)
    for i, w in enumerate(want):
        c = int(batch.candidate_mask[i].sum())
        target = arrays[f"{task}/{split}/{w['id']}/target"][:c]
        np.testing.assert_allclose(batch.target[i, :c].numpy(), target, rtol=0, atol=1e-6)
    logits = torch.from_numpy(arrays[f"{task}/{split}/logits/vision_logit"][:, : batch.image_feat.size(1)])
    loss, _ = built.families[task].loss(SimpleNamespace(vision_logit=logits), batch)
    assert loss.item() == pytest.approx(EXPECTED[task][split]["score"]["loss"], rel=1e-5)


# ------------------------------------------------------------------------------ retrieval
def retrieval_train(built, task):
    want = expected(task, "train")
    by_image: dict[int, list[str]] = {}
    for k, ex in sorted(built.examples[task]["train"].items(), key=lambda kv: int(kv[0])):
        by_image.setdefault(int(ex["image_id"]), []).append(k)
    ids = []
    for w in want:  # the original's entries are the captions in file order; sent ids count in the same order
        ids.append(by_image[w["image_id"]].pop(0))
    return batch_of(built, task, "train", ids), want


@pytest.mark.parametrize("task", RETRIEVAL)
def test_retrieval_training_rows(built, arrays, task):
    """4 rows per caption. Deterministic: row 0 (the true pair) equals the original's. Drawn
    (different generators): both sides have option 2 = own image + a caption of another image,
    option 3 = own caption + another image, option 4 = own image + a caption of another image."""
    batch, want = retrieval_train(built, task)
    captions = {int(k): v for k, v in EXPECTED[task]["train"]["captions"].items()}
    for i, w in enumerate(want):
        true_pair = {"ids": w["options"][0]["ids"], "seg": w["options"][0]["seg"], "padded_len": 30,
                     "regions": sum(w["options"][0]["image_mask"])}
        r = 4 * i
        check_row(f"{task}/train caption {w['id']}", true_pair, arrays, f"{task}/train/{w['id']}", batch.input_ids[r],
                  batch.token_type_ids[r], batch.attention_mask[r], batch.image_feat[r], batch.image_loc[r],
                  batch.image_mask[r])
    first_rows = {}
    for i, w in enumerate(want):
        first_rows[w["image_id"]] = (batch.image_feat[4 * i, 1].double().numpy() @ P)
    for i, w in enumerate(want):
        own = w["options"][0]["ids"]
        for side, opts in (("original", w["options"]), ("vilbert-ds", None)):
            def text(k):
                if opts is not None:
                    return opts[k]["ids"]
                r = 4 * i + k
                return batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist()

            def image_row1(k):
                if opts is not None:
                    return np.asarray(opts[k]["row1"])
                return batch.image_feat[4 * i + k, 1].double().numpy() @ P

            def image_of(k):
                hits = [img for img, row in first_rows.items() if np.allclose(row, image_row1(k), atol=1e-4)]
                assert len(hits) == 1, f"{side} {task} caption {w['id']} option {k + 1}: image not identified"
                return hits[0]

            def caption_of(k):
                owners = [img for img, caps in captions.items() if text(k) in caps]
                assert owners, f"{side} {task} caption {w['id']} option {k + 1}: not a caption of the split"
                return owners[0]

            assert text(0) == own and image_of(0) == w["image_id"]
            assert image_of(1) == w["image_id"] and caption_of(1) != w["image_id"], f"{side} option 2"
            assert text(2) == own and image_of(2) != w["image_id"], f"{side} option 3"
            assert image_of(3) == w["image_id"] and caption_of(3) != w["image_id"], f"{side} option 4"
    logits = torch.from_numpy(arrays[f"{task}/train/logits/vil_logit"])
    loss, metrics = built.families[task].loss(SimpleNamespace(vil_logit=logits), batch)
    original = EXPECTED[task]["train"]["score"]
    assert loss.item() == pytest.approx(original["loss"], rel=1e-6)
    assert metrics["score"].item() * len(want) == pytest.approx(original["batch_score"])


@pytest.mark.parametrize("task", RETRIEVAL)
def test_original_hard_negatives_come_from_its_pool(built, task):
    """What the original does (a check of the fixture): option 4 of a training caption is a caption
    of the image hard_negative.pkl lists for it."""
    captions = {int(k): v for k, v in EXPECTED[task]["train"]["captions"].items()}
    pool = INPUTS["tasks"][task]["hard_pool"]
    for w in expected(task, "train"):
        assert w["options"][3]["ids"] in [c for img in pool[str(w["image_id"])] for c in captions[int(img)]]


@pytest.mark.parametrize("task", RETRIEVAL)
def test_hard_negatives_from_the_released_pool(built, task):
    batch, want = retrieval_train(built, task)
    captions = {int(k): v for k, v in EXPECTED[task]["train"]["captions"].items()}
    pool = INPUTS["tasks"][task]["hard_pool"]
    for i, w in enumerate(want):
        r = 4 * i + 3
        ids = batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist()
        assert ids in [c for img in pool[str(w["image_id"])] for c in captions[int(img)]]


@pytest.mark.parametrize("task", RETRIEVAL)
def test_random_negatives_cover_the_whole_split(built, task):
    """A micro-batch of two captions of two images: over many draws the original's random image
    (option 3) is any other image of the split; here it must be too."""
    family = built.families[task]
    ex, raw = built.examples[task]["train"], built.samples[task]["train"]
    two = [next(k for k, e in ex.items() if int(e["image_id"]) == img) for img in (1000, 1001)]
    seen = set()
    for seed in range(40):  # preprocess + collate with fresh draws, as each epoch would
        rng = np.random.default_rng(seed)
        batch = family.collate([family.preprocess(raw[k], rng) for k in two])
        seen.add(tuple(batch.image_feat[2, 1, :4].tolist()))
    assert len(seen) == 3  # the first caption's random image: 1001, 1002 or 1003, not only its batch mate 1001


class ContentModel(torch.nn.Module):
    """The stand-in model the original's eval_retrieval.py ran with (regions.content_score)."""

    def forward(self, input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask,
                task_ids=None, heads=None):
        s = content_score(input_ids.numpy(), attention_mask.numpy(), image_feat[:, 1].double().numpy(),
                          image_attention_mask.numpy())
        return SimpleNamespace(vil_logit=torch.from_numpy(s).float()[:, None])


@pytest.mark.parametrize("task", RETRIEVAL)
def test_retrieval_ranking_matches_eval_retrieval(built, task):
    """eval_retrieval.py's text->image R@1/5/10, median and mean rank over the captions it
    evaluated (its final line divides by a fixed 5000 captions x 1000 images: the 5k/1k protocol
    only), and its top-ranked images, from the same scores."""
    family = built.families[task]
    ex = built.examples[task]["val"]
    batches = [family.collate([ex[k] for k in sorted(ex, key=int)])]
    metric = family.evaluate_ranking(ContentModel(), batches)
    got = metric.summarize(metric.records)
    want = EXPECTED[task]["val"]
    nums = dict(re.findall(r"(r1|r5|r10|mder|meanr):([0-9.]+)", want["running"]))
    assert got["t2i_R@1"] == pytest.approx(float(nums["r1"]), abs=1e-3)
    assert got["t2i_R@5"] == pytest.approx(float(nums["r5"]), abs=1e-3)
    assert got["t2i_R@10"] == pytest.approx(float(nums["r10"]), abs=1e-3)
    assert got["t2i_mean_rank"] == pytest.approx(float(nums["meanr"]), abs=1e-3)
    assert got["t2i_median_rank"] == pytest.approx(float(nums["mder"]), abs=1e-3)
    images = [img for img in dict.fromkeys(INPUTS["tasks"][task]["val_images"])]
    ranked = metric.rankings(top=len(images))["text_to_image"]
    order = sorted(ex, key=int)
    for caption, original_top in zip(order, want["results"]):
        mine = next(r for r in ranked if str(r["sent_id"]) == caption)["image_ids"]
        assert [str(i) for i in mine] == [str(images[j]) for j in original_top[: len(images)]]


# ------------------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def cc(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc_parity")
    images = INPUTS["feature_sets"]["cc"]
    _write_cc_lmdb(root / "validation_feat_all.lmdb", images)
    assert cli(["shards", "build", "--format", "cc-lmdb", "--input", str(root / "validation_feat_all.lmdb"),
                "--output", str(root / "shards"), "--no-progress"]) == 0
    samples = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            members: dict[str, dict] = {}
            for _, m in iter_members(f, str(tar)):
                key, ext = split_name(m.name)
                members.setdefault(key, {})[ext] = bytes(m.data)
        for key, mem in members.items():
            s = decode(key, mem, key, num_classes=1601)
            samples[str(s.meta["image_id"])] = s
    pool = root / "caption_val.json"
    pool.write_text(json.dumps(INPUTS["cc"]["captions"]))
    cfg = DataConfig(train=str(root / "shards" / "manifest.json"), max_seq_length=24, max_regions=36, objective=0,
                     visual_target=0, num_workers=0)
    collate = PretrainCollate(cfg, seed=0, caption_pool_url=str(pool), num_classes=1601)
    collate.setup()
    return SimpleNamespace(samples=samples, collate=collate)


def _decisions(want: dict, proj: np.ndarray, mask_id: int):
    """The original's random decisions, read back from its outputs, as vilbert-ds draws: token
    draws p [T], replacement ids [T], region draws [36] (< 0.15 targets; / 0.15 < 0.8 [MASK] for
    tokens, < 0.9 zeroed for regions)."""
    ids, labels = np.asarray(want["input_ids"]), np.asarray(want["lm_label_ids"])
    n = int(np.asarray(want["input_mask"]).sum()) - 2
    tokens = np.where(labels != -1, labels, ids)[1: n + 1]
    p = np.full(22, 1.0)
    random_ids = np.zeros(22, dtype=np.int64)
    for j in range(n):
        label, out = labels[j + 1], ids[j + 1]
        if label == -1:
            p[j] = 0.5
        elif out == mask_id:
            p[j] = 0.15 * 0.4
        elif out != label:
            p[j], random_ids[j] = 0.15 * 0.85, out
        else:
            p[j] = 0.15 * 0.95
    target = np.asarray(want["image_label"]) == 1
    zeroed = np.abs(proj[1:]).sum(axis=1) == 0
    draws = np.where(target, np.where(zeroed, 0.15 * 0.5, 0.15 * 0.95), 0.5)
    return tokens, n, p, random_ids, draws


def test_pretraining_masking_and_regions_given_the_originals_draws(cc, arrays):
    """ConceptCapLoader's batches (BertPreprocessBatch) against vilbert-ds's PretrainCollate: the
    original's random decisions (negative caption, token and region masks, random ids) are read
    back from its outputs and fed to vilbert-ds's masking stages; every field must then equal the
    original's, the global region included (sum of the masked features / number of regions not
    overlapping a masked one, IoU > 0.4 with the +1-pixel convention)."""
    collate, tok = cc.collate, cc.collate.tokenizer
    captions = INPUTS["cc"]["captions"]
    pool = [tok.encode(c, add_special_tokens=False)[:22] for c in captions.values()]
    checked = {"negatives": 0, "masked_regions": 0}
    for want in EXPECTED["cc"]["train"]["examples"]:
        key = f"cc/train/{want['id']}"
        proj = arrays[f"{key}/feat_proj"]
        tokens, n, p, random_ids, draws = _decisions(want, proj, collate.mask_id)
        own = tok.encode(captions[want["image_id"]], add_special_tokens=False)[:22]
        if want["is_next"] == 0:
            assert tokens.tolist() == own
        else:
            assert tokens.tolist() in pool
            checked["negatives"] += 1
        padded = np.zeros((1, 22), dtype=np.int64)
        padded[0, :n] = tokens
        input_ids, attention, lm = collate._mask_text(padded, np.array([n]), p[None], random_ids[None])
        assert input_ids[0].tolist() == want["input_ids"]
        assert attention[0].tolist() == want["input_mask"] and not any(want["segment_ids"])
        assert lm[0].tolist() == want["lm_label_ids"]
        vis = collate.regions([cc.samples[want["image_id"]]], draws[None])
        assert vis.image_label[0].tolist() == want["image_label"]
        assert vis.image_mask[0].tolist() == want["image_mask"]
        np.testing.assert_allclose(vis.image_loc[0], arrays[f"{key}/loc"], rtol=0, atol=1e-6)
        got = vis.image_feat[0].double().numpy() @ P
        np.testing.assert_allclose(got[1:], proj[1:], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[0], proj[0], rtol=0, atol=GLOBAL_ROW_TOL)
        t = vis.image_target[0].double().numpy() @ projection("targets", 8)[:1601]
        np.testing.assert_allclose(t, arrays[f"{key}/target_proj"], rtol=0, atol=1e-4)
        checked["masked_regions"] += int((np.asarray(want["image_label"]) == 1).sum())
    assert checked["negatives"] > 0 and checked["masked_regions"] > 0
