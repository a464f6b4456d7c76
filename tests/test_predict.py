"""`vilbert-ds predict` and `vilbert_ds.Predictor`: for each task family, predict on raw region
features (TSV row, .npz, pickled LMDB entry, shard sample) gives what `vilbert-ds eval` gives
for the same example on task shards built from the same features (the chosen answer / class /
box from eval's prediction file, the probabilities from the eval loader's logits); retrieval
scores equal eval's ranking columns, zero-shot (pretraining model) and with vil_logit; refused
inputs are one line, exit status 2."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from vilbert_ds.cli import main as cli
from vilbert_ds.data.config import DataConfig
from vilbert_ds.data.sample import FeatureRecord
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.model import ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.predict import Predictor, Query
from vilbert_ds.tasks.build import TaskBuildConfig, build_task, iter_feature_samples
from vilbert_ds.tasks.label_maps import family_label_maps, write_label_maps
from vilbert_ds.tasks.loader import EvalLoader
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks
from vilbert_ds.weights import save_model

from fixtures.tasks import build_synthetic_tasks

QA_TASKS = ("vqa", "snli_ve", "nlvr2", "guesswhat")
SCENE_TASKS = ("refcoco", "visual7w", "retrieval_flickr30k")


@pytest.fixture(scope="module")
def registry_path(tmp_path_factory):
    """QA and scene tasks in one registry, their shards built from the same feature sets."""
    root = tmp_path_factory.mktemp("predict_tasks")
    build_synthetic_tasks(root, QA_TASKS, images=4, questions=2)
    path = make_scene_tasks(root, list(SCENE_TASKS), SceneSpec(images=4))
    registry = load_registry(path)
    for task in SCENE_TASKS:
        build_task(registry, task, TaskBuildConfig(max_count=64))
    return path


@pytest.fixture(scope="module")
def registry(registry_path):
    return load_registry(registry_path)


def tiny_model(with_task_heads: bool = True) -> ViLBert:
    torch.manual_seed(0)  # a wider init than BERT's: logits far apart, argmaxes stable across batch padding
    return ViLBert(tiny(with_task_heads=with_task_heads, task_specific_tokens=with_task_heads,
                        initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def task_model(tmp_path_factory, registry):
    """A task model directory with the label map of the VQA shards it would have been trained on."""
    directory = save_model(tiny_model(), tmp_path_factory.mktemp("task_model") / "model")
    write_label_maps(directory, family_label_maps({"vqa": build_family(registry["vqa"])}))  # as a training run does
    return directory


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    return save_model(tiny_model(with_task_heads=False), tmp_path_factory.mktemp("pretrained") / "model")


# ------------------------------------------------------------------------------ helpers
def first_example(cfg, split: str) -> tuple[dict, dict]:
    """(task JSON, {slot: image id}) of the first sample of a task split."""
    sample = next(iter_feature_samples(cfg.split_dir(split)))
    task = json.loads(bytes(sample.extra["task.json"]))
    return task, task["image_ids"]


def feature_record(registry, source_dir: str, image_id: str) -> FeatureRecord:
    """One image of a feature shard set as the detector record it was built from (float32)."""
    for s in iter_feature_samples(source_dir):
        if s.meta["image_id"] == image_id:
            return FeatureRecord(image_id=image_id, image_w=s.meta["image_w"], image_h=s.meta["image_h"],
                                 boxes=np.array(s.boxes, dtype=np.float32), features=s.features.astype(np.float32))
    raise AssertionError(f"{image_id} not in {source_dir}")


def write_tsv(path, records) -> str:
    from vilbert_ds.data.formats import write_tsv_row

    with open(path, "wb") as f:
        for r in records:
            write_tsv_row(f, r, with_cls_prob=False)
    return str(path)


def write_npz(path, r: FeatureRecord) -> str:
    np.savez(path, features=r.features, boxes=r.boxes, image_w=np.int64(r.image_w), image_h=np.int64(r.image_h),
             image_id=np.str_(r.image_id))
    return str(path)


def write_pickle_lmdb(path, records) -> str:
    """The original downstream feature LMDB layout (pickled dicts keyed by image id, plus `keys`)."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for r in records:
            txn.put(r.image_id.encode(), pickle.dumps(dict(image_id=r.image_id, image_h=r.image_h, image_w=r.image_w,
                                                          num_boxes=r.num_boxes, boxes=r.boxes, features=r.features)))
        txn.put(b"keys", pickle.dumps([r.image_id.encode() for r in records]))
    env.close()
    return str(path)


