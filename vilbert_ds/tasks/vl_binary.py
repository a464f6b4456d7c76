"""VL-binary-classifier: a sentence true or false of an image pair (NLVR2).

Each example has one sentence and two images. Collate makes two model rows per example, the
sentence repeated: rows 2i (left image) and 2i+1 (right image); the head `vil_binary_prediction`
concatenates the fused vectors of those two rows ([2B, C] -> [B, 2C] -> [B, 2]). Loss:
BCEWithLogits(mean) on the one-hot label (False 0, True 1), as the original; metric: accuracy.

Public format `nlvr2`: `{train,dev,test1}.json`, JSON lines with `identifier`
("train-10171-0-0"), `sentence`, `label` ("True"/"False"). The images are
"<identifier minus its last field>-img0" and "-img1" (the released feature files' keys).
Predictions: `[{"identifier", "prediction": "True"/"False"}]`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .base import TaskExample, TaskFamily, collate_rows, join_path, read_jsonl, records_from_scores
from .metrics import argmax_accuracy
from .vl_tri import LabelBatch, one_hot_target

NLVR2_LABELS = ("False", "True")


class VLBinaryFamily(TaskFamily):
    family = "vl_binary"
    formats = ("nlvr2",)
    heads = ("vil_binary_prediction",)
    image_slots = {"": "regions", "img1": "regions"}
    batch_type = LabelBatch

    def read_annotations(self, split: str) -> list[TaskExample]:
        path = join_path(self.config.annotations, f"{split}.json")
        out = []
        for n, row in enumerate(read_jsonl(path)):
            identifier = str(row["identifier"])
            stem = "-".join(identifier.split("-")[:-1])
            label = str(row.get("label", ""))
            if label and label not in NLVR2_LABELS:
                raise ValueError(f"{path} line {n + 1}: label {label!r} is not 'True' or 'False'")
            payload = {"identifier": identifier, "text": row["sentence"],
                       "label": NLVR2_LABELS.index(label) if label else -1}
            out.append(TaskExample(identifier, {"": f"{stem}-img0", "img1": f"{stem}-img1"}, payload))
        return out

    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        return {"key": sample["__key__"], "example_id": task["example_id"], "texts": [self.encode(task["text"])],
                "images": [self.image(sample, ""), self.image(sample, "img1")], "label": int(task["label"])}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> LabelBatch:
        fields = collate_rows(examples, self.config.id)  # 2 rows per example, consecutive
        label = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.int64)
        return LabelBatch(**fields, label=label, task=self.name)

    def _logits(self, output, batch: LabelBatch) -> torch.Tensor:
        logits = output.vil_binary_prediction
        if logits.size(0) != batch.num_examples:
            raise ValueError(f"task {self.name!r}: {logits.size(0)} pair logits for {batch.num_examples} examples")
        return logits

    def loss(self, output, batch: LabelBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self._logits(output, batch)
        loss = self.bce_loss(logits, one_hot_target(batch.label, 2).to(logits.device), scale_by_labels=False)
        with torch.no_grad():
            score = argmax_accuracy(logits, batch.label).mean()
        return loss, {"score": score}

    def score(self, output, batch: LabelBatch) -> dict[str, dict[str, Any]]:
        logits = self._logits(output, batch).float()
        predictions = [NLVR2_LABELS[i] for i in logits.argmax(dim=-1).tolist()]
        return records_from_scores(batch.keys, argmax_accuracy(logits, batch.label), predictions, batch.label >= 0)

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"identifier": example_id, "prediction": record["prediction"]}
