"""Suite-wide settings: CPU DeepSpeed, offline wandb/HF, and the fixture modules of each area.

Each area keeps its fixtures in tests/fixtures/<area>.py (registered below) so that parallel work
on different areas never edits the same file.
"""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from vilbert_ds.ops import extensions_dir  # noqa: E402

extensions_dir()  # a stable TORCH_EXTENSIONS_DIR for every rank the tests start

pytest_plugins = [
    "fixtures.common",
    "fixtures.model",
    "fixtures.data",
    "fixtures.s3",
    "fixtures.training",
    "fixtures.tasks",
    "fixtures.slurm",
]


@pytest.fixture(autouse=True)
def _restore_environment():
    """A test that starts torch.distributed in-process exports RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, ...; later tests' launchers would inherit them. Put os.environ back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_leaks():
    """A test module that starts a process group in the pytest process (the in-process benches
    share one across their tests) must not hand it to later modules: a rank they fork would
    inherit it and refuse to start its own ("initialize the default process group twice").
    Tear a leftover group (and DeepSpeed's cached backend and groups) down after each module."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    from vilbert_ds.distributed.process_group import forget_deepspeed_groups

    forget_deepspeed_groups()  # also after a test that destroyed its own group
