"""Retrieval (COCO, Flickr30k): Karpathy split reader, hard-negative pools (TF-IDF, pool file, the
original's released hard_negative*.pkl), the split's negatives index and negatives drawn from the
whole split, the loss, the ranking metric against hand-computed cases (full and paper protocol),
ranking evaluation (broadcast text == direct pairs, zero-shot with the alignment head, 2 ranks ==
1 rank without duplicates, the paper protocol's 1k set), and an end-to-end run on synthetic data
in the public format."""
from __future__ import annotations

import json
import os
import pickle
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
from vilbert_ds.data.manifest import load_source
from vilbert_ds.tasks.metrics import rank_of_gold
from vilbert_ds.tasks.retrieval import RankingMetric, SplitNegatives, image_to_text_ranks, paper_summary, tfidf_neighbours
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


def test_tfidf_pools_and_the_negatives_index(registry, flickr):
    pools = tfidf_neighbours({"a": "red dog on grass", "b": "a red dog running", "c": "blue car", "d": "a blue car street"}, 2)
    assert pools["a"][0] == "b" and pools["c"][0] == "d" and all(k not in v for k, v in pools.items())
    cfg = registry["retrieval_flickr30k"]
    neg = SplitNegatives.load(cfg.split_dir("train"))
    manifest = load_source(f"{cfg.split_dir('train')}/manifest.json")
    keys = [k for shard in manifest.shards for k in json.load(open(f"{cfg.split_dir('train')}/{shard.name[:-4]}.stats.json"))["keys"]]
    examples = {e.key: e for e in flickr.read_annotations("train")}
    assert sorted(neg.images.tolist()) == sorted({e.payload["image_id"] for e in examples.values()})
    for i, image in enumerate(neg.images.tolist()):  # every caption of the image, and where its sample is
        own = range(int(neg.image_captions[i]), int(neg.image_captions[i + 1]))
        assert sorted(neg.caption(c) for c in own) == sorted(e.payload["caption"] for e in examples.values()
                                                            if e.payload["image_id"] == image)
        for c in own:
            ex = examples[keys[int(neg.caption_sample[c])]]
            assert ex.payload["image_id"] == image and ex.payload["caption"] == neg.caption(c)
        pool = [int(j) for j in neg.hard_pool[i] if j >= 0]
        assert pool and i not in pool and len(pool) <= cfg.options["hard_negative_pool"]
    assert SplitNegatives.load(cfg.split_dir("val")).hard_pool.shape[1] == 0  # hard negatives: training only


def test_released_hard_negative_pool_replaces_tfidf(registry, tmp_path, caplog):
    """The original's hard_negative_cleaned.pkl (numpy float pool of indices, itself first) is read
    safely and gives the pools; an image it lacks falls back to TF-IDF, said in the log."""
    cfg = registry["retrieval_flickr30k"]
    fam = build_family(cfg)
    examples = fam.finalize_examples(fam.read_annotations("train"), "train")
    images = sorted({e.payload["image_id"] for e in examples})
    listed = images[:-1]  # the last image is not in the released file
    pool = np.array([[i, (i + 1) % len(listed), (i + 2) % len(listed)] for i in range(len(listed))], dtype=np.float64)
    released = tmp_path / "datasets" / "flickr30k"
    released.mkdir(parents=True)
    with open(released / "hard_negative_cleaned.pkl", "wb") as f:
        pickle.dump({"train_hard_pool": pool, "train_image_list": [int(i) for i in listed]}, f)
    fam = build_family(type(cfg)(**{**cfg.__dict__, "released": str(released)}))
    with caplog.at_level("INFO"):
        pools = fam.hard_negative_pools(examples)
    assert "hard_negative_cleaned.pkl (%d images; 1 not in it get a TF-IDF pool)" % len(images) in caplog.text
    for i, image in enumerate(listed):
        assert pools[image] == [listed[(i + 1) % len(listed)], listed[(i + 2) % len(listed)]]
    assert pools[images[-1]] and images[-1] not in pools[images[-1]]
    fam.clean_train_sets = False  # the original reads hard_negative.pkl then: absent here -> TF-IDF
    assert fam.hard_negative_source() == ""
    # a pool file (e.g. mined by a model) replaces TF-IDF too
    pool_file = tmp_path / "pools.json"
    pool_file.write_text(json.dumps({img: [images[(i + 1) % len(images)]] for i, img in enumerate(images)}))
    filed = build_family(type(cfg)(**{**cfg.__dict__, "options": {**cfg.options, "hard_negatives_file": str(pool_file)}}))
    assert filed.hard_negative_pools(examples) == {img: [images[(i + 1) % len(images)]] for i, img in enumerate(images)}


