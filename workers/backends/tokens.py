"""Tokenising for text models: token ids once per text, padded batches, the model's token inputs.

:class:`TextEncoder` tokenises each text once (when its read is admitted) and keeps the ids
for the batch that runs it; :func:`pad_rows` pads a batch of id rows in one vectorised fill;
:func:`text_feed` / :func:`text_inputs_of` map ids and mask onto the token tensors a
BERT-like graph declares.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.models.repository.store import Manifest
from headrace.models.tokenizer import PrefixTokenizer
from headrace.models.tokenizer import pad_ids as pad_rows

Array = np.ndarray[Any, Any]
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class TextEncoder(PrefixTokenizer):
    """Tokeniser for a text model: ``count`` for bucketing, ``encode`` for batches; the ids
    are :class:`~headrace.models.tokenizer.PrefixTokenizer`'s (a long text tokenised only as
    far as its kept tokens need), as compression calibrated the model on.

    Each text is tokenised once: ``count_batch`` (off the event loop, when a read is
    admitted) keeps the token ids it computed (at most ``cache_size`` texts), and ``encode``
    (in the inference thread) takes them back instead of tokenising the batch again. A text
    twice in one read, or counted again before its batch ran, is tokenised once; texts never
    counted (or evicted) are tokenised in ``encode``.
    """

    def __init__(self, tokenizer_path: Path, max_length: int, cache_size: int = 8192,
                 pad_id: int | None = None) -> None:
        super().__init__(tokenizer_path, max_length, pad_id)
        # text -> ids counted but not yet encoded. Bounded: a request answered without
        # running (expired, failed check) never comes to take its ids back. Taken by the
        # encode that uses them, so no text's tokens outlive its batch (a benchmark that
        # repeats its texts still tokenises every request, as live traffic does).
        self._counted: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> tuple[Array, Array]:
        """``(input_ids, attention_mask)`` int64 ``[B, S]``, S = longest (<= max_length),
        padded with ``[PAD]`` exactly as the tokenizer's own batch padding does."""
        with self._lock:  # a text twice in the batch takes its kept ids once
            kept = {t: ids for t in dict.fromkeys(texts) if (ids := self._counted.pop(t, None)) is not None}
        rows: list[list[int] | None] = [kept.get(t) for t in texts]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            for i, ids in zip(missing, self.ids_of([texts[i] for i in missing]), strict=True):
                rows[i] = ids
        return pad_rows([r for r in rows if r is not None], self.pad_id)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (after truncation, special tokens included), the texts not
        cached yet tokenised by one batch call (the tokenizer's own thread pool,
        without the GIL), each distinct text once; keeps the ids for the ``encode`` that
        follows."""
        with self._lock:
            known = [self._counted.get(t) for t in texts]
        new = list(dict.fromkeys(t for t, ids in zip(texts, known, strict=True) if ids is None))
        fresh = dict(zip(new, self.ids_of(new) if new else [], strict=True))
        rows = [ids if ids is not None else fresh[t] for t, ids in zip(texts, known, strict=True)]
        with self._lock:
            for t, ids in zip(texts, rows, strict=True):
                self._counted[t] = ids
                self._counted.move_to_end(t)
            while len(self._counted) > self._cache_size:
                self._counted.popitem(last=False)
        return [len(ids) for ids in rows]

    def count(self, text: str) -> int:
        """Tokens of ``text`` after truncation (special tokens included); keeps its ids
        for the ``encode`` that follows."""
        return self.count_batch([text])[0]


def text_encoder(manifest: Manifest, tokenizer_path: Path | None) -> TextEncoder:
    """The tokeniser of a text model (``extra.max_length``, ``extra.pad_id``).

    Raises:
        ModelError: no tokenizer file.
    """
    if tokenizer_path is None:
        raise ModelError(f"{manifest.name}/{manifest.version}: text model without a tokenizer file")
    pad = manifest.extra.get("pad_id")
    return TextEncoder(tokenizer_path, int(manifest.extra.get("max_length", 256)),
                       pad_id=int(pad) if isinstance(pad, int) else None)


def text_feed(ids: Array, mask: Array, wanted: Sequence[str]) -> dict[str, Array]:
    """The model inputs a BERT-like graph declares, from token ids and mask."""
    feed: dict[str, Array] = {}
    for name in wanted:
        if name == "input_ids":
            feed[name] = ids
        elif name == "attention_mask":
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(ids)
        else:
            raise ModelError(f"text model input {name!r} is not one of {TEXT_INPUT_NAMES}")
    return feed


def text_inputs_of(manifest: Manifest) -> tuple[str, ...]:
    """Which token tensors a text model takes (from its signature)."""
    names = tuple(s.name for s in manifest.inputs) or ("input_ids", "attention_mask")
    bad = [n for n in names if n not in TEXT_INPUT_NAMES]
    if bad:
        raise ModelError(f"{manifest.name}: bert_tokenizer models take {TEXT_INPUT_NAMES}, not {bad}")
    return names