def run_eval(registry_path, cfg, model_dir, split, out) -> dict:
    """`vilbert-ds eval` (the CLI, in process); returns its prediction file."""
    rc = cli(["eval", "--task", cfg.name, "--ckpt", str(model_dir), "--registry", str(registry_path), "--split", split,
              "--out", str(out), "--workers", "0", "--batch-size", "3"])
    assert rc == 0
    return json.loads((out / f"{cfg.name}_{split}_predictions.json").read_text())


def eval_outputs(cfg, model_dir, split, example_id):
    """The eval loader's batch holding `example_id` (batches of 3: padded with other examples),
    the model's output on it, and the example's index in it."""
    family = build_family(cfg, load_tokenizer())
    model = Predictor.from_pretrained(model_dir, device="cpu").model
    loader = EvalLoader(family, split, DataConfig(num_workers=0), rank=0, world_size=1, micro_batch_size=3)
    for batch in loader:
        if example_id in batch.keys:
            batch = batch.to("cpu", float_dtype=torch.float32)
            with torch.no_grad():
                return family, family.forward(model, batch), batch, batch.keys.index(example_id)
    raise AssertionError(f"{example_id} not in split {split}")


def predict_json(capsys, *argv) -> dict:
    capsys.readouterr()
    rc = cli(["predict", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def refused(capsys, *argv) -> str:
    capsys.readouterr()
    rc = cli(["predict", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ families vs eval
def test_vqa_tsv_row_matches_eval(registry_path, registry, task_model, tmp_path, capsys):
    cfg = registry["vqa"]
    split = cfg.splits.val
    task, images = first_example(cfg, split)
    other = next(s.meta["image_id"] for s in iter_feature_samples(cfg.features["regions"])
                 if s.meta["image_id"] != images[""])
    tsv = write_tsv(tmp_path / "feats.tsv", [feature_record(registry, cfg.features["regions"], i)
                                             for i in (other, images[""])])
    got = predict_json(capsys, "--model", task_model, "--task", "vqa", "--registry", registry_path,
                       "--features", f"{tsv}#{images['']}", "--question", task["question"], "--top-k", "3")
    result = got["results"][0]
    assert result["image_id"] == images[""] and "label_maps.json" in got["label_map"]

    predictions = {str(p["question_id"]): p["answer"] for p in run_eval(registry_path, cfg, task_model, split,
                                                                          tmp_path / "eval")}
    assert result["answer"] == predictions[task["example_id"]] == result["answers"][0]["answer"]
    family, out, batch, i = eval_outputs(cfg, task_model, split, task["example_id"])
    answers = family.head_answers
    logits = family.logits(out)[i, : len(answers)].float()
    probs = torch.softmax(logits, -1)
    for a in result["answers"]:
        assert a["logit"] == pytest.approx(float(logits[answers.index(a["answer"])]), rel=1e-5, abs=1e-5)
        assert a["probability"] == pytest.approx(float(probs[answers.index(a["answer"])]), abs=1e-5)


@pytest.mark.parametrize("task_name, fmt", [("snli_ve", "npz"), ("guesswhat", "lmdb-pickle")])
def test_tri_classes_match_eval(registry_path, registry, task_model, tmp_path, capsys, task_name, fmt):
    cfg = registry[task_name]
    split = cfg.splits.val
    task, images = first_example(cfg, split)
    record = feature_record(registry, cfg.features["regions"], images[""])
    if fmt == "npz":
        spec, extra = write_npz(tmp_path / "image.npz", record), []
    else:
        spec, extra = f"{write_pickle_lmdb(tmp_path / 'feats.lmdb', [record])}#{images['']}", ["--trust-pickle"]
    got = predict_json(capsys, "--model", task_model, "--task", task_name, "--registry", registry_path,
                       "--features", spec, "--text", task["text"], *extra)["results"][0]

    entries = run_eval(registry_path, cfg, task_model, split, tmp_path / "eval")
    key = "pairID" if task_name == "snli_ve" else "question_id"
    label = {str(e[key]): e.get("gold_label", e.get("answer")) for e in entries}[task["example_id"]]
    assert got["label"] == label
    family, out, batch, i = eval_outputs(cfg, task_model, split, task["example_id"])
    logits = out.vil_tri_prediction[i].float()
    assert list(got["logits"].values()) == pytest.approx(logits.tolist(), rel=1e-5, abs=1e-5)
    assert list(got["probabilities"].values()) == pytest.approx(torch.softmax(logits, -1).tolist(), abs=1e-5)
    assert list(got["probabilities"]) == list(family.label_names)


def test_nlvr2_two_images_match_eval(registry_path, registry, task_model, tmp_path, capsys):
    cfg = registry["nlvr2"]
    split = cfg.splits.val
    task, images = first_example(cfg, split)
    features = cfg.features["regions"]
    args = ["--model", task_model, "--task", "nlvr2", "--registry", registry_path, "--text", task["text"]]
    got = predict_json(capsys, *args, "--features", f"{features}#{images['']}", f"{features}#{images['img1']}")
    result = got["results"][0]
    assert result["image_ids"] == [images[""], images["img1"]]
    # the task shard sample itself carries both images
    same = predict_json(capsys, *args, "--features", f"{cfg.split_dir(split)}#{task['example_id']}")["results"][0]
    assert same["logits"] == pytest.approx(result["logits"], rel=1e-5, abs=1e-5)

    entries = run_eval(registry_path, cfg, task_model, split, tmp_path / "eval")
    assert result["label"] == {e["identifier"]: e["prediction"] for e in entries}[task["example_id"]]
    _, out, _, i = eval_outputs(cfg, task_model, split, task["example_id"])
    logits = out.vil_binary_prediction[i].float()
    assert [result["logits"][k] for k in ("False", "True")] == pytest.approx(logits.tolist(), rel=1e-5, abs=1e-5)


def test_refer_box_matches_eval(registry_path, registry, task_model, tmp_path, capsys):
    cfg = registry["refcoco"]
    split = cfg.splits.val
    task, images = first_example(cfg, split)
    got = predict_json(capsys, "--model", task_model, "--task", "refcoco", "--registry", registry_path,
                       "--features", f"{cfg.features['regions']}#{images['']}", "--expression", task["text"])
    result = got["results"][0]

    entry = {str(e["sent_id"]): e for e in run_eval(registry_path, cfg, task_model, split, tmp_path / "eval")}
    x, y, w, h = entry[str(task["sent_id"])]["bbox"]
    assert result["box"] == pytest.approx([x, y, x + w, y + h], abs=0.011)  # eval writes [x, y, w, h]
    family, out, batch, i = eval_outputs(cfg, task_model, split, task["example_id"])
    real = int(batch.image_mask[i].sum())
    logits = family.region_logits(out)[i, :real]
    probs = torch.softmax(logits, -1)
    assert result["region"] == int(probs.argmax())
    for t in result["top"]:
        assert t["logit"] == pytest.approx(float(logits[t["region"]]), rel=1e-5, abs=1e-5)
        assert t["probability"] == pytest.approx(float(probs[t["region"]]), abs=1e-5)
        assert t["box"] == pytest.approx(batch.info[i]["boxes"][t["region"]].tolist(), abs=0.006)


def test_pointing_candidate_matches_eval(registry_path, registry, task_model, tmp_path, capsys):
    cfg = registry["visual7w"]
    split = cfg.splits.val
    task, images = first_example(cfg, split)
    # the example's candidate boxes, by the Python API (the CLI offers every GT box)
    predictor = Predictor.from_pretrained(task_model, registry=registry_path, device="cpu")
    query = Query(task["text"], f"{cfg.features['regions']}#{images['']}", gt=f"{cfg.features['gt']}#{images['gt']}",
                  candidates=task["candidate_boxes"])
    result = predictor.predict("visual7w", query)

    entries = run_eval(registry_path, cfg, task_model, split, tmp_path / "eval")
    answer = {str(e["qa_id"]): e["answer"] for e in entries}[task["example_id"]]
    assert task["candidate_ids"][result.region] == answer
    family, out, batch, i = eval_outputs(cfg, task_model, split, task["example_id"])
    logits = family.candidate_logits(out, batch)[i, : len(task["candidate_ids"])]
    assert [t["logit"] for t in sorted(result.top, key=lambda t: t["candidate"])] == \
        pytest.approx(logits.tolist(), rel=1e-5, abs=1e-5)
    # the CLI: every GT box of the image is a candidate
    cli_result = predict_json(capsys, "--model", task_model, "--task", "visual7w", "--registry", registry_path,
                              "--features", f"{cfg.features['regions']}#{images['']}",
                              "--gt-features", f"{cfg.features['gt']}#{images['gt']}", "--text", task["text"])
    gt_boxes = next(x for x in iter_feature_samples(cfg.features["gt"]) if x.meta["image_id"] == images["gt"]).boxes
    top = cli_result["results"][0]["top"]
    assert len(top) == min(5, len(gt_boxes)) and all(t["box"] == pytest.approx(gt_boxes[t["candidate"]].tolist(),
                                                                                 abs=0.006) for t in top)


@pytest.mark.parametrize("zero_shot", [True, False])
def test_retrieval_scores_match_eval_ranking(registry_path, registry, task_model, pretrained_model, tmp_path, capsys,
                                             zero_shot):
    cfg = registry["retrieval_flickr30k"]
    split = cfg.splits.val
    model_dir = pretrained_model if zero_shot else task_model
    family = build_family(cfg, load_tokenizer())
    model = Predictor.from_pretrained(model_dir, device="cpu").model
    loader = EvalLoader(family, split, DataConfig(num_workers=0), rank=0, world_size=1, micro_batch_size=3)
    metric = family.evaluate_split(model, loader, "cpu", zero_shot=zero_shot)  # what `vilbert-ds eval` runs
    captions = {s["sent_id"]: s["caption"] for s in (json.loads(bytes(x.extra["task.json"]))
                                                    for x in iter_feature_samples(cfg.split_dir(split)))}
    image_ids = sorted(metric.columns)
    sents = [s for s, _ in metric.captions][:3]
    got = predict_json(capsys, "--model", model_dir, "--task", cfg.name, "--registry", registry_path, "--top-k", "2",
                       *[a for s in sents for a in ("--caption", captions[s])],
                       "--features", *[f"{cfg.features['regions']}#{i}" for i in image_ids])["ranking"]
    assert got["head"] == ("alignment" if zero_shot else "vil_logit") and got["image_ids"] == image_ids
    order = [s for s, _ in metric.captions]
    expected = torch.stack([metric.columns[i] for i in image_ids], 1)[[order.index(s) for s in sents]]
    assert np.asarray(got["scores"]) == pytest.approx(expected.numpy(), abs=1e-5)
    # one image against the captions (the whole split's feature set holds it)
    best = got["text_to_image"][0]["images"][0]["image_id"]
    one = predict_json(capsys, "--model", model_dir, "--task", cfg.name, "--registry", registry_path,
                       *[a for s in sents for a in ("--caption", captions[s])],
                       "--features", f"{cfg.features['regions']}#{best}")["ranking"]
    column = image_ids.index(best)
    assert [c["score"] for c in one["image_to_text"][0]["captions"]] == \
        pytest.approx(sorted(expected[:, column].tolist(), reverse=True), abs=1e-5)


def write_cc_lmdb(path, records) -> str:
    """The original CC LMDB layout (tensorpack LMDBSerializer: msgpack lists under %08d keys, `__keys__`)."""
    import lmdb

    from vilbert_ds.data.formats import msgpack_dumps

    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    keys = [f"{i:08}".encode() for i in range(len(records))]
    with env.begin(write=True) as txn:
        for key, r in zip(keys, records):
            txn.put(key, msgpack_dumps([r.features, np.zeros((r.num_boxes, 1601), np.float32), r.boxes,
                                        str(r.num_boxes), str(r.image_h), str(r.image_w), r.image_id, "a caption"]))
        txn.put(b"__keys__", msgpack_dumps(keys))
    env.close()
    return str(path)


def test_every_input_format_gives_the_shard_sample(registry, tmp_path):
    """A TSV row, an .npz, both LMDB layouts and the shard set give the regions the shard holds."""
    from vilbert_ds.predict import read_image

    feats = registry["vqa"].features["regions"]
    samples = list(iter_feature_samples(feats))[:3]
    records = [feature_record(registry, feats, s.meta["image_id"]) for s in samples]
    target = samples[1]
    image_id = target.meta["image_id"]
    specs = [f"{write_tsv(tmp_path / 'f.tsv', records)}#{image_id}",
             write_npz(tmp_path / f"{image_id}.npz", records[1]),
             f"{write_cc_lmdb(tmp_path / 'cc.lmdb', records)}#{image_id}", f"{tmp_path / 'cc.lmdb'}#00000001",
             f"{write_pickle_lmdb(tmp_path / 'p.lmdb', records)}#{image_id}",
             f"{feats}#{image_id}", f"{feats}#{target.key}"]
    for spec in specs:
        got = read_image(spec, trust_pickle=True)
        assert got.meta["image_id"] == image_id and (got.meta["image_w"], got.meta["image_h"]) == \
            (target.meta["image_w"], target.meta["image_h"]), spec
        assert np.array_equal(got.features, target.features) and np.array_equal(got.boxes, target.boxes), spec


# ------------------------------------------------------------------------------ API, embeddings
def test_batched_api_embeddings_and_devices(registry_path, registry, task_model, pretrained_model, tmp_path, capsys):
    cfg = registry["snli_ve"]
    predictor = Predictor.from_pretrained(task_model, registry=registry_path, device="cpu")
    images = [s.meta["image_id"] for s in iter_feature_samples(cfg.features["regions"])][:3]
    queries = [Query(f"there is a {c} dog", f"{cfg.features['regions']}#{i}") for i, c in zip(images, ("red", "blue",
                                                                                                    "green"))]
    batched = predictor.predict_many("snli_ve", queries, batch_size=2)
    single = [predictor.predict("snli_ve", q) for q in queries]
    for b, s in zip(batched, single):
        assert b.label == s.label and b.logits == pytest.approx(s.logits, rel=1e-5, abs=1e-5)

    emb = predictor.embed("snli_ve", queries, states=True, batch_size=2)
    assert emb.pooled_fused.shape == (3, predictor.model.config.bi_hidden_size)
    assert emb.text_states.shape[:2] == emb.text_mask.shape and emb.vision_states.shape[:2] == emb.vision_mask.shape
    assert emb.text_mask[0, 1] == 1  # the task token
    # the vectors of an eval example are those of the eval loader's batch
    task, ids = first_example(cfg, cfg.splits.val)
    emb = predictor.embed("snli_ve", [Query(task["text"], f"{cfg.features['regions']}#{ids['']}")])
    _, out, _, i = eval_outputs(cfg, task_model, cfg.splits.val, task["example_id"])
    assert emb.pooled_fused[0] == pytest.approx(out.pooled_output[i].numpy(), abs=1e-5)
    assert emb.pooled_text[0] == pytest.approx(out.pooled_output_t[i].numpy(), abs=1e-5)

    # CLI: a pretraining model has no task head: --embeddings still gives its vectors
    out_dir = tmp_path / "emb"
    got = predict_json(capsys, "--model", pretrained_model, "--task", "snli_ve", "--registry", registry_path,
                       "--features", f"{cfg.features['regions']}#{images[0]}", "--text", "a dog",
                       "--embeddings", out_dir)
    assert "no vil_tri_prediction head" in got["note"] and "results" not in got
    assert np.load(out_dir / "pooled_fused.npy").shape == (1, 40)
    assert json.loads((out_dir / "rows.json").read_text())[0]["image_id"] == images[0]
    if torch.cuda.is_available():  # the same on the GPU
        gpu = Predictor.from_pretrained(task_model, registry=registry_path, device="cuda")
        assert gpu.predict("snli_ve", queries[0]).logits == pytest.approx(single[0].logits, rel=1e-3, abs=1e-3)


# ------------------------------------------------------------------------------ refused inputs
def test_refused_inputs_are_one_line(registry_path, registry, task_model, pretrained_model, tmp_path, capsys):
    feats = registry["vqa"].features["regions"]
    image = next(iter_feature_samples(feats)).meta["image_id"]
    base = ["--registry", registry_path, "--text", "what is it?"]
    assert "has no vil_prediction head" in refused(capsys, "--model", pretrained_model, "--task", "vqa", *base,
                                                   "--features", f"{feats}#{image}")
    record = feature_record(registry, feats, image)
    narrow = FeatureRecord(image, record.image_w, record.image_h, record.boxes, record.features[:, :1024])
    err = refused(capsys, "--model", task_model, "--task", "vqa", *base, "--features", write_npz(tmp_path / "n.npz", narrow))
    assert "width 1024" in err and "2048" in err
    assert "compares two images" in refused(capsys, "--model", task_model, "--task", "nlvr2", *base,
                                            "--features", f"{feats}#{image}")
    assert "unknown task 'vqa3'" in refused(capsys, "--model", task_model, "--task", "vqa3", *base,
                                            "--features", f"{feats}#{image}")
    assert "not supported by predict" in refused(capsys, "--model", task_model, "--task", "vcr_q_a", *base,
                                                 "--features", f"{feats}#{image}")
    bare = save_model(tiny_model(), tmp_path / "no_label_map")
    err = refused(capsys, "--model", bare, "--task", "vqa", *base, "--features", f"{feats}#{image}")
    assert "carries no label map" in err and "--label-map" in err
    assert "pass --trust-pickle" in refused(capsys, "--model", task_model, "--task", "vqa", *base, "--features",
                                            f"{write_pickle_lmdb(tmp_path / 'p.lmdb', [record])}#{image}")
    assert "no sample with key or image id 'nope'" in refused(capsys, "--model", task_model, "--task", "vqa", *base,
                                                               "--features", f"{feats}#nope")