def _identify(flickr, split: str):
    """Maps token ids -> image of the caption, and global-region feature -> image, over a split."""
    by_text, by_feature = {}, {}
    for batch in EvalLoader(flickr, split, DATA, rank=0, world_size=1, micro_batch_size=64):
        for i, row in enumerate(batch.row_offsets[:-1].tolist()):
            n = int(batch.attention_mask[row].sum())
            by_text[tuple(batch.input_ids[row, :n].tolist())] = batch.image_ids[i]
            by_feature[batch.image_feat[row, 0, :8].float().numpy().tobytes()] = batch.image_ids[i]
    return by_text, by_feature


def test_negatives_are_drawn_from_the_whole_split(flickr, registry):
    """Options 2 and 3 come from every other image of the split (not the micro-batch), option 4
    from the image's hard pool; the same generator draws the same negatives (exact resume)."""
    by_text, by_feature = _identify(flickr, "train")
    neg = flickr.negatives("train")
    sample = next(iter(_samples(registry, "train")))
    own = json.loads(bytes(sample["task.json"]))["image_id"]
    pool = {neg.images[j] for j in neg.hard_pool[neg.image_of(own)] if j >= 0}
    seen2, seen3, seen4 = set(), set(), set()
    for seed in range(120):
        ex = flickr.preprocess(sample, np.random.default_rng(seed))
        assert by_text[tuple(ex["texts"][0][0].tolist())] == own and ex["texts"][2][0].tolist() == ex["texts"][0][0].tolist()
        seen2.add(by_text[tuple(ex["texts"][1][0].tolist())])
        seen3.add(by_feature[ex["images"][2][0][0, :8].astype(np.float32).tobytes()])
        seen4.add(by_text[tuple(ex["texts"][3][0].tolist())])
    others = set(neg.images.tolist()) - {own}
    assert seen2 == others and seen3 == others  # every other image of the split, never the own one
    assert seen4 <= pool and seen4
    again = flickr.preprocess(sample, np.random.default_rng(7))
    first = flickr.preprocess(sample, np.random.default_rng(7))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again["texts"], first["texts"]))
    counts = np.bincount([neg.other_image(np.random.default_rng(k), 0) for k in range(4000)], minlength=len(neg.images))
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].mean()  # uniform over the other images


def _samples(registry, split: str):
    from vilbert_ds.data.sample import Sample
    from vilbert_ds.tasks.loader import sample_dict

    cfg = registry["retrieval_flickr30k"]
    fam = build_family(cfg)
    neg = fam.negatives(split)
    for position in range(3):
        got = neg.sample_at(position)
        assert isinstance(got, Sample)
        yield sample_dict(got)


def test_collate_makes_the_four_options(flickr):
    examples = [{"key": str(k), "image_id": str(k), "sent_id": str(k),
                 "texts": [(np.array([101, 1000 + k + 10 * o, 102]), np.zeros(3, dtype=np.int64)) for o in range(4)],
                 "images": [(np.full((3, 2048), float(k + o), dtype=np.float16), np.zeros((3, 5), dtype=np.float32))
                            for o in range(4)]} for k in range(2)]
    batch = flickr.collate(examples)
    assert batch.input_ids.shape[0] == 8 and batch.row_offsets.tolist() == [0, 4, 8]
    assert batch.input_ids[:, 1].view(2, 4).tolist() == [[1000, 1010, 1020, 1030], [1001, 1011, 1021, 1031]]
    assert batch.image_feat[:, 0, 0].view(2, 4).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
    assert batch.label.tolist() == [0, 0] and batch.image_ids == ["0", "1"]


def _four_option_batch(flickr):
    examples = [{"key": str(k), "image_id": str(k), "sent_id": str(k),
                 "texts": [(np.array([101, 1000 + o, 102]), np.zeros(3, dtype=np.int64)) for o in range(4)],
                 "images": [(np.zeros((3, 2048), dtype=np.float16), np.zeros((3, 5), dtype=np.float32))] * 4}
                for k in range(2)]
    return flickr.collate(examples)


def test_loss_is_cross_entropy_over_the_four_options(flickr):
    batch = _four_option_batch(flickr)
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


# ------------------------------------------------------------------------------ the paper's protocol
def test_paper_summary_hand_computed():
    # 1-based ranks; the original: R@K over 0-based ranks < K, medr = floor(median(rank0) + 1),
    # meanr = mean(rank0) + 1 (numpy's median averages the two middle ranks: 3.5 -> 3)
    out = paper_summary(torch.tensor([1, 3, 4, 12]), num_images=20)
    assert out["t2i_R@1"] == 25.0 and out["t2i_R@5"] == 75.0 and out["t2i_R@10"] == 75.0
    assert out["t2i_median_rank"] == 3.0 and out["t2i_mean_rank"] == 5.0
    assert out["score"] == 0.25 and out["captions"] == 4.0 and out["images"] == 20.0
    assert not any(k.startswith("i2t") for k in out)


