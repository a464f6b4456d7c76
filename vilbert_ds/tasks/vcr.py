"""VL-logit multiple choice: Visual Commonsense Reasoning, Q->A and QA->R (and Q->AR from both).

One example per question; its 4 choices become 4 model rows in `collate` (text
`[CLS] context [SEP] choice [SEP]`, segment 0 up to the first [SEP], 1 after; the image rows
replicated per choice). `vil_logit` [4B, 1] -> [B, 4]; loss = cross-entropy with the gold choice
(unlabelled test examples are ignored); metric = accuracy of the argmax (a tie with the gold
choice counts as wrong).
- `vcr_q_a`: context = the question, choices = `answer_choices`, gold = `answer_label`.
- `vcr_qa_r`: context = question [SEP] gold answer (segment 0), choices = `rationale_choices`,
  gold = `rationale_label`. On the unlabelled test split each annotation gives 4 examples, one
  conditioned on each answer (`{annot_id}-a{k}`), which the leaderboard file needs.
- Q->AR (`q_ar_accuracy`): an annotation counts when both its Q->A and QA->R predictions are
  right (`script/VCR_Q_AR_evaluation.py` of the original); `write_leaderboard_csv` writes the
  VCR leaderboard CSV from the two tasks' test records.

Detections in the text: VCR tokens are words or lists of indices into `objects`; each index is
replaced by its class name, and "person" by a name drawn from `unisex_names_table.csv` (kept in
`assets.json` at build time), per example from its (seed, epoch, key) generator, as the original
does once at tokenisation. The words are joined and tokenised once (the original re-tokenises
joined word pieces, splitting "##" pieces into "#" tokens).
Truncation: the choice is shortened first (the original); if the context alone leaves less than
a third of the budget, the context is shortened too (the original then fails an assertion).

Regions: global + detected + GT boxes (slot "gt", the VCR-provided detections the text refers
to); GT rows are kept (at most max_region_num - 1) and detected rows give way; the global feature
averages the detected and GT means weighted by their counts + 1, as the original.

Public format (the task's `annotations` directory): `{train,val,test}.jsonl` with `annot_id`,
`img_fn` (the image id of the feature sets), `objects`, `question`, `answer_choices`,
`rationale_choices`, `answer_label`, `rationale_label` (absent on test), and
`unisex_names_table.csv` (column 1 = name). Predictions: Q->A `[{"annot_id", "answer_probs"}]`,
QA->R `[{"annot_id", "conditioned_on", "rationale_probs"}]`; leaderboard CSV `annot_id,
answer_0..3, rationale_conditioned_on_a{i}_{j}`. From `vilbert-ds eval` prediction files:

    python -m vilbert_ds.tasks.vcr q-ar --qa eval/vcr_q_a_val_predictions.json \
        --qar eval/vcr_qa_r_val_predictions.json --annotations data/annotations/vcr/val.jsonl
    python -m vilbert_ds.tasks.vcr leaderboard --qa eval/vcr_q_a_test_predictions.json \
        --qar eval/vcr_qa_r_test_predictions.json --out vcr_test.csv
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import TaskBatch, TaskExample, TaskFamily, collate_rows, join_path, open_text, read_jsonl
from .grounding import GT_SLOT, region_rows
from .metrics import TaskMetric
from .retrieval import strictly_correct

NUM_CHOICES = 4
NAMES_FILE = "unisex_names_table.csv"


@dataclass
class ChoiceBatch(TaskBatch):
    """4 consecutive rows per example (one per choice)."""

    label: torch.Tensor | None = None  # [B] int64 gold choice, -1 = unlabelled
    info: list[dict[str, Any]] = field(default_factory=list)  # per example: annot_id, conditioned_on


def read_names(path: str) -> list[str]:
    """Column 1 of the names table (its header row says "name")."""
    try:
        f = open_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"VCR names table {path} does not exist (published with the VCR annotations)") from None
    with f:
        names = [row[1].strip() for row in csv.reader(f) if len(row) > 1 and row[1].strip() and row[1] != "name"]
    if not names:
        raise ValueError(f"VCR names table {path}: no names in column 1")
    return names


def render(tokens: Sequence[Any], names: Sequence[str]) -> str:
    """VCR mixed tokens -> text: a list of detection indices becomes those objects' names."""
    words: list[str] = []
    for token in tokens:
        if isinstance(token, list):
            for i in token:
                if not 0 <= int(i) < len(names):
                    raise ValueError(f"detection index {i} out of range for {len(names)} objects")
                words.append(names[int(i)])
        else:
            words.append(str(token))
    return " ".join(words)


