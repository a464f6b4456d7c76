"""Task metrics: per-example scoring functions and the distributed `TaskMetric` accumulator.

Every family scores each evaluated example into a *record* `{"score": float, ...}` keyed by the
example id (the question id, pair id, ...). A `TaskMetric` holds those records; merging the
records of all ranks is a union keyed by example id, so the duplicates that padded last batches
put on several ranks are counted once (DESIGN.md section 4: every rank runs the same number of
batches, the loader pads the last one by repeating samples). The result is computed from the
merged records only, never from per-rank averages.

Scoring functions (pure, tested against hand-computed cases):
  normalize_vqa_answer / vqa_accuracy / soft_scores   VQA v2 answers and the official accuracy
  argmax_soft_score                                   score of the argmax label ([B, C] -> [B])
  argmax_accuracy                                     0/1 per example
  box_iou                                             [N, 4] x [M, 4] -> [N, M]
  recall_at_k / rank_of_gold                          retrieval ranks and R@K
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

# ------------------------------------------------------------------------------ VQA answers
# The normalisation rules of the public VQA evaluation (punctuation, number words, articles,
# apostrophe-less contractions), written out here; applied to human and predicted answers alike.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itll": "it'll", "ive": "i've", "shes": "she's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "youve": "you've",
}
_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$:|~")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000


def normalize_vqa_answer(answer: str) -> str:
    """'Two dogs.' -> '2 dogs'; 'black/white' -> 'black white'; "dont" -> "don't"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _THOUSANDS.sub("", text)
    chars = []
    for i, ch in enumerate(text):
        if ch in _PUNCT:
            # punctuation touching a space or the ends is dropped; inside a word it separates
            before = text[i - 1] if i > 0 else " "
            after = text[i + 1] if i + 1 < len(text) else " "
            chars.append("" if (before == " " or after == " ") else " ")
        else:
            chars.append(ch)
    text = _PERIOD.sub("", "".join(chars))
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predicted: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the (normally 10) human answers:
    the mean over the leave-one-annotator-out subsets of min(1, matches / 3).

    For 10 answers and c matches this is 0.3, 0.6, 0.9, 1.0 for c = 1, 2, 3, >=4 (the soft scores
    of the bottom-up-attention targets the original trains on)."""
    pred = normalize_vqa_answer(predicted)
    gold = [normalize_vqa_answer(a) for a in human_answers]
    if not gold:
        return 0.0
    if len(gold) == 1:
        return float(pred == gold[0])
    total = 0.0
    for left_out in range(len(gold)):
        matches = sum(1 for j, g in enumerate(gold) if j != left_out and g == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gold)


def soft_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """Normalised answer -> its VQA accuracy as a target (only answers with a non-zero score)."""
    out: dict[str, float] = {}
    for answer in dict.fromkeys(normalize_vqa_answer(a) for a in human_answers):
        score = vqa_accuracy(answer, human_answers)
        if score > 0:
            out[answer] = score
    return out


# ------------------------------------------------------------------------------ tensors
def argmax_soft_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft score of the argmax label: logits [B, C], target [B, C] soft scores -> [B] float32.

    `compute_score_with_logits` of the original, without the `.cuda()`."""
    picked = logits.argmax(dim=-1, keepdim=True)
    return target.float().gather(-1, picked).squeeze(-1)


def argmax_accuracy(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """logits [B, C], gold [B] int64 -> [B] float32 of 0/1."""
    return (logits.argmax(dim=-1) == gold).float()


def box_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, pixel_inclusive: bool = False) -> torch.Tensor:
    """IoU of absolute x1 y1 x2 y2 boxes: a [N, 4], b [M, 4] -> [N, M] float32.

    Continuous coordinates by default: width = x2 - x1. `pixel_inclusive=True` is the original's
    refer / pointing convention (x2, y2 are the last pixel inside the box): widths, heights and
    intersection sides get + 1, so boxes that touch overlap by one pixel row. Empty boxes give 0."""
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    one = 1.0 if pixel_inclusive else 0.0
    area_a = (a[:, 2] - a[:, 0] + one).clamp(min=0) * (a[:, 3] - a[:, 1] + one).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0] + one).clamp(min=0) * (b[:, 3] - b[:, 1] + one).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def rank_of_gold(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """scores [Q, N] (higher = better), gold [Q] int64 -> [Q] int64 rank of the gold item, 1-based.

    Ties count against the gold item (a constant scorer gets the worst rank, not the best)."""
    gold_score = scores.gather(1, gold[:, None])
    return (scores >= gold_score).sum(dim=1)


def recall_at_k(ranks: torch.Tensor | Sequence[int], ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """1-based ranks [Q] -> {"R@1": %, "R@5": %, "R@10": %, "median_rank", "mean_rank"} (R@K in percent)."""
    r = torch.as_tensor(ranks, dtype=torch.float32)
    if r.numel() == 0:
        return {f"R@{k}": 0.0 for k in ks} | {"median_rank": 0.0, "mean_rank": 0.0}
    out = {f"R@{k}": float((r <= k).float().mean() * 100.0) for k in ks}
    out["median_rank"] = float(r.median())
    out["mean_rank"] = float(r.mean())
    return out


# ------------------------------------------------------------------------------ accumulator
class TaskMetric:
    """Per-example records keyed by example id; `merge` is a union, so duplicates count once.

    Each record is plain JSON-able data: {"score": float in [0, 1] or None when the example has
    no label (test splits), "prediction": ..., ...}.
    `result()` gives {"score": mean score, "count": examples}; families extend it by
    overriding `summarize(records)` (e.g. VCR's Q->AR joins two record sets)."""

    def __init__(self, task: str):
        self.task = task
        self.records: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def update(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        for key, record in records.items():
            if "score" not in record:
                raise ValueError(f"task {self.task}: record for example {key!r} has no 'score'")
            # the first copy wins: a padded duplicate of an example scores the same example again
            self.records.setdefault(str(key), dict(record))

    def merge(self, others: Iterable["TaskMetric | Mapping[str, Mapping[str, Any]]"]) -> "TaskMetric":
        for other in others:
            self.update(other.records if isinstance(other, TaskMetric) else other)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "records": self.records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = {}
        self.update(state["records"])

    def summarize(self, records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """Mean score over the records that have one (test splits without labels have None)."""
        scores = [float(r["score"]) for r in records.values() if r["score"] is not None]
        return {"score": float(np.mean(scores)) if scores else 0.0, "count": float(len(scores))}

    def result(self) -> dict[str, float]:
        return self.summarize(self.records)

    def predictions(self) -> list[tuple[str, Any]]:
        """(example id, prediction) sorted by example id, for prediction files."""
        return sorted(((k, r.get("prediction")) for k, r in self.records.items()), key=lambda kv: _sort_key(kv[0]))

    def gather(self) -> "TaskMetric":
        """Union of the records of every rank (all ranks get the merged metric). A no-op when
        torch.distributed is not initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.records)
        merged = type(self).__new__(type(self))
        merged.__dict__.update(self.__dict__)
        merged.records = {}
        merged.merge(parts)
        return merged


def _sort_key(key: str) -> tuple[int, Any]:
    """Numeric ids sort numerically, the rest lexically (numbers first)."""
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)