def test_paper_protocol_ranks_the_1k_set_text_to_image(flickr, registry, tmp_path):
    """--protocol paper: caption->image over the stored 1k set (here all test images, the first 5
    captions each), the same ranks as the full ranking restricted to it; with the original's
    released test-set file, its images and caption counts."""
    model = tiny_model()
    loader = EvalLoader(flickr, "test", DATA, rank=0, world_size=1, micro_batch_size=8)
    paper = flickr.paper_set()
    test = flickr.read_annotations("test")
    assert paper["split"] == "test" and paper["images"] == list(dict.fromkeys(e.payload["image_id"] for e in test))
    full = flickr.evaluate_split(model, loader, "cpu")
    got = flickr.evaluate_split(model, loader, "cpu", protocol="paper")
    result = got.result()
    assert set(result) == {"t2i_R@1", "t2i_R@5", "t2i_R@10", "t2i_median_rank", "t2i_mean_rank", "score", "captions",
                           "count", "images"}
    scores, _, gold = full.matrix()
    ranks = rank_of_gold(scores, gold).double()
    assert result["captions"] == len(test) == 5 * len(paper["images"])
    assert result["t2i_R@5"] == pytest.approx(float((ranks <= 5).double().mean() * 100))
    assert result["t2i_mean_rank"] == pytest.approx(float(ranks.mean()))
    written = json.loads(flickr.write_predictions(got, tmp_path / "paper.json").read_text())
    assert set(written) == {"text_to_image"}
    # the original's released 1k set file: its images, its caption counts
    released = tmp_path / "datasets" / "flickr30k"
    released.mkdir(parents=True)
    chosen = [paper["images"][0], paper["images"][2]]
    lines = [{"img_path": f"{chosen[0]}.jpg", "sentences": ["a", "b", "c"]}, {"img_path": f"{chosen[1]}.jpg", "sentences": ["d", "e"]}]
    (released / "all_data_final_test_set0_2014.jsonline").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reg = load_registry(registry.path, released_root=tmp_path / "datasets",
                        overrides={"retrieval_flickr30k": {"shards": str(tmp_path / "shards")}})
    build_task(reg, "retrieval_flickr30k", TaskBuildConfig(splits=["test"]))
    fam = build_family(reg["retrieval_flickr30k"], flickr.tokenizer)
    assert fam.paper_set()["images"] == chosen and fam.paper_set()["captions_per_image"] == [3, 2]
    rel = fam.evaluate_split(model, EvalLoader(fam, "test", DATA, rank=0, world_size=1, micro_batch_size=8), "cpu",
                             protocol="paper")
    first = {img: sorted((e.example_id for e in test if e.payload["image_id"] == img), key=int) for img in chosen}
    assert [s for s, _ in rel.captions] == first[chosen[0]][:3] + first[chosen[1]][:2]
    assert rel.result()["images"] == 2.0 and "all_data_final_test_set0_2014.jsonline" in rel.note
    assert got.note.startswith("paper protocol: caption->image, 20 captions x 4 images of the test set (derived")
    # a paper set the shards do not cover is an error naming it
    lines.append({"img_path": "99999.jpg", "sentences": ["x"]})
    (released / "all_data_final_test_set0_2014.jsonline").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    build_task(reg, "retrieval_flickr30k", TaskBuildConfig(splits=["test"]))
    fam = build_family(reg["retrieval_flickr30k"], flickr.tokenizer)
    with pytest.raises(ValueError, match=r"lack 1 of the paper protocol's 3 images \(e.g. \['99999'\]\)"):
        fam.evaluate_split(model, EvalLoader(fam, "test", DATA, rank=0, world_size=1, micro_batch_size=8), "cpu",
                           protocol="paper")


def test_eval_command_with_the_paper_protocol(registry, tmp_path, capsys):
    from vilbert_ds.cli import main as cli
    from vilbert_ds.weights import save_model

    save_model(tiny_model(), tmp_path / "model")
    code = cli(["eval", "--task", "retrieval_flickr30k", "--ckpt", str(tmp_path / "model"), "--split", "test",
                "--protocol", "paper", "--registry", registry.path, "--out", str(tmp_path / "eval"), "--workers", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "retrieval_flickr30k_test_metrics.json").read_text())
    assert metrics["protocol"].startswith("paper protocol: caption->image") and "t2i_R@10" in metrics
    assert not any(k.startswith("i2t") for k in metrics) and "protocol: paper protocol" in out
