"""DeepSpeed's JIT-built ops: one stable build directory, built once, never raced.

DeepSpeed compiles its C++/CUDA ops (FusedAdam, CPUAdam, ...) on first use, which takes 1-5
minutes. `TORCH_EXTENSIONS_DIR` defaults here to a per-machine cache keyed by the torch and
DeepSpeed versions, so later runs reuse the build. `ensure_ops()` takes an exclusive file lock
before loading: the first process builds, the others wait and then load the finished build.

    python -m vilbert_ds.ops build      # build ahead of a launch (the test command does this)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

# ShareMemCommBuilder: DeepSpeed's comm layer loads it on the CPU accelerator at every
# init_distributed, whatever the optimizer; unbuilt, the ranks of the first launch race to build it.
DEFAULT_OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder")


def extensions_dir() -> Path:
    """Sets TORCH_EXTENSIONS_DIR if unset and returns it."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch

    try:
        from importlib.metadata import version

        ds_version = version("deepspeed")
    except Exception:  # noqa: BLE001 - metadata missing in odd installs
        ds_version = "unknown"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = cache / "vilbert-ds" / "torch_extensions" / f"torch{torch.__version__}-ds{ds_version}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


@contextlib.contextmanager
def build_lock(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".vilbert-ds.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_ops(names: tuple[str, ...] = DEFAULT_OPS, verbose: bool = False) -> dict[str, float]:
    """Build (or load from the cache) the named DeepSpeed ops for the current accelerator.

    Returns seconds spent per op. Ops the accelerator has no builder for are skipped."""
    directory = extensions_dir()
    from deepspeed.accelerator import get_accelerator

    spent: dict[str, float] = {}
    with build_lock(directory):
        for name in names:
            try:
                builder = get_accelerator().create_op_builder(name)
            except Exception:  # noqa: BLE001 - accelerator without such an op
                builder = None
            if builder is None:
                continue
            start = time.perf_counter()
            builder.load(verbose=verbose)
            spent[name] = time.perf_counter() - start
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vilbert_ds.ops", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "where"])
    parser.add_argument("--ops", nargs="*", default=list(DEFAULT_OPS))
    args = parser.parse_args(argv)
    if args.action == "where":
        print(extensions_dir())
        return 0
    spent = ensure_ops(tuple(args.ops), verbose=False)
    for name, seconds in spent.items():
        print(f"{name}: ready in {seconds:.1f}s ({extensions_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