class VCRFamily(TaskFamily):
    family = "vcr"
    formats = ("vcr_q_a", "vcr_qa_r")
    heads = ("vil_logit",)
    image_slots = {"": "regions", GT_SLOT: "gt"}
    batch_type = ChoiceBatch

    @property
    def rationale(self) -> bool:
        return self.config.format == "vcr_qa_r"

    # ------------------------------------------------------------------ annotations
    def read_annotations(self, split: str) -> list[TaskExample]:
        path = join_path(self.config.annotations, f"{split}.jsonl")
        out: list[TaskExample] = []
        for n, row in enumerate(read_jsonl(path)):
            annot = str(row["annot_id"])
            where = f"{path} line {n + 1} ({annot})"
            for key in ("answer_choices", "rationale_choices") if self.rationale else ("answer_choices",):
                if len(row[key]) != NUM_CHOICES:
                    raise ValueError(f"{where}: {key} has {len(row[key])} choices, expected {NUM_CHOICES}")
            base = {"annot_id": annot, "image_id": str(row["img_fn"]), "objects": list(row["objects"]),
                    "question": row["question"]}
            images = {"": str(row["img_fn"]), GT_SLOT: str(row["img_fn"])}
            labelled = "answer_label" in row
            if not self.rationale:
                payload = {**base, "choices": row["answer_choices"], "label": int(row["answer_label"]) if labelled else -1,
                           "conditioned_on": None}
                out.append(TaskExample(annot, images, payload))
            elif labelled:
                gold = int(row["answer_label"])
                payload = {**base, "answer": row["answer_choices"][gold], "choices": row["rationale_choices"],
                           "label": int(row["rationale_label"]), "conditioned_on": gold}
                out.append(TaskExample(annot, images, payload))
            else:  # the leaderboard wants rationales conditioned on every answer
                for k, answer in enumerate(row["answer_choices"]):
                    payload = {**base, "answer": answer, "choices": row["rationale_choices"], "label": -1,
                               "conditioned_on": k}
                    out.append(TaskExample(f"{annot}-a{k}", images, payload))
        return out

    def build_assets(self, train_examples: Sequence[TaskExample]) -> dict[str, Any]:
        return {"names": read_names(join_path(self.config.annotations, NAMES_FILE))}

    # ------------------------------------------------------------------ workers
    def object_names(self, objects: Sequence[str], rng: np.random.Generator) -> list[str]:
        names = self.assets["names"]
        return [names[int(rng.integers(len(names)))] if o == "person" else str(o) for o in objects]

    def encode_choice(self, context: list[int], choice: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] context [SEP] choice [SEP] within max_seq_length: (input_ids [L], token_type_ids [L])."""
        budget = self.config.max_seq_length - 3
        a, b = list(context), list(choice)
        if len(a) + len(b) > budget:
            b = b[: max(budget - len(a), min(len(b), budget // 3))]
            a = a[: budget - len(b)]
        tok = self.tokenizer
        ids = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(types, dtype=np.int64)

    def preprocess(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self.tokenizer is None:
            raise RuntimeError(f"task {self.name!r}: no tokenizer given to the family; it is needed to preprocess")
        task = self.task_record(sample)
        names = self.object_names(task["objects"], rng)
        words = lambda tokens: self.tokenizer.encode(render(tokens, names), add_special_tokens=False)  # noqa: E731
        context = words(task["question"])
        if self.rationale:
            context = context + [self.tokenizer.sep_token_id] + words(task["answer"])
        texts = [self.encode_choice(context, words(choice)) for choice in task["choices"]]
        rows = region_rows(sample, self.config.max_region_num, with_gt=True, gt_priority=True, global_over_gt=True)
        return {"key": sample["__key__"], "example_id": task.get("example_id", sample["__key__"]),
                "texts": texts, "images": [(rows.feat, rows.loc)], "label": int(task["label"]),
                "info": {"annot_id": task["annot_id"], "conditioned_on": task.get("conditioned_on")}}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> ChoiceBatch:
        fields = collate_rows(examples, self.config.id)  # 4 rows per example, the image repeated
        label = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.int64)
        return ChoiceBatch(**fields, label=label, info=[dict(ex["info"]) for ex in examples], task=self.name)

    # ------------------------------------------------------------------ step
    def choice_logits(self, output, batch: ChoiceBatch) -> torch.Tensor:
        logits = output.vil_logit.float()
        if logits.numel() != NUM_CHOICES * batch.num_examples:
            raise ValueError(f"task {self.name!r}: {logits.numel()} vil_logit rows for {batch.num_examples} examples "
                             f"x {NUM_CHOICES} choices")
        return logits.view(batch.num_examples, NUM_CHOICES)

    def loss(self, output, batch: ChoiceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.choice_logits(output, batch)
        label = batch.label.to(logits.device)
        labelled = label >= 0
        if not bool(labelled.any()):  # a test batch: no target, a zero loss that still touches the graph
            return logits.sum() * 0.0, {"score": logits.new_zeros(())}
        loss = F.cross_entropy(logits, label, ignore_index=-1)
        with torch.no_grad():
            score = strictly_correct(logits, label)[labelled].float().mean()
        return loss, {"score": score}

    def score(self, output, batch: ChoiceBatch) -> dict[str, dict[str, Any]]:
        logits = self.choice_logits(output, batch).cpu()
        probs = torch.softmax(logits, dim=1)
        pred = logits.argmax(dim=1)
        correct = strictly_correct(logits, batch.label.cpu())
        out = {}
        for key, p, g, ok, pr, info in zip(batch.keys, pred.tolist(), batch.label.tolist(), correct.tolist(), probs.tolist(),
                                           batch.info):
            out[str(key)] = {"score": float(ok) if g >= 0 else None, "prediction": int(p),
                             "probs": [round(float(x), 6) for x in pr], **info}
        return out

    def prediction_entry(self, example_id: str, record: Mapping[str, Any]) -> dict[str, Any]:
        if self.rationale:
            return {"annot_id": record["annot_id"], "conditioned_on": record["conditioned_on"],
                    "rationale_probs": record["probs"]}
        return {"annot_id": record["annot_id"], "answer_probs": record["probs"]}


# ------------------------------------------------------------------------------ Q->AR
def q_ar_accuracy(qa: TaskMetric | Mapping[str, Mapping[str, Any]],
                  qar: TaskMetric | Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Q->A, QA->R and Q->AR accuracy over the annotations scored by both tasks (val split:
    QA->R conditioned on the gold answer). Q->AR counts an annotation when both are right."""
    a = qa.records if isinstance(qa, TaskMetric) else qa
    r = qar.records if isinstance(qar, TaskMetric) else qar
    qa_by = {rec["annot_id"]: rec for rec in a.values() if rec.get("score") is not None}
    qar_by = {rec["annot_id"]: rec for rec in r.values() if rec.get("score") is not None}
    both = sorted(set(qa_by) & set(qar_by))
    if not both:
        return {"q_a": 0.0, "qa_r": 0.0, "q_ar": 0.0, "count": 0.0}
    qa_ok = np.array([qa_by[k]["score"] for k in both], dtype=np.float64)
    qar_ok = np.array([qar_by[k]["score"] for k in both], dtype=np.float64)
    return {"q_a": float(qa_ok.mean()), "qa_r": float(qar_ok.mean()), "q_ar": float((qa_ok * qar_ok).mean()),
            "count": float(len(both))}


