"""`vilbert-ds predict`: ask a model about one image (or a few) and a question, caption or expression.

    vilbert-ds predict --model DIR --task vqa --features feats.tsv#17 --question "what is on the table?"
    vilbert-ds predict --model DIR --task nlvr2 --features left.npz right.npz --text "both images show dogs"
    vilbert-ds predict --model DIR --task refcoco --features shards/coco#139 --text "the man on the left"
    vilbert-ds predict --model DIR --task retrieval_coco --features shards/coco --caption "a red dog"  # rank images
    vilbert-ds predict --model DIR --task vqa --features f.npz --question "..." --embeddings out/ [--states]

Features: PATH or PATH#ID in any format the shard builder reads (TSV, .npz, LMDB, a shard set;
`vilbert_ds.predict.read_images`). Output: human-readable, or one JSON object with --json.
The work is `vilbert_ds.predict.Predictor` (the Python API); this module only parses and prints.
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_REFUSED = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory (config.json + model.safetensors), original checkpoint file, or run directory")
    parser.add_argument("--task", required=True, help="task name, title or id (tasks.yaml): vqa, snli_ve, nlvr2, refcoco, ...")
    parser.add_argument("--features", nargs="+", action="extend", default=[], metavar="PATH[#ID]",
                        help="region features of the image(s): TSV, .npz, LMDB or a shard set; #ID picks one image "
                             "(image id or sample key). NLVR2: left and right; retrieval: any number (a set = all its images)")
    parser.add_argument("--gt-features", default=None, metavar="PATH[#ID]",
                        help="pointing (visual7w, guesswhat_pointing): features of the ground-truth boxes to choose among "
                             "(a task shard sample carries them)")
    parser.add_argument("--text", "--question", "--caption", "--hypothesis", "--sentence", "--expression", dest="texts",
                        action="append", default=[], metavar="TEXT", help="the text (repeatable: one query per text)")
    parser.add_argument("--captions", default=None, metavar="FILE", help="more texts, one per line (retrieval captions)")
    parser.add_argument("--format", default=None, choices=("tsv", "npz", "cc-lmdb", "lmdb-pickle", "shards"),
                        help="input format of --features (default: from the path)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickled LMDB values (unpickling can run code)")
    parser.add_argument("--registry", default=None, help="tasks.yaml the model was trained with (default: the packaged one)")
    parser.add_argument("--data-root", default=None, help="replaces {data_root} in tasks.yaml paths")
    parser.add_argument("--vocab", default="", help="vocab.txt / tokenizer directory (default: the local uncased vocab)")
    parser.add_argument("--config", default="base_6layer_6conect", help="config of an original checkpoint file")
    parser.add_argument("--label-map", default=None, metavar="FILE",
                        help="answer tasks: a label_maps.json or the assets.json of the task shards the model was trained "
                             "on (default: the model's label_maps.json)")
    parser.add_argument("--top-k", type=int, default=5, help="answers / regions / ranked items shown")
    parser.add_argument("--zero-shot", action="store_true",
                        help="retrieval: score with the pretraining alignment head (default when the model has no task heads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--embeddings", default=None, metavar="DIR",
                        help="also save the pooled text / vision / fused vectors as .npy (+ rows.json)")
    parser.add_argument("--states", action="store_true", help="with --embeddings: per-token and per-region states too")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights and activations dtype on the device")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward")


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.captions:
        with open(args.captions, encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    return texts


def _queries(predictor, cfg, args, texts):
    from ..predict import PredictError, Query

    if not args.features:
        raise PredictError(f"task {cfg.name}: give the image's region features (--features PATH[#ID])")
    if cfg.family == "vl_binary":
        if len(args.features) > 2:
            raise PredictError(f"task {cfg.name} compares two images: --features LEFT RIGHT, not {len(args.features)}")
        images = [predictor.image(spec, fmt=args.format, trust_pickle=args.trust_pickle) for spec in args.features]
        return [Query(t, images[0], image2=images[1] if len(images) == 2 else None) for t in texts]
    if len(args.features) > 1 and cfg.family == "pointing":
        raise PredictError(f"task {cfg.name} points within one image; give one --features (and --gt-features)")
    gt = predictor.image(args.gt_features, slot="gt", fmt=args.format, trust_pickle=args.trust_pickle) \
        if args.gt_features else None
    images = [predictor.image(spec, fmt=args.format, trust_pickle=args.trust_pickle) for spec in args.features]
    return [Query(t, image, gt=gt) for image in images for t in texts]


def _print_result(r, top_k: int) -> None:
    from ..predict import AnswerResult, BoxResult, ClassResult

    if isinstance(r, AnswerResult):
        print(f'{r.task}: "{r.text}" on image {r.image_id}')
        for a in r.answers:
            print(f"  {a['probability']:6.3f}  {a['answer']}")
    elif isinstance(r, ClassResult):
        probs = ", ".join(f"{k} {v:.3f}" for k, v in r.probabilities.items())
        print(f'{r.task}: "{r.text}" on image {" + ".join(r.image_ids)}')
        print(f"  {r.label}  ({probs})")
    elif isinstance(r, BoxResult):
        kind = "candidate" if r.top and "candidate" in r.top[0] else "region"
        print(f'{r.task}: "{r.text}" on image {r.image_id}')
        print(f"  box {' '.join(f'{c:g}' for c in r.box)}  ({kind} {r.region}, p={r.probability:.3f})")
        for t in r.top[:top_k]:
            print(f"    {kind} {t[kind]:3d}  [{' '.join(f'{c:g}' for c in t['box'])}]  p={t['probability']:.3f}")


def _print_ranking(r, top_k: int) -> None:
    head = ("zero-shot: pretraining alignment head, P(aligned)" if r.head == "alignment"
            else "retrieval head vil_logit")
    print(f"{r.task} ({head}): {len(r.captions)} caption(s) x {len(r.image_ids)} image(s)")
    if len(r.captions) <= len(r.image_ids):
        for c, caption in enumerate(r.captions):
            print(f'"{caption}": best images')
            for j, score in r.images_for(c, top_k):
                stored = f'  (its caption: "{r.image_captions[j]}")' if r.image_captions[j] else ""
                print(f"  {score:8.4f}  image {r.image_ids[j]}{stored}")
    else:
        for i, image in enumerate(r.image_ids):
            print(f"image {image}: best captions")
            for caption, score in r.captions_for(i, top_k):
                print(f'  {score:8.4f}  "{caption}"')


def run(args: argparse.Namespace) -> int:
    import torch

    from ..predict import PredictError, Predictor, read_images

    predictor = Predictor.from_pretrained(args.model, config=args.config, registry=args.registry,
                                          data_root=args.data_root, vocab=args.vocab, device=args.device,
                                          dtype=getattr(torch, args.dtype), label_map=args.label_map)
    cfg = predictor.task(args.task)
    texts = _texts(args)
    if not texts:
        raise PredictError(f"task {cfg.name}: give the text (--question / --text / --caption, or --captions FILE)")
    out: dict = {"task": cfg.name, "model": args.model}
    if cfg.family == "retrieval":
        if args.embeddings:
            raise PredictError("--embeddings: not for retrieval tasks (pairs are scored in image chunks); embed with a "
                               "per-example task, e.g. --task vqa")
        if not args.features:
            raise PredictError(f"task {cfg.name}: give the images (--features: files, PATH#ID or whole shard sets)")
        images = [s for spec in args.features
                  for s in read_images(spec, feature_dim=predictor.feature_dim, fmt=args.format,
                                       trust_pickle=args.trust_pickle)]
        ranking = predictor.retrieve(cfg.name, texts, images, zero_shot=True if args.zero_shot else None,
                                     batch_size=args.batch_size)
        out["ranking"] = ranking.to_dict(args.top_k)
        print(json.dumps(out)) if args.json else _print_ranking(ranking, args.top_k)
        return 0
    queries = _queries(predictor, cfg, args, texts)
    missing = predictor.missing_heads(cfg.name)
    if missing and args.embeddings:
        out["note"] = f"the model has no {', '.join(missing)} head: embeddings only"
        print(f"vilbert-ds predict: {out['note']}", file=sys.stderr)
    else:
        results = predictor.predict_many(cfg.name, queries, top_k=args.top_k, batch_size=args.batch_size)
        out["results"] = [r.to_dict() for r in results]
        if results and hasattr(results[0], "label_map"):
            out["label_map"] = results[0].label_map
        if not args.json:
            for r in results:
                _print_result(r, args.top_k)
            if "label_map" in out:
                print(f"answers named by {out['label_map']}")
    if args.embeddings:
        paths = predictor.embed(cfg.name, queries, states=args.states, batch_size=args.batch_size).save(args.embeddings)
        out["embeddings"] = [str(p) for p in paths]
        if not args.json:
            print(f"embeddings ({len(queries)} queries) -> {', '.join(p.name for p in paths)} in {args.embeddings}")
    if args.json:
        print(json.dumps(out))
    return 0


def main(args: argparse.Namespace) -> int:
    from ..data.formats import InputError
    from ..predict import PredictError

    try:
        return run(args)
    except (PredictError, InputError, KeyError, ValueError, FileNotFoundError, NotImplementedError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vilbert-ds predict: {message}", file=sys.stderr)
        return EXIT_REFUSED
