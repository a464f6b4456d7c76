"""Host memory (issue 12 item 5: a rank died of ENOMEM in fork() at an epoch boundary after its
heap had grown to several GB of committed address space): the allocator setting keeps no large
freed block, and over a long run with loader workers on 2 real ranks (deepspeed launcher, gloo)
what each rank and its worker have committed stays flat across many epochs, the worker being the
same process in every epoch.

The figures come from the run itself: at every epoch end each rank's loader reports its
process's committed memory (private writable mappings, `vilbert_ds.hostmem.committed`) and its
worker's (sent with the worker's last batch), with the worker's pid; `VILBERT_DS_LOADER_REPORTS`
makes every rank append these reports to a JSON-lines file (the log shows rank 0's).
"""
from __future__ import annotations

import json
import os

import pytest

from fixtures.training import real_data_section, run_training, write_ds_config, write_train_config

EPOCHS = 12  # reported epochs (the run trains one more; its end is the end of training)
STEPS_PER_EPOCH = 4  # epoch_samples 16 = 2 ranks x micro-batch 2 x 4 steps
RANK_GROWTH_MIB = 256  # the first allocator setting: 4.3 GB committed (a 3.9 GB heap mapping) in epoch 0
WORKER_GROWTH_MIB = 64


def test_a_2gb_block_per_step_leaves_no_heap_behind(python):
    """The allocation pattern that grew a rank's heap by ~2 GB per step under the first setting
    (a DeepSpeed bucket of 5e8 fp32 elements allocated, partly written and freed each step while
    smaller blocks outlive it): under keep_freed_memory() the block goes back to the kernel, and
    no mapping the size of the heap stays committed."""
    import subprocess

    code = (
        "import torch\n"
        "from vilbert_ds.hostmem import committed, keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "keep = []\n"
        "for i in range(8):\n"
        "    bucket = torch.empty(500_000_000); bucket[:1_000_000].fill_(1.0)\n"
        "    keep = keep[-2:] + [[torch.ones(20_000 + 1000 * i) for _ in range(40)]]\n"
        "    del bucket\n"
        "c = committed()\n"
        "print(c.total, c.largest)\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    total, largest = map(int, out.split())
    assert largest < 512 * 2**20 and total < 2**30, (total >> 20, largest >> 20)


@pytest.mark.distributed
@pytest.mark.slow
def test_committed_memory_stays_flat_over_many_epochs_on_two_ranks(tmp_path, synthetic_shards, minilm_dir):
    reports = tmp_path / "reports"
    os.environ["VILBERT_DS_LOADER_REPORTS"] = str(reports)  # restored after the test (conftest)
    data = dict(real_data_section(synthetic_shards.manifest, minilm_dir), epoch_samples=16, num_workers=1)
    cfg = write_train_config(tmp_path / "run.yaml", tmp_path / "run", data=data,
                             model={"config": "tiny", "overrides": {}},
                             train={"total_steps": (EPOCHS + 1) * STEPS_PER_EPOCH, "save_every": 1000})
    # ZeRO-1 with DeepSpeed's default bucket size (5e8 elements, 2 GB fp32 buffers), as the demo's
    # DeepSpeed config had: the allocation pattern that grew the heap without bound before
    ds = write_ds_config(tmp_path / "ds.json", stage=1, micro=2, accumulation=1)
    out = run_training(2, ["--config", str(cfg), "--deepspeed", str(ds)], entry=["-m", "vilbert_ds.pretrain"],
                       timeout=300, log_path=tmp_path / "run.log").stdout

    MiB = 2**20
    for rank in (0, 1):
        path = reports / f"train-rank{rank}.jsonl"
        assert path.exists(), out[-3000:]
        epochs = {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}
        assert sorted(epochs) == list(range(EPOCHS)), f"rank {rank}: epoch reports {sorted(epochs)}"
        pids = {tuple(sorted(r["workers"])) for r in epochs.values()}
        assert len(pids) == 1 and len(next(iter(pids))) == 1, f"rank {rank}: worker pids per epoch {pids}"
        table = {e: (r["committed"] // MiB, r["largest_mapping"] // MiB, *(w // MiB for w in r["workers"].values()))
                 for e, r in epochs.items()}  # MiB: rank committed, its largest mapping, worker committed
        # epoch 0 includes the warm-up (engine buffers, first batches); from then on flat
        committed0, (worker0,) = epochs[1]["committed"], epochs[1]["workers"].values()
        for epoch in range(1, EPOCHS):
            r = epochs[epoch]
            (worker,) = r["workers"].values()
            assert r["committed"] <= committed0 + RANK_GROWTH_MIB * MiB, f"rank {rank} epoch {epoch}: {table}"
            assert r["largest_mapping"] < 1024 * MiB, f"rank {rank} epoch {epoch}: a mapping stayed committed: {table}"
            assert worker <= worker0 + WORKER_GROWTH_MIB * MiB, f"rank {rank} epoch {epoch}: worker: {table}"
