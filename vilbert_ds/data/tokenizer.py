"""The uncased WordPiece tokenizer, one loader for pretraining, tasks and prediction."""
from __future__ import annotations

import inspect
import os


def load_tokenizer(vocab: str | os.PathLike | None = None):
    """Uncased WordPiece `BertTokenizerFast` from a vocab.txt or a tokenizer directory (local
    only). Empty / None: the local vocab of `vilbert_ds.assets.minilm_dir()`, identical to
    bert-base-uncased's."""
    from transformers import BertTokenizerFast

    if not vocab:
        from ..assets import minilm_dir

        vocab = minilm_dir()
    vocab = os.fspath(vocab)
    if os.path.isdir(vocab):
        if os.path.exists(os.path.join(vocab, "tokenizer.json")) or os.path.exists(os.path.join(vocab, "tokenizer_config.json")):
            return BertTokenizerFast.from_pretrained(vocab, local_files_only=True)
        vocab = os.path.join(vocab, "vocab.txt")
    if not os.path.isfile(vocab):
        raise ValueError(f"data.vocab: {vocab} does not exist")
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"  # transformers 5 renamed vocab_file
    return BertTokenizerFast(**{key: vocab}, do_lower_case=True)
