"""VL-tri-classifier: three-way classification of an (image, sentence) pair (SNLI-VE, GuessWhat).

Head `vil_tri_prediction` (Linear 1024 -> 3) on the fused pooled vector; loss BCEWithLogits(mean)
on the one-hot label (the original); metric: accuracy of the argmax.

Public formats read:
- `snli_ve`: `snli_ve_{train,dev,test}.jsonl`, one hypothesis per line: `Flikr30kID` ("<id>.jpg",
  the published spelling), `sentence2` (hypothesis), `gold_label` (contradiction 0, neutral 1,
  entailment 2; "-" = the annotators did not agree: kept with an all-zero target and counted as
  wrong in the score, as the original does; a row without `gold_label` is unlabeled: unscored),
  `pairID`.
  Predictions: `[{"pairID", "gold_label"}]`.
- `guesswhat`: `guesswhat.{train,valid,test}.jsonl[.gz]`, one game per line: `image.id`, `qas`
  [{id, question, answer: Yes/No/N/A}] -> one example per question (Yes 0, No 1, N/A 2).
  Predictions: `[{"question_id", "answer"}]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .base import (TaskBatch, TaskExample, TaskFamily, collate_rows, first_existing, join_path, read_jsonl,
                   records_from_scores)
from .metrics import argmax_accuracy

SNLI_VE_LABELS = ("contradiction", "neutral", "entailment")
UNLABELED = -1  # no gold label (a test split): not scored
NO_CONSENSUS = -2  # SNLI-VE "-": zero target, scored (always wrong), the original's handling
GUESSWHAT_LABELS = ("Yes", "No", "N/A")


@dataclass
class LabelBatch(TaskBatch):
    """One gold class per example; UNLABELED (-1) = none, NO_CONSENSUS (-2) = SNLI-VE "-"."""

    label: torch.Tensor | None = None  # [B] int64


def one_hot_target(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] int64 (negative: no class) -> [B, C] float32 one-hot (all zero for a negative label)."""
    target = torch.zeros(label.size(0), num_classes, dtype=torch.float32)
    has = label >= 0
    target[has, label[has]] = 1.0
    return target


class VLTriFamily(TaskFamily):
    family = "vl_tri"
    formats = ("snli_ve", "guesswhat")
    heads = ("vil_tri_prediction",)
    batch_type = LabelBatch

    @property
    def label_names(self) -> tuple[str, ...]:
        return SNLI_VE_LABELS if self.config.format == "snli_ve" else GUESSWHAT_LABELS

    def read_annotations(self, split: str) -> list[TaskExample]:
        root = self.config.annotations
        out: list[TaskExample] = []
        if self.config.format == "snli_ve":
            path = join_path(root, f"snli_ve_{split}.jsonl")
            for n, row in enumerate(read_jsonl(path)):
                image = str(row["Flikr30kID"]).split(".")[0]
                gold = row.get("gold_label")
                if gold is not None and gold not in SNLI_VE_LABELS and gold != "-":
                    raise ValueError(f"{path} line {n + 1}: gold_label {gold!r} is not one of {SNLI_VE_LABELS} or '-'")
                label = UNLABELED if gold is None else NO_CONSENSUS if gold == "-" else SNLI_VE_LABELS.index(gold)
                example_id = str(row.get("pairID", n))
                payload = {"pair_id": example_id, "text": row["sentence2"], "label": label}
                out.append(TaskExample(example_id, {"": image}, payload))
            return out
        path = first_existing(root, [f"guesswhat.{split}.jsonl", f"guesswhat.{split}.jsonl.gz"])
        for game in read_jsonl(path):
            image = str(game["image"]["id"])
            for qa in game["qas"]:
                answer = str(qa.get("answer", ""))
                if answer and answer not in GUESSWHAT_LABELS:
                    raise ValueError(f"{path}: game {game.get('id')} question {qa.get('id')}: answer {answer!r} "
                                     f"is not one of {GUESSWHAT_LABELS}")
                payload = {"question_id": int(qa["id"]), "text": qa["question"], "game_id": game.get("id"),
                           "label": GUESSWHAT_LABELS.index(answer) if answer else UNLABELED}
                out.append(TaskExample(str(qa["id"]), {"": image}, payload))
        return out

    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        return {"key": sample["__key__"], "example_id": task["example_id"], "texts": [self.encode(task["text"])],
                "images": [self.image(sample)], "label": int(task["label"])}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> LabelBatch:
        fields = collate_rows(examples, self.config.id)
        label = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.int64)
        return LabelBatch(**fields, label=label, task=self.name)

    def loss(self, output, batch: LabelBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = output.vil_tri_prediction
        loss = self.bce_loss(logits, one_hot_target(batch.label, 3).to(logits.device), scale_by_labels=False)
        with torch.no_grad():
            score = argmax_accuracy(logits, batch.label).mean()
        return loss, {"score": score}

    def score(self, output, batch: LabelBatch) -> dict[str, dict[str, Any]]:
        logits = output.vil_tri_prediction.float()
        names = self.label_names
        predictions = [names[i] for i in logits.argmax(dim=-1).tolist()]
        # NO_CONSENSUS rows are scored: argmax never equals -2, so they count as wrong
        return records_from_scores(batch.keys, argmax_accuracy(logits, batch.label), predictions,
                                   batch.label != UNLABELED)

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.config.format == "snli_ve":
            return {"pairID": example_id, "gold_label": record["prediction"]}
        return {"question_id": int(example_id), "answer": record["prediction"]}
