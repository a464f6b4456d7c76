"""Retrieval (COCO, Flickr30k): Karpathy split reader, hard-negative pools, the 4-option collate,
the loss, the ranking metric against hand-computed cases, ranking evaluation (broadcast text ==
direct pairs, zero-shot with the alignment head, 2 ranks == 1 rank without duplicates), and an
end-to-end run on synthetic data in the public format."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from vilbert_ds.model import ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.model.model import ViLBertOutput
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.build import TaskBuildConfig, build_task
from vilbert_ds.tasks.loader import EvalLoader, build_task_loader, evaluate_task
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.retrieval import RankingMetric, image_to_text_ranks, tfidf_neighbours
from vilbert_ds.tasks.synthetic_scenes import SceneSpec, make_scene_tasks

DATA = DataConfig(num_workers=0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    reg = load_registry(make_scene_tasks(root, ["retrieval_coco", "retrieval_flickr30k"], SceneSpec(images=8)))
    build_task(reg, "retrieval_flickr30k", TaskBuildConfig(max_count=16))
    return reg


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def flickr(registry, tokenizer):
    return build_family(registry["retrieval_flickr30k"], tokenizer)


def tiny_model(seed: int = 0, **overrides) -> ViLBert:
    torch.manual_seed(seed)
    return ViLBert(tiny(**{"with_task_heads": True, "task_specific_tokens": True, **overrides})).eval()


# ------------------------------------------------------------------------------ reader, negatives
def test_karpathy_reader(registry):
    coco = build_family(registry["retrieval_coco"])
    data = json.load(open(f"{registry['retrieval_coco'].annotations}/dataset_coco.json"))
    train = coco.read_annotations("train")
    wanted = [img for img in data["images"] if img["split"] in ("train", "restval")]
    assert len(train) == sum(len(img["sentences"]) for img in wanted)  # restval joins train
    assert {e.payload["image_id"] for e in train} == {str(img["cocoid"]) for img in wanted}
    sent = wanted[0]["sentences"][0]
    ex = next(e for e in train if e.example_id == str(sent["sentid"]))
    assert ex.payload["caption"] == sent["raw"] and ex.images == {"": str(wanted[0]["cocoid"])}
    flickr = build_family(registry["retrieval_flickr30k"])
    val = flickr.read_annotations("val")
    assert all(e.images[""].isdigit() for e in val)  # "80012.jpg" -> "80012"
    limited = build_family(type(registry["retrieval_coco"])(**{**registry["retrieval_coco"].__dict__,
                                                              "options": {"eval_images": 2}}))
    assert len({e.payload["image_id"] for e in limited.read_annotations("test")}) == 2
    with pytest.raises(ValueError, match="no images of split 'dev'"):
        coco.read_annotations("dev")


def test_tfidf_pools_and_hard_captions(registry, tmp_path):
    pools = tfidf_neighbours({"a": "red dog on grass", "b": "a red dog running", "c": "blue car", "d": "a blue car street"}, 2)
    assert pools["a"][0] == "b" and pools["c"][0] == "d" and all(k not in v for k, v in pools.items())
    fam = build_family(registry["retrieval_flickr30k"])
    examples = fam.finalize_examples(fam.read_annotations("train"), "train")
    by_caption: dict[str, set] = {}
    for e in examples:
        by_caption.setdefault(e.payload["caption"], set()).add(e.payload["image_id"])
    for ex in examples:
        assert len(ex.payload["hard_captions"]) == 4 and ex.payload["hard_option"]
        assert all(by_caption[c] - {ex.payload["image_id"]} for c in ex.payload["hard_captions"])  # another image's
    again = fam.finalize_examples(fam.read_annotations("train"), "train")
    assert [e.payload["hard_captions"] for e in again] == [e.payload["hard_captions"] for e in examples]
    assert not fam.finalize_examples(fam.read_annotations("val"), "val")[0].payload["hard_option"]
    # a pool file (e.g. mined by a model) replaces TF-IDF
    images = sorted({e.payload["image_id"] for e in examples})
    pool_file = tmp_path / "pools.json"
    pool_file.write_text(json.dumps({img: [images[(i + 1) % len(images)]] for i, img in enumerate(images)}))
    cfg = registry["retrieval_flickr30k"]
    filed = build_family(type(cfg)(**{**cfg.__dict__, "options": {**cfg.options, "hard_negatives_file": str(pool_file)}}))
    for ex in filed.finalize_examples(filed.read_annotations("train"), "train"):
        nxt = images[(images.index(ex.payload["image_id"]) + 1) % len(images)]
        assert all(nxt in by_caption[c] for c in ex.payload["hard_captions"])


# ------------------------------------------------------------------------------ collate and loss
def _example(key: str, image: str, caption_id: int, hard_id: int, draws=(0.0, 0.0, 0.0), hard_option=True):
    feat = np.full((3, 2048), float(image), dtype=np.float16)
    return {"key": key, "image_id": image, "sent_id": key,
            "caption": (np.array([101, caption_id, 102]), np.zeros(3, dtype=np.int64)),
            "hard": (np.array([101, hard_id, 102]), np.zeros(3, dtype=np.int64)),
            "image": (feat, np.zeros((3, 5), dtype=np.float32)), "draws": np.array(draws), "hard_option": hard_option}


def test_collate_makes_the_four_options(flickr):
    examples = [_example("0", "1", 1000, 2000), _example("1", "2", 1001, 2001, draws=(0.9, 0.9, 0.9)),
                _example("2", "1", 1002, 2002)]
    batch = flickr.collate(examples)
    assert batch.input_ids.shape[0] == 12 and batch.row_offsets.tolist() == [0, 4, 8, 12]
    words = batch.input_ids[:, 1].view(3, 4).tolist()
    images = batch.image_feat[:, 0, 0].view(3, 4).tolist()
    # example 0 (image 1): true pair | caption of another image (ex 1) | own caption, image 2 | hard caption
    assert words[0] == [1000, 1001, 1000, 2000] and images[0] == [1.0, 1.0, 2.0, 1.0]
    # example 1 (image 2): partners are examples 0 and 2 (image 1); draws 0.9 pick the last
    assert words[1] == [1001, 1002, 1001, 2001] and images[1] == [2.0, 2.0, 1.0, 2.0]
    assert batch.label.tolist() == [0, 0, 0] and int(batch.fallback_negatives) == 0
    # outside training, option 4 is another random in-batch caption (the original)
    val = flickr.collate([_example("0", "1", 1000, 2000, hard_option=False), _example("1", "2", 1001, 2001)])
    assert val.input_ids[:, 1].view(2, 4).tolist()[0] == [1000, 1001, 1000, 1001]
    # one image only: no partner; options 2 and 3 fall back to hard-negative captions, counted
    alone = flickr.collate([_example("0", "1", 1000, 2000), _example("1", "1", 1001, 2001)])
    assert alone.input_ids[:, 1].view(2, 4).tolist()[0] == [1000, 2000, 2000, 2000]
    assert alone.image_feat[:, 0, 0].tolist() == [1.0] * 8 and int(alone.fallback_negatives) == 4


def test_loss_is_cross_entropy_over_the_four_options(flickr):
    batch = flickr.collate([_example("0", "1", 1000, 2000), _example("1", "2", 1001, 2001)])
    out = ViLBertOutput(None, None, None, None, None)
    out.vil_logit = torch.tensor([[2.0], [0.5], [-1.0], [0.0], [0.1], [0.3], [0.2], [-0.5]])
    loss, metrics = flickr.loss(out, batch)
    manual = np.mean([-2.0 + np.log(np.exp([2.0, 0.5, -1.0, 0.0]).sum()), -0.1 + np.log(np.exp([0.1, 0.3, 0.2, -0.5]).sum())])
    assert loss.item() == pytest.approx(manual, rel=1e-6)
    assert float(metrics["score"]) == 0.5
    records = flickr.score(out, batch)
    assert records["0"]["score"] == 1.0 and records["1"]["score"] == 0.0
    # a collapsed model (every option the same logit) is wrong, not right: the answer is always option 0
    out.vil_logit = torch.zeros(8, 1)
    loss, metrics = flickr.loss(out, batch)
    assert loss.item() == pytest.approx(np.log(4)) and float(metrics["score"]) == 0.0


# ------------------------------------------------------------------------------ ranking
def test_ranking_metric_hand_computed():
    # 4 captions (images A, A, B, C) x 3 images [A, B, C]
    metric = RankingMetric("t", [("0", "A"), ("1", "A"), ("2", "B"), ("3", "C")])
    scores = {"A": [0.9, 0.2, 0.1, 0.5], "B": [0.1, 0.8, 0.7, 0.5], "C": [0.3, 0.1, 0.9, 0.5]}
    metric.update({img: {"score": None, "scores": s} for img, s in scores.items()})
    s, images, gold = metric.matrix()
    assert images == ["A", "B", "C"] and gold.tolist() == [0, 0, 1, 2]
    # caption -> image ranks: c0: A best (1); c1: A=0.2 < B=0.8 -> 2 (C 0.1); c2: B 0.7 < C 0.9 -> 2;
    # c3: all 0.5, ties count against the gold image -> 3
    result = metric.result()
    assert result["t2i_R@1"] == pytest.approx(25.0) and result["t2i_median_rank"] == 2.0
    assert result["t2i_mean_rank"] == pytest.approx((1 + 2 + 2 + 3) / 4)
    # image -> caption: A: best gold c0 0.9 -> 1; B: gold c2 0.7 behind c1 0.8 -> 2; C: gold c3 0.5 behind c2 0.9 -> 2
    assert image_to_text_ranks(s, gold).tolist() == [1, 2, 2]
    assert result["i2t_R@1"] == pytest.approx(100 / 3) and result["i2t_R@5"] == 100.0
    assert result["score"] == pytest.approx(0.25) and result["images"] == 3.0
    assert result["rsum"] == pytest.approx(25 + 100 + 100 + 100 / 3 + 100 + 100)
    top = metric.rankings(top=2)
    assert top["text_to_image"][0] == {"sent_id": 0, "image_ids": ["A", "C"]}
    assert top["image_to_text"][1] == {"image_id": "B", "sent_ids": [1, 2]}


def test_ranking_scores_equal_direct_pair_forwards(flickr):
    """Text broadcast over an image chunk (fast mode) scores every pair as a direct forward does."""
    model = tiny_model()
    loader = EvalLoader(flickr, "val", DATA, rank=0, world_size=1, micro_batch_size=6)
    metric = flickr.evaluate_ranking(model, loader, image_chunk=4)
    scores, images, gold = metric.matrix()
    n_captions = len(flickr.read_annotations("val"))
    assert scores.shape == (n_captions, len(images)) and len(metric.captions) == n_captions
    batches = list(EvalLoader(flickr, "val", DATA, rank=0, world_size=1, micro_batch_size=64))
    b = batches[0].to("cpu", float_dtype=torch.float32)
    row_of_image = {}
    for i, img in enumerate(b.image_ids):
        row_of_image.setdefault(img, int(b.row_offsets[i]))
    with torch.no_grad():
        for c in (0, 5, n_captions - 1):
            sent, _ = metric.captions[c]
            row = int(b.row_offsets[b.sent_ids.index(sent)])
            for k in (0, len(images) - 1):
                r = row_of_image[images[k]]
                n_tok, n_reg = int(b.attention_mask[row].sum()), int(b.image_mask[r].sum())
                out = model(b.input_ids[row:row + 1, :n_tok], b.image_feat[r:r + 1, :n_reg], b.image_loc[r:r + 1, :n_reg],
                            b.token_type_ids[row:row + 1, :n_tok], b.attention_mask[row:row + 1, :n_tok],
                            b.image_mask[r:r + 1, :n_reg], torch.tensor([[flickr.config.id]]), heads=("vil_logit",))
                assert float(out.vil_logit) == pytest.approx(float(scores[c, k]), abs=1e-4)
    result = metric.result()
    for key in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10"):
        assert 0.0 <= result[key] <= 100.0
    assert 1.0 <= result["t2i_median_rank"] <= len(images)


def test_zero_shot_uses_the_alignment_head_of_a_pretraining_model(flickr):
    model = tiny_model(with_task_heads=False, task_specific_tokens=False)
    assert not hasattr(model, "vil_logit")
    loader = EvalLoader(flickr, "val", DATA, rank=0, world_size=1, micro_batch_size=8)
    metric = flickr.evaluate_split(model, loader, "cpu", zero_shot=True)
    scores, _, _ = metric.matrix()
    assert bool(((scores > 0) & (scores < 1)).all())  # softmax probabilities of "aligned"
    assert 0.0 <= metric.result()["i2t_R@5"] <= 100.0


def _rank_worker(rank: int, world: int, port: int, registry_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reg = load_registry(registry_path)
        fam = build_family(reg["retrieval_flickr30k"], load_tokenizer())
        loader = EvalLoader(fam, "val", DATA, rank=rank, world_size=world, micro_batch_size=4)
        metric = fam.evaluate_ranking(tiny_model(), loader)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"result": metric.result(), "images": sorted(metric.records), "captions": metric.captions}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_give_the_single_rank_ranking(flickr, registry, tmp_path):
    single = flickr.evaluate_ranking(tiny_model(), EvalLoader(flickr, "val", DATA, rank=0, world_size=1, micro_batch_size=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    registry_path = registry.path
    mp.start_processes(_rank_worker, args=(2, port, registry_path, str(out)), nprocs=2, join=True, start_method="spawn")
    got = json.loads(out.read_text())
    assert got["images"] == sorted(single.records) and [tuple(c) for c in got["captions"]] == single.captions
    for key, value in single.result().items():
        assert got["result"][key] == pytest.approx(value, abs=1e-4), key


# ------------------------------------------------------------------------------ end to end
def test_retrieval_end_to_end(registry, flickr, tmp_path):
    """Task shards -> training steps on 4-option batches -> 4-way val score and ranking eval."""
    loader = build_task_loader(flickr, "train", DATA, rank=0, world_size=1, micro_batch_size=6, seed=0)
    model = tiny_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            batch = batch.to("cpu", float_dtype=torch.float32)
            assert batch.input_ids.shape[0] == 4 * batch.num_examples
            loss, _ = flickr.loss(flickr.forward(model, batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    # 4 options at start: cross-entropy ln 4; learning the alignment takes more than these steps
    assert losses[0] == pytest.approx(np.log(4), abs=0.05) and np.isfinite(losses).all()
    model.eval()
    four_way = evaluate_task(model, flickr, EvalLoader(flickr, "val", DATA, rank=0, world_size=1, micro_batch_size=8), "cpu")
    assert 0.0 <= four_way.result()["score"] <= 1.0
    ranking = flickr.evaluate_split(model, EvalLoader(flickr, "test", DATA, rank=0, world_size=1, micro_batch_size=8), "cpu")
    result = ranking.result()
    assert result["captions"] == len(flickr.read_annotations("test")) and 0.0 <= result["t2i_R@5"] <= 100.0
    path = flickr.write_predictions(ranking, tmp_path / "retrieval.json")
    written = json.loads(path.read_text())
    assert len(written["text_to_image"]) == result["captions"] and len(written["image_to_text"]) == result["images"]
