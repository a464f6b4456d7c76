"""V-logit: referring expressions (RefCOCO, RefCOCO+ with the `unc` splits, RefCOCOg `umd`).

One example per referring sentence. The model scores every region with `vision_logit`
(Linear 1024 -> 1 per region, -10000 on padded regions); the target of a region is its IoU with
the referred box.
- Training split (the original): region rows are the detected boxes plus the image's GT boxes
  (slot "gt"; the GT set's own global entry does not exist in vilbert-ds shards, see
  `grounding.py`), rows = global + detected + GT truncated to `max_region_num` from the end;
  targets are IoUs zeroed below `options.iou_threshold` (0.5).
- Other splits: detected boxes only, targets are the raw IoUs. (Their shards still carry the GT
  boxes, a few KB per sample: the task shard builder joins every image slot of a family.)
Loss: BCEWithLogits(mean over [B, R]) x R (= the per-example sum; padded rows add 0), the
original's. Metric: accuracy = IoU(argmax region, referred box) > 0.5, over every row including
the global region (as the original).

Public format (the `refer` toolkit's files, in the task's `annotations` directory):
- `refs(unc).p` / `refs(umd).p`: a Python pickle of a list of refs
  `{ref_id, ann_id, image_id, split, sentences: [{sent_id, raw, sent, tokens}], sent_ids, category_id}`.
  **Pickles are parsed safely** (`released.load_plain_pickle`, the one restricted unpickler of
  the package): only plain lists, dicts, strings and numbers load, any class or function
  reference (the only way a pickle runs code) is refused, so no trust flag is needed; anything
  else is an error naming the file.
- `instances.json`: COCO-style `{images, annotations: [{id, image_id, bbox: [x, y, w, h]}], categories}`;
  the referred box is the annotation `ann_id` of the ref.
Both are read from the task's `annotations` directory, or, when the task has a `released`
directory, from the original's layout there (`refcoco/refs(unc).p`, `refcoco+/...`, `refcocog/...`).
Splits: refcoco/refcoco+ `train, val, testA, testB`; refcocog (umd) `train, val, test`.
Prediction file: `[{"sent_id", "ref_id", "image_id", "bbox": [x, y, w, h], "iou", "correct"}]`
(no public server exists for RefCOCO*; this is what the original's `eval_tasks.py` reports, with
the box instead of the region index).

IoU follows the original's +1-pixel convention (`grounding.iou_with`: widths, heights and the
intersection's sides + 1), for the training targets and the accuracy alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data import storage
from .base import TaskBatch, TaskExample, TaskFamily, collate_rows, join_path, pad_stack, read_json
from .grounding import GT_SLOT, iou_targets, region_rows, xywh_to_xyxy
from .released import load_plain_pickle

REFER_FORMATS = {"refcoco_unc": ("refcoco", "unc"), "refcoco+_unc": ("refcoco+", "unc"),
                 "refcocog_umd": ("refcocog", "umd"), "refcocog_google": ("refcocog", "google")}


# ------------------------------------------------------------------------------ batch
@dataclass
class ReferBatch(TaskBatch):
    target: torch.Tensor | None = None  # [B, R] float32 IoU per region (0 on padded regions)
    # per example: sent_id, ref_id, image_id, and as float32 numpy (kept out of the bf16/fp16 cast
    # that `Batch.to` applies to float tensors, for exact scoring): "iou" [R_i], "boxes" [R_i, 4]
    info: list[dict[str, Any]] = field(default_factory=list)


class ReferFamily(TaskFamily):
    family = "refer"
    formats = tuple(REFER_FORMATS)
    heads = ("vision_logit",)
    image_slots = {"": "regions", GT_SLOT: "gt"}
    batch_type = ReferBatch

    @dataclass
    class Options:
        train_gt_boxes: bool = True  # add the GT boxes as regions on the training split (the original)
        iou_threshold: float = 0.5  # training targets below this IoU are 0; accuracy needs IoU > this

        def __post_init__(self) -> None:
            if not 0.0 < self.iou_threshold < 1.0:
                raise ValueError(f"iou_threshold={self.iou_threshold} must be in (0, 1)")

    # ------------------------------------------------------------------ annotations
    @property
    def refs_file(self) -> str:
        return f"refs({REFER_FORMATS[self.config.format][1]}).p"

    @property
    def refer_root(self) -> str:
        """Where `refs(*).p` and `instances.json` are: with released files the original's layout
        `{released}/{refcoco|refcoco+|refcocog}/` when it holds them, else (as for every released
        file that is absent) the task's annotations directory."""
        if self.config.released:
            root = join_path(self.config.released, REFER_FORMATS[self.config.format][0])
            if storage.exists(join_path(root, self.refs_file)):
                return root
        return self.config.annotations

    def read_annotations(self, split: str) -> list[TaskExample]:
        root = self.refer_root
        refs_path = join_path(root, self.refs_file)
        inst_path = join_path(root, "instances.json")
        refs = load_plain_pickle(refs_path)
        if not isinstance(refs, list):
            raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
        anns = {int(a["id"]): a for a in read_json(inst_path)["annotations"]}
        known_splits = sorted({str(r.get("split")) for r in refs})
        train = split == self.config.splits.train
        out: list[TaskExample] = []
        for ref in refs:
            if str(ref.get("split")) != split:
                continue
            ann_id = int(ref["ann_id"])
            if ann_id not in anns:
                raise ValueError(f"{refs_path}: ref {ref.get('ref_id')} names annotation {ann_id}, absent from {inst_path}")
            ann = anns[ann_id]
            image = str(ref["image_id"])
            if str(ann["image_id"]) != image:
                raise ValueError(f"{refs_path}: ref {ref.get('ref_id')} is on image {image} but annotation {ann_id} "
                                 f"of {inst_path} is on image {ann['image_id']}")
            box = xywh_to_xyxy(ann["bbox"])
            # every split carries the GT boxes (the builder joins every slot of `image_slots`);
            # only training uses them as regions
            images = {"": image, GT_SLOT: image}
            for sent in ref["sentences"]:
                sent_id = int(sent["sent_id"])
                payload = {"sent_id": sent_id, "ref_id": int(ref["ref_id"]), "ann_id": ann_id, "image_id": image,
                           "text": sent["raw"], "ref_box": box, "train_targets": train}
                out.append(TaskExample(str(sent_id), dict(images), payload))
        if not out and split not in known_splits:
            raise ValueError(f"task {self.name!r}: {refs_path} has no split {split!r}; its splits: {known_splits}")
        return out

    # ------------------------------------------------------------------ workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        train = bool(task.get("train_targets")) and self.options.train_gt_boxes
        rows = region_rows(sample, self.config.max_region_num, with_gt=train)
        target = iou_targets(rows.boxes, task["ref_box"], self.options.iou_threshold if train else None)
        return {"key": sample["__key__"], "example_id": task.get("example_id", sample["__key__"]),
                "texts": [self.encode(task["text"])], "images": [(rows.feat, rows.loc)],
                "target": target,
                "info": {"sent_id": task["sent_id"], "ref_id": task["ref_id"], "image_id": task["image_id"],
                         "iou": target, "boxes": rows.boxes}}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> ReferBatch:
        fields = collate_rows(examples, self.config.id)
        regions = fields["image_feat"].size(1)
        target = torch.from_numpy(pad_stack([ex["target"] for ex in examples], regions))
        return ReferBatch(**fields, target=target, info=[dict(ex["info"]) for ex in examples], task=self.name)

    # ------------------------------------------------------------------ step
    @staticmethod
    def region_logits(output) -> torch.Tensor:
        """vision_logit [B, R, 1] -> [B, R] float32."""
        return output.vision_logit[..., 0].float()

    def loss(self, output, batch: ReferBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.region_logits(output)
        target = batch.target.to(logits.device)
        loss = self.bce_loss(logits, target, scale_by_labels=True)  # mean over [B, R] x R
        with torch.no_grad():
            picked = target.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
            score = (picked > self.options.iou_threshold).float().mean()
        return loss, {"score": score}

    def score(self, output, batch: ReferBatch) -> dict[str, dict[str, Any]]:
        idx = self.region_logits(output).argmax(dim=1).tolist()
        out = {}
        for key, i, info in zip(batch.keys, idx, batch.info):
            iou = float(info["iou"][i])  # a padded region cannot win: the model adds -10000 to it
            correct = iou > self.options.iou_threshold
            out[str(key)] = {"score": float(correct), "prediction": int(i), "iou": round(iou, 6),
                             "box": [round(float(c), 2) for c in info["boxes"][i]],
                             "sent_id": info["sent_id"], "ref_id": info["ref_id"], "image_id": info["image_id"]}
        return out

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        x1, y1, x2, y2 = record["box"]
        return {"sent_id": int(record["sent_id"]), "ref_id": int(record["ref_id"]), "image_id": record["image_id"],
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "iou": record["iou"],
                "correct": bool(record["score"])}
