"""The BERT WordPiece tokenizer of all-MiniLM-L6-v2, via the ``tokenizers`` library.

sentence-transformers truncates all-MiniLM-L6-v2 inputs at ``max_seq_length`` = 256 tokens
(the packaged ``tokenizer.json`` says 128 and pads to a fixed 128; we override both): we
truncate at 256 and pad each batch to its longest member, which is what the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headrace.client.errors import ModelError, ModelNotFoundError
from headrace.client.optional import WORKER, require

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_SEQ_LENGTH = 256
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | Path | None = None, *, max_length: int = MAX_SEQ_LENGTH) -> Tokenizer:
    """Load a ``tokenizers.Tokenizer`` set up for batching: truncation at ``max_length``
    tokens (special tokens included), padding to the longest sequence of each batch.

    Args:
        path: ``tokenizer.json`` or a folder holding it; default: the packaged MiniLM.
        max_length: truncation length in tokens.

    Raises:
        ModelNotFoundError: no tokenizer file there.
        ModelError: the file is not a valid tokenizer.
        MissingDependencyError: tokenizers is not installed (``[worker-cpu]`` / ``[worker-gpu]``).
    """
    Tokenizer = require("tokenizers", WORKER, purpose="text models").Tokenizer

    if path is None:
        from headrace.models.builtin.minilm import default_model_path

        path = default_model_path()
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise ModelNotFoundError(f"no tokenizer file at {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a plain Exception subclass
        raise ModelError(f"cannot load tokenizer {p}: {e}") from e
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")  # length=None: longest
    return tok


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Tokenise ``texts`` into ``(input_ids, attention_mask)``, both int64 ``[B, S]``.

    ``S`` is the longest sequence of the batch (at most the truncation length).
    """
    encs = tokenizer.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def token_count(tokenizer: Tokenizer, text: str) -> int:
    """Tokens ``text`` becomes (after truncation), without padding."""
    enc = tokenizer.encode(text)
    return int(sum(enc.attention_mask))