def write_leaderboard_csv(qa: TaskMetric | str | os.PathLike, qar: TaskMetric | str | os.PathLike,
                          path: str | os.PathLike) -> Path:
    """The VCR leaderboard submission: per annotation the 4 answer probabilities and, for each
    answer i, the 4 rationale probabilities conditioned on it. Inputs: the two tasks' test-split
    metrics, or their prediction files (`vilbert-ds eval --split test`)."""
    answers = {str(e["annot_id"]): e["answer_probs"] for e in _entries(qa, "answer_probs")}
    rationale = {(str(e["annot_id"]), int(e["conditioned_on"])): e["rationale_probs"]
                 for e in _entries(qar, "rationale_probs")}
    header = ["annot_id"] + [f"answer_{j}" for j in range(NUM_CHOICES)] + [
        f"rationale_conditioned_on_a{i}_{j}" for i in range(NUM_CHOICES) for j in range(NUM_CHOICES)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for annot in sorted(answers):
        missing = [i for i in range(NUM_CHOICES) if (annot, i) not in rationale]
        if missing:
            raise ValueError(f"VCR leaderboard: annotation {annot} has no QA->R record conditioned on answers {missing}; "
                             f"evaluate vcr_qa_r on the test split (4 conditioned examples per annotation)")
        row = [annot, *answers[annot]]
        for i in range(NUM_CHOICES):
            row.extend(rationale[(annot, i)])
        writer.writerow(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _entries(source: TaskMetric | str | os.PathLike, probs_key: str) -> list[dict[str, Any]]:
    """Prediction entries from a metric (its records) or a prediction file written by `eval`."""
    if isinstance(source, TaskMetric):
        key = "rationale_probs" if probs_key == "rationale_probs" else "answer_probs"
        return [{"annot_id": r["annot_id"], "conditioned_on": r.get("conditioned_on"), key: r["probs"]}
                for r in source.records.values()]
    entries = json.loads(Path(source).read_text(encoding="utf-8"))
    if entries and probs_key not in entries[0]:
        raise ValueError(f"{source}: entries have no {probs_key!r}; is it the other VCR task's prediction file?")
    return entries


def q_ar_from_files(qa_predictions: str | os.PathLike, qar_predictions: str | os.PathLike,
                    annotations: str | os.PathLike) -> dict[str, float]:
    """Q->A, QA->R, Q->AR from the two tasks' prediction files and the split's public jsonl
    (the original's `script/VCR_Q_AR_evaluation.py`)."""
    gold = {str(r["annot_id"]): (int(r["answer_label"]), int(r["rationale_label"]))
            for r in read_jsonl(annotations) if "answer_label" in r}
    qa = {str(e["annot_id"]): {"annot_id": str(e["annot_id"]),
                               "score": float(int(np.argmax(e["answer_probs"])) == gold[str(e["annot_id"])][0])}
          for e in _entries(qa_predictions, "answer_probs") if str(e["annot_id"]) in gold}
    qar = {str(e["annot_id"]): {"annot_id": str(e["annot_id"]),
                                "score": float(int(np.argmax(e["rationale_probs"])) == gold[str(e["annot_id"])][1])}
           for e in _entries(qar_predictions, "rationale_probs")
           if str(e["annot_id"]) in gold and e.get("conditioned_on") == gold[str(e["annot_id"])][0]}
    return q_ar_accuracy(qa, qar)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vilbert_ds.tasks.vcr",
                                description="VCR Q->AR accuracy and the leaderboard CSV from `vilbert-ds eval` prediction files")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("q-ar", help="Q->A, QA->R and Q->AR accuracy of a labelled split")
    q.add_argument("--qa", required=True, help="vcr_q_a predictions (eval/vcr_q_a_val_predictions.json)")
    q.add_argument("--qar", required=True, help="vcr_qa_r predictions (eval/vcr_qa_r_val_predictions.json)")
    q.add_argument("--annotations", required=True, help="the split's public jsonl (val.jsonl)")
    lb = sub.add_parser("leaderboard", help="the leaderboard CSV from the test-split predictions")
    lb.add_argument("--qa", required=True)
    lb.add_argument("--qar", required=True)
    lb.add_argument("--out", required=True, help="CSV path")
    args = p.parse_args(argv)
    if args.command == "q-ar":
        print(json.dumps(q_ar_from_files(args.qa, args.qar, args.annotations)))
    else:
        print(write_leaderboard_csv(args.qa, args.qar, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
