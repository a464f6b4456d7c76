"""VL-classifier: answer classification with soft scores (VQA v2, GQA, Visual Genome QA).

Head `vil_prediction` (3129 answers; VQA, GenomeQA) or `vil_prediction_gqa` (1533; GQA) on the
fused pooled vector. Loss: BCEWithLogits(mean) x number of labels against soft-score targets
(the original). Metric: the soft score of the argmax answer, which for VQA equals the official
VQA accuracy (min(1, matching humans / 3) averaged over annotator subsets).

Public formats read (file names as published):
- `vqa`: `v2_OpenEnded_mscoco_{train,val}2014_questions.json` + `v2_mscoco_{train,val}2014_annotations.json`
  (10 human answers per question), `v2_OpenEnded_mscoco_{test,test-dev}2015_questions.json`.
  Splits train, val, trainval (train + val minus its last `holdout` questions by id), minval
  (those), test, testdev.
- `gqa`: `{train,val,testdev,test}_balanced_questions.json` ({question id: {imageId, question,
  answer}}). Splits as VQA, trainval/minval from train + val.
- `genome`: Visual Genome `question_answers.json` ([{id, qas: [{qa_id, image_id, question,
  answer}]}]). Splits train (all but the last `holdout` questions by id) and val; both are
  cleaned of held-out test images (the original cleans GenomeQA's val split too).

The label map (`assets.json` "answers": label index = position = output unit of the head), from
one of (`asset_source`, recorded in `assets.json` "source" and logged by the build):
- released: the original's `cache/trainval_label2ans.pkl` (checked against
  `trainval_ans2label.pkl`) under the task's `released` directory: the order the released
  checkpoints were trained with;
- another task's (`options.answers_from`): GenomeQA uses VQA's. The original scores GenomeQA on
  the same 3129-way `vil_prediction` head as VQA (its BCE loss needs the target to be as wide as
  the head), so one unit means one answer for both; a separate vocabulary would give the shared
  units two meanings;
- derived: the normalised answers seen at least `min_answer_count` times in the training split,
  most frequent first, at most `num_labels`.
Targets look answers up by their normalised form and as written (GQA's "t-shirt").

At evaluation a model directory's `label_maps.json` (written by `vilbert-ds convert
--label-maps` and by training runs) names what each head unit means; `set_head_answers` applies
it, so predictions name the model's answers while scores still use the shards' targets.
Prediction files: VQA `[{"question_id", "answer"}]`, GQA `[{"questionId", "prediction"}]`,
Visual Genome `[{"question_id", "answer"}]`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data import storage
from .base import (TaskBatch, TaskExample, TaskFamily, collate_rows, describe_asset_source, join_path, read_json,
                   records_from_scores)
from .metrics import argmax_soft_score, normalize_vqa_answer, soft_scores
from .released import ANS2LABEL, LABEL2ANS, load_label_map, released_source


@dataclass
class ClassifierBatch(TaskBatch):
    target: torch.Tensor | None = None  # [B, num_labels] float32 soft scores (0 where unlabeled)
    labeled: torch.Tensor | None = None  # [B] bool: the example has answers (False on test splits)


def _qid_order(qid: Any) -> tuple[int, Any]:
    s = str(qid)
    return (0, int(s)) if s.isdigit() else (1, s)


class VLClassifierFamily(TaskFamily):
    family = "vl_classifier"
    formats = ("vqa", "gqa", "genome")
    batch_type = ClassifierBatch

    @dataclass
    class Options:
        holdout: int = 3000  # questions (by id) held out of the training split as the val split
        min_answer_count: int = 9  # answers rarer than this in the training split are not labels
        answers_from: str = ""  # a task whose label map this one shares (GenomeQA: vqa, one head)

        def __post_init__(self) -> None:
            if self.holdout < 0 or self.min_answer_count < 1:
                raise ValueError(f"holdout={self.holdout} must be >= 0 and min_answer_count={self.min_answer_count} >= 1")

    @property
    def heads(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.config.head,)

    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        if config.head not in ("vil_prediction", "vil_prediction_gqa"):
            raise ValueError(f"task {config.name!r}: a VL-classifier uses vil_prediction or vil_prediction_gqa, not {config.head}")
        self._head: tuple[list[str], str] | None = None  # set_head_answers: (answers, where from)
        self._head_index: torch.Tensor | None = None

    # ------------------------------------------------------------------ annotations
    def read_annotations(self, split: str) -> list[TaskExample]:
        reader = {"vqa": self._read_vqa, "gqa": self._read_gqa, "genome": self._read_genome}[self.config.format]
        return reader(split)

    def _holdout_split(self, items: list[Any], split: str, train_name: str, val_name: str) -> list[Any]:
        items = sorted(items, key=lambda e: _qid_order(e.example_id))
        n = self.options.holdout
        if n >= len(items) and split == train_name:
            raise ValueError(
                f"task {self.name!r}: holdout={n} leaves no training questions out of {len(items)}; lower options.holdout"
            )
        return items[: len(items) - n] if split == train_name else items[len(items) - n:]

    def _read_vqa(self, split: str) -> list[TaskExample]:
        root = self.config.annotations
        if split in ("test", "testdev"):
            name = "test" if split == "test" else "test-dev"
            return self._vqa_questions(join_path(root, f"v2_OpenEnded_mscoco_{name}2015_questions.json"), None)
        if split in ("train", "val"):
            return self._vqa_pair(split)
        if split == "trainval":
            return self._vqa_pair("train") + self._holdout_split(self._vqa_pair("val"), split, "trainval", "minval")
        if split == "minval":
            return self._holdout_split(self._vqa_pair("val"), split, "trainval", "minval")
        raise ValueError(f"task {self.name!r}: VQA split {split!r} unknown (train, val, trainval, minval, test, testdev)")

    def _vqa_pair(self, part: str) -> list[TaskExample]:
        root = self.config.annotations
        ann_path = join_path(root, f"v2_mscoco_{part}2014_annotations.json")
        annotations = {int(a["question_id"]): a for a in read_json(ann_path)["annotations"]}
        return self._vqa_questions(join_path(root, f"v2_OpenEnded_mscoco_{part}2014_questions.json"), annotations,
                                   ann_path)

    def _vqa_questions(self, path: str, annotations: dict[int, Any] | None, ann_path: str = "") -> list[TaskExample]:
        out = []
        for q in read_json(path)["questions"]:
            qid = int(q["question_id"])
            payload: dict[str, Any] = {"question_id": qid, "question": q["question"]}
            if annotations is not None:
                if qid not in annotations:
                    raise ValueError(f"{ann_path}: no annotation for question {qid} of {path}")
                a = annotations[qid]
                if int(a["image_id"]) != int(q["image_id"]):
                    raise ValueError(f"{ann_path}: question {qid} has image {a['image_id']} but {path} says {q['image_id']}")
                payload["answers"] = [x["answer"] for x in a["answers"]]
                payload["answer"] = a.get("multiple_choice_answer", "")
            out.append(TaskExample(str(qid), {"": str(q["image_id"])}, payload))
        return out

    def _read_gqa(self, split: str) -> list[TaskExample]:
        root = self.config.annotations

        def load(part: str) -> list[TaskExample]:
            path = join_path(root, f"{part}_balanced_questions.json")
            out = []
            for qid, q in read_json(path).items():
                payload = {"question_id": str(qid), "question": q["question"]}
                if "answer" in q:
                    payload["answers"] = [q["answer"]]
                    payload["answer"] = q["answer"]
                out.append(TaskExample(str(qid), {"": str(q["imageId"])}, payload))
            return out

        if split in ("train", "val", "testdev", "test"):
            return load(split)
        if split in ("trainval", "minval"):
            return self._holdout_split(load("train") + load("val"), split, "trainval", "minval")
        raise ValueError(f"task {self.name!r}: GQA split {split!r} unknown (train, val, trainval, minval, testdev, test)")

    def _read_genome(self, split: str) -> list[TaskExample]:
        if split not in ("train", "val"):
            raise ValueError(f"task {self.name!r}: Visual Genome QA split {split!r} unknown (train, val)")
        path = join_path(self.config.annotations, "question_answers.json")
        out = []
        for image in read_json(path):
            for qa in image["qas"]:
                qid = int(qa["qa_id"])
                payload = {"question_id": qid, "question": qa["question"], "answers": [qa["answer"]],
                           "answer": qa["answer"]}
                out.append(TaskExample(str(qid), {"": str(qa.get("image_id", image["id"]))}, payload))
        return self._holdout_split(out, split, "train", "val")

    # ------------------------------------------------------------------ label map and targets
    def is_cleaned_split(self, split: str) -> bool:
        # the original's GenomeQA removes the held-out test images from train AND val
        return super().is_cleaned_split(split) or (self.config.format == "genome" and split == self.config.splits.val)

    def asset_source(self) -> dict[str, Any]:
        """The released label map when the task's released directory has one, else the shared
        task's (GenomeQA without the VG files: VQA's), else derived."""
        if self.released_label_map():
            root = self.config.released.rstrip("/")
            return released_source(f"{root}/{ANS2LABEL}", f"{root}/{LABEL2ANS}")
        if self.options.answers_from:
            return {"kind": "task", "task": self.options.answers_from}
        return {"kind": "derived", "min_answer_count": self.options.min_answer_count}

    def released_label_map(self) -> bool:
        return bool(self.config.released) and storage.exists(f"{self.config.released.rstrip('/')}/{LABEL2ANS}")

    def build_assets(self, train_examples: Sequence[TaskExample]) -> dict[str, Any]:
        """The label map: the released files when the task has them, else the answers of the
        training split with at least `min_answer_count` occurrences (VQA counts each question's
        consensus answer), most frequent first."""
        if self.released_label_map():
            answers, files = load_label_map(self.config.released)
            self._check_width(answers, f"{files[1]}")
            return {"answers": answers, "dropped_answers": 0}
        counts: Counter[str] = Counter()
        for ex in train_examples:
            if "answer" in ex.payload:
                counts[normalize_vqa_answer(ex.payload["answer"])] += 1
        answers = sorted((a for a, c in counts.items() if c >= self.options.min_answer_count and a),
                         key=lambda a: (-counts[a], a))
        if not answers:
            raise ValueError(
                f"task {self.name!r}: no answer occurs >= {self.options.min_answer_count} times in the training split"
            )
        return {"answers": answers[: self.config.num_labels], "dropped_answers": max(0, len(answers) - self.config.num_labels)}

    def shared_assets(self, task: str, assets: Mapping[str, Any]) -> dict[str, Any]:
        """`options.answers_from`: the label map of `task` (its head must be this task's)."""
        answers = list(assets["answers"])
        self._check_width(answers, f"task {task!r} assets")
        return {"answers": answers, "dropped_answers": 0}

    def _check_width(self, answers: Sequence[str], where: str) -> None:
        if len(answers) > self.config.num_labels:
            raise ValueError(f"task {self.name!r}: {where} has {len(answers)} answers but head {self.config.head} "
                             f"has num_labels={self.config.num_labels} outputs")

    def answer_index(self, answers: Sequence[str]) -> dict[str, int]:
        """answer -> label, looked up by the normalised form (VQA answers) and as written
        (label maps made without the VQA normalisation, e.g. GQA's "t-shirt")."""
        index = {normalize_vqa_answer(a): i for i, a in reversed(list(enumerate(answers)))}
        index.update({a: i for i, a in reversed(list(enumerate(answers)))})
        return index

    def finalize_examples(self, examples: list[TaskExample], split: str) -> list[TaskExample]:
        """Soft-score targets over the label map: `labels`/`scores` in the task JSON (answers
        outside the map give no target, as in the original)."""
        index = self.answer_index(self.assets["answers"])
        for ex in examples:
            if "answers" not in ex.payload:
                continue
            scores = soft_scores(ex.payload["answers"])
            raw = {normalize_vqa_answer(a): a for a in ex.payload["answers"]}
            picked = {}
            for a, score in scores.items():
                label = index.get(a, index.get(raw.get(a, a)))
                if label is not None:
                    picked[label] = max(score, picked.get(label, 0.0))
            ex.payload["labels"] = list(picked)
            ex.payload["scores"] = [round(s, 4) for s in picked.values()]
        return examples

    # ------------------------------------------------------------------ the model's label map
    def set_head_answers(self, answers: Sequence[str], source: str) -> None:
        """What the model's head units mean (a model directory's `label_maps.json`): predictions
        name these answers; scores look the predicted answer up in the shards' targets."""
        answers = list(answers)
        self._check_width(answers, source)
        self._head = (answers, source)
        index = self.answer_index(self.assets["answers"])
        self._head_index = torch.tensor([index.get(a, -1) for a in answers], dtype=torch.int64)

    @property
    def head_answers(self) -> list[str]:
        """The answer of each head unit: the model's label map if set, else the shards' (the
        order the model was trained with when it was trained on these shards)."""
        return self._head[0] if self._head is not None else list(self.assets["answers"])

    def label_map_note(self) -> str:
        """Which label map names the predictions and which the targets (for logs and metrics)."""
        shards = describe_asset_source(self.assets.get("source", {"kind": "derived"}))
        if self._head is None:
            return f"{self.config.head} answers = the task shards' label map ({shards}, {len(self.assets['answers'])} answers)"
        common = int((self._head_index >= 0).sum())
        return (f"{self.config.head} answers from {self._head[1]} ({len(self._head[0])} answers, {common} in the task "
                f"shards' label map, {shards})")

    # ------------------------------------------------------------------ workers
    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        task = self.task_record(sample)
        return {
            "key": sample["__key__"],
            "example_id": task["example_id"],
            "texts": [self.encode(task["question"])],
            "images": [self.image(sample)],
            "labels": np.asarray(task.get("labels", []), dtype=np.int64),
            "scores": np.asarray(task.get("scores", []), dtype=np.float32),
            "labeled": "answers" in task,
        }

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> ClassifierBatch:
        fields = collate_rows(examples, self.config.id)
        target = torch.zeros(len(examples), self.config.num_labels, dtype=torch.float32)
        for i, ex in enumerate(examples):
            if len(ex["labels"]):
                target[i, torch.from_numpy(ex["labels"])] = torch.from_numpy(ex["scores"])
        labeled = torch.tensor([bool(ex["labeled"]) for ex in examples])
        return ClassifierBatch(**fields, target=target, labeled=labeled, task=self.name)

    # ------------------------------------------------------------------ step
    def logits(self, output) -> torch.Tensor:
        logits = getattr(output, self.config.head)
        if logits.size(-1) != self.config.num_labels:
            raise ValueError(
                f"task {self.name!r}: head {self.config.head} has {logits.size(-1)} outputs but tasks.yaml "
                f"num_labels={self.config.num_labels}"
            )
        return logits

    def loss(self, output, batch: ClassifierBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(output)
        loss = self.bce_loss(logits, batch.target, scale_by_labels=True)
        with torch.no_grad():
            score = argmax_soft_score(self._vocab_logits(logits), batch.target).mean()
        return loss, {"score": score}

    def _vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Predictions are answers of the label map only (it may be smaller than the head)."""
        return logits[:, : len(self.assets["answers"])]

    def score(self, output, batch: ClassifierBatch) -> dict[str, dict[str, Any]]:
        answers = self.head_answers
        logits = self.logits(output).float()[:, : len(answers)]
        picked = logits.argmax(dim=-1)
        target = batch.target.float().to(picked.device)
        if self._head_index is None:
            scores = target.gather(1, picked[:, None])[:, 0]
        else:  # the model's unit -> the shards' label; an answer the shards do not know scores 0
            label = self._head_index.to(picked.device)[picked]
            scores = torch.where(label >= 0, target.gather(1, label.clamp(min=0)[:, None])[:, 0], torch.zeros_like(label,
                                 dtype=target.dtype))
        return records_from_scores(batch.keys, scores, [answers[i] for i in picked.tolist()], batch.labeled)

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.config.format == "gqa":
            return {"questionId": example_id, "prediction": record["prediction"]}
        return {"question_id": int(example_id), "answer": record["prediction"]}
