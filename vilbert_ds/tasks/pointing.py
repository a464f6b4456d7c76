"""V-logit-mc: pointing at one of several candidate ground-truth boxes (Visual7W pointing,
GuessWhat pointing).

Region rows = global + detected boxes + the image's GT boxes (slot "gt"); the candidates of an
example are GT boxes, so GT rows are always kept and detected rows give way when both do not fit
(the original truncates the GT tail instead, which with its sizes never cuts a candidate).
`vision_logit[:, num_detected:]` is gathered at the candidates' rows: the original's
`vision_logit[:, 101:].gather(1, multiple_choice_ids)`, with the row found per example instead of
a hard-coded 101 (images with fewer than 100 detections shift the GT rows). Candidate GT rows are
found by matching the annotated candidate boxes against the GT feature set's boxes, so the GT
set may store its boxes in any order.

Targets: IoU of each candidate with the answer box in the original's +1-pixel convention
(`grounding.iou_with`), zeroed below 0.5 (the answer itself has 1).
Loss: BCEWithLogits(mean over [B, C]) x C (= per-example sum; padded candidates add 0), the
original's. Metric: accuracy = argmax over candidates == argmax of the target.

Public formats (in the task's `annotations` directory):
- `visual7w`: `dataset_v7w_pointing.json` = `{"images": [{image_id, split, filename, qa_pairs:
  [{qa_id, question, answer: box_id, multiple_choices: [3 box_ids], type}]}], "boxes": [{box_id,
  x, y, width, height, name}]}`. Candidates = sorted(multiple_choices + [answer]) (4), text = the
  question. Image ids are the Visual7W (Visual Genome) ids; the feature sets name image N "v7w_N",
  as the released LMDBs do. Predictions: `[{"qa_id", "answer": box_id}]`.
- `guesswhat`: `guesswhat.{train,valid,test}.jsonl[.gz]`, one game per line: `image.id`,
  `objects` [{id, bbox: [x, y, w, h], category}], `object_id` (the target), `qas` [{question,
  answer}]. One example per game: candidates = the game's objects sorted by id (up to 20 in the
  data; padded per batch), text = the dialogue as the original writes it,
  "start <question> answer <answer> stop ..." Predictions: `[{"game_id", "object_id"}]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import TaskBatch, TaskExample, TaskFamily, collate_rows, first_existing, join_path, pad_stack, read_json, read_jsonl
from .grounding import GT_SLOT, iou_targets, match_boxes, region_rows, xywh_to_xyxy
from .metrics import argmax_accuracy

MASK_LOGIT = -10000.0  # what the model adds to padded regions; used for padded candidates too
# the released Visual7W feature LMDBs (detected and GT) name image N "v7w_N" (the original reads
# them with that key, and convert_to_lmdb.py keys each record by its image_id)
V7W_FEATURE_ID = "v7w_{}"


@dataclass
class PointingBatch(TaskBatch):
    candidate_rows: torch.Tensor | None = None  # [B, C] int64 region row of each candidate (0 where padded)
    candidate_mask: torch.Tensor | None = None  # [B, C] bool, True = real candidate
    target: torch.Tensor | None = None  # [B, C] float32 IoU with the answer box, 0 below 0.5
    gold: torch.Tensor | None = None  # [B] int64 argmax of the target (from float32: no bf16 ties)
    candidate_ids: list[list[Any]] = field(default_factory=list)  # per example: box / object ids of the candidates


class PointingFamily(TaskFamily):
    family = "pointing"
    formats = ("visual7w", "guesswhat")
    heads = ("vision_logit",)
    image_slots = {"": "regions", GT_SLOT: "gt"}
    batch_type = PointingBatch

    @dataclass
    class Options:
        iou_threshold: float = 0.5  # candidate targets below this IoU with the answer box are 0

        def __post_init__(self) -> None:
            if not 0.0 < self.iou_threshold <= 1.0:
                raise ValueError(f"iou_threshold={self.iou_threshold} must be in (0, 1]")

    # ------------------------------------------------------------------ annotations
    def read_annotations(self, split: str) -> list[TaskExample]:
        return self._read_visual7w(split) if self.config.format == "visual7w" else self._read_guesswhat(split)

    def _read_visual7w(self, split: str) -> list[TaskExample]:
        path = join_path(self.config.annotations, "dataset_v7w_pointing.json")
        data = read_json(path)
        boxes = {int(b["box_id"]): [float(b["x"]), float(b["y"]), float(b["x"]) + float(b["width"]),
                                    float(b["y"]) + float(b["height"])] for b in data["boxes"]}
        out = []
        for img in data["images"]:
            if str(img["split"]) != split:
                continue
            image = str(img["image_id"])
            for qa in img["qa_pairs"]:
                candidates = sorted({int(b) for b in qa["multiple_choices"]} | {int(qa["answer"])})
                missing = [b for b in candidates if b not in boxes]
                if missing:
                    raise ValueError(f"{path}: qa {qa['qa_id']} names box ids {missing} absent from 'boxes'")
                payload = {"qa_id": int(qa["qa_id"]), "image_id": image, "text": qa["question"],
                           "candidate_ids": candidates, "candidate_boxes": [boxes[b] for b in candidates],
                           "answer_id": int(qa["answer"]), "ref_box": boxes[int(qa["answer"])]}
                feature_id = V7W_FEATURE_ID.format(image)
                out.append(TaskExample(str(qa["qa_id"]), {"": feature_id, GT_SLOT: feature_id}, payload))
        return out

    def _read_guesswhat(self, split: str) -> list[TaskExample]:
        path = first_existing(self.config.annotations, [f"guesswhat.{split}.jsonl", f"guesswhat.{split}.jsonl.gz"])
        out = []
        for game in read_jsonl(path):
            image = str(game["image"]["id"])
            objects = sorted(game["objects"], key=lambda o: int(o["id"]))
            by_id = {int(o["id"]): xywh_to_xyxy(o["bbox"]) for o in objects}
            target = int(game["object_id"])
            if target not in by_id:
                raise ValueError(f"{path}: game {game.get('id')}: object_id {target} is not among its objects")
            dialogue = " ".join(f"start {qa['question']} answer {qa.get('answer', '')} stop" for qa in game["qas"])
            payload = {"game_id": int(game["id"]), "image_id": image, "text": dialogue,
                       "candidate_ids": [int(o["id"]) for o in objects],
                       "candidate_boxes": [by_id[int(o["id"])] for o in objects],
                       "answer_id": target, "ref_box": by_id[target]}
            out.append(TaskExample(str(game["id"]), {"": image, GT_SLOT: image}, payload))
        return out

    # ------------------------------------------------------------------ workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        rows = region_rows(sample, self.config.max_region_num, with_gt=True, gt_priority=True)
        cand_boxes = np.asarray(task["candidate_boxes"], dtype=np.float32).reshape(-1, 4)
        where = f"task {self.name!r} sample {sample.get('__key__', '?')!r} (image {task.get('image_id')})"
        gt_index = match_boxes(cand_boxes, rows.boxes[rows.num_detected:], where)
        target = iou_targets(cand_boxes, task["ref_box"], self.options.iou_threshold)
        return {"key": sample["__key__"], "example_id": task.get("example_id", sample["__key__"]),
                "texts": [self.encode(task["text"])], "images": [(rows.feat, rows.loc)],
                "candidate_rows": rows.num_detected + gt_index, "target": target,
                "candidate_ids": list(task["candidate_ids"])}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> PointingBatch:
        fields = collate_rows(examples, self.config.id)
        rows = pad_stack([np.asarray(ex["candidate_rows"], dtype=np.int64) for ex in examples])
        mask = pad_stack([np.ones(len(ex["candidate_rows"]), dtype=bool) for ex in examples], rows.shape[1], False)
        target = pad_stack([np.asarray(ex["target"], dtype=np.float32) for ex in examples], rows.shape[1])
        return PointingBatch(**fields, candidate_rows=torch.from_numpy(rows), candidate_mask=torch.from_numpy(mask),
                             target=torch.from_numpy(target), gold=torch.from_numpy(target.argmax(axis=1)),
                             candidate_ids=[list(ex["candidate_ids"]) for ex in examples],
                             task=self.name)

    # ------------------------------------------------------------------ step
    @staticmethod
    def candidate_logits(output, batch: PointingBatch) -> torch.Tensor:
        """vision_logit [B, R, 1] gathered at the candidate rows -> [B, C] float32, padded -10000."""
        logits = output.vision_logit[..., 0].float()
        rows = batch.candidate_rows.to(logits.device)
        picked = logits.gather(1, rows)
        return picked.masked_fill(~batch.candidate_mask.to(logits.device), MASK_LOGIT)

    def loss(self, output, batch: PointingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.candidate_logits(output, batch)
        target = batch.target.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="mean") * target.size(1)
        with torch.no_grad():
            score = argmax_accuracy(logits, batch.gold.to(logits.device)).mean()
        return loss, {"score": score}

    def score(self, output, batch: PointingBatch) -> dict[str, dict[str, Any]]:
        logits = self.candidate_logits(output, batch).cpu()
        pred = logits.argmax(dim=1)
        gold = batch.gold
        out = {}
        for key, p, g, ids in zip(batch.keys, pred.tolist(), gold.tolist(), batch.candidate_ids):
            out[str(key)] = {"score": float(p == g), "prediction": ids[p], "gold": ids[g]}
        return out

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.config.format == "visual7w":
            return {"qa_id": int(example_id), "answer": record["prediction"]}
        return {"game_id": int(example_id), "object_id": record["prediction"]}
