"""The task pipeline carries the image: on synthetic VQA whose answers depend on the region
features, a small ViLBERT trained through the family's loader, heads, loss and metric beats the
best text-only baseline clearly. (The multi-task version with figures: bench/tasks_region_dependence.py.)"""
from __future__ import annotations

import pytest
import torch

from fixtures.tasks import build_synthetic_tasks
from vilbert_ds.engine import WarmupLinearSchedule, param_groups
from vilbert_ds.model import ViLBert
from vilbert_ds.model.config import tiny
from vilbert_ds.engine import lr_rule
from vilbert_ds.data.tokenizer import load_tokenizer
from vilbert_ds.tasks.loader import EvalLoader, build_task_loader, evaluate_task
from vilbert_ds.data.config import DataConfig
from vilbert_ds.tasks.registry import build_family, load_registry
from vilbert_ds.tasks.synthetic_qa import text_only_baseline


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vqa_accuracy_clearly_above_text_only_baseline(tmp_path):
    registry = load_registry(build_synthetic_tasks(tmp_path, ("vqa",), images=96, questions=3))
    baseline = text_only_baseline(registry, "vqa")
    torch.manual_seed(0)
    model = ViLBert(tiny(task_specific_tokens=True, initializer_range=0.1))
    family = build_family(registry["vqa"], load_tokenizer())
    data = DataConfig(num_workers=0)
    loader = build_task_loader(family, "trainval", data, rank=0, world_size=1, micro_batch_size=16, seed=0)
    steps, lr = 400, 5e-4
    optimizer = torch.optim.AdamW(param_groups(model, lr=lr, weight_decay=0.01, lr_scale=lr_rule(lr, 2e-3, 1.0)),
                                  lr=lr, eps=1e-6)
    schedule = WarmupLinearSchedule(optimizer, steps, steps // 10)
    step, epoch = 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        for batch in loader:
            batch = batch.to("cpu", torch.float32)
            loss, _ = family.loss(family.forward(model, batch), batch)
            schedule.step()
            optimizer.zero_grad()
            (2.0 * loss).backward()  # the VQA loss scale of 12-in-1 (lr 4e-5 / 2e-5)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    model.eval()
    score = evaluate_task(model, family, EvalLoader(family, "minval", data, rank=0, world_size=1, micro_batch_size=48),
                          "cpu").result()["score"]
    print(f"synthetic VQA minval: {score:.3f} after {steps} updates; text-only baseline {baseline:.3f}")
    assert 0.4 < baseline < 0.7  # half the questions need the image
    assert score > baseline + 0.1
