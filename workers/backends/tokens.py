"""Tokenising for text models: token ids once per text, padded batches, the model's token inputs.

:class:`TextEncoder` tokenises each text once (when its read is admitted) and keeps the ids
for the batch that runs it; :func:`pad_rows` pads a batch of id rows in one vectorised fill;
:func:`text_feed` / :func:`text_inputs_of` map ids and mask onto the token tensors a
BERT-like graph declares.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.models.repository.store import Manifest

Array = np.ndarray[Any, Any]
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


#: characters of a text kept for tokenising, per token of ``max_length``: natural text
#: averages 3-6 characters a token, so the cut never changes the truncated tokens of real
#: text, and a 100,000-character text costs what 16 characters a token do.
CHARS_PER_TOKEN = 16


class TextEncoder:
    """Tokeniser for a text model: ``count`` for bucketing, ``encode`` for batches.

    A text is cut to ``max_length * CHARS_PER_TOKEN`` characters before it is tokenised
    (the tokens past ``max_length`` are truncated anyway; tokenising the rest would only
    cost time).

    Each text is tokenised once: ``count_batch`` (off the event loop, when a read is
    admitted) keeps the token ids it computed (at most ``cache_size`` texts), and ``encode``
    (in the inference thread) takes them back instead of tokenising the batch again. A text
    twice in one read, or counted again before its batch ran, is tokenised once; texts never
    counted (or evicted) are tokenised in ``encode``.
    """

    def __init__(self, tokenizer_path: Path, max_length: int, cache_size: int = 8192,
                 pad_id: int | None = None) -> None:
        from headrace.models.tokenizer import load_tokenizer

        self.max_length = max_length
        self.max_chars = max_length * CHARS_PER_TOKEN
        self._tok = load_tokenizer(tokenizer_path, max_length=max_length)
        self._tok.no_padding()  # padding is done here, per batch, from the ids
        # BERT pads with [PAD] (0), RoBERTa with <pad> (1): the manifest's extra.pad_id wins.
        pad = pad_id if pad_id is not None else self._tok.token_to_id("[PAD]")
        self._pad_id = 0 if pad is None else int(pad)
        # text -> ids counted but not yet encoded. Bounded: a request answered without
        # running (expired, failed check) never comes to take its ids back. Taken by the
        # encode that uses them, so no text's tokens outlive its batch (a benchmark that
        # repeats its texts still tokenises every request, as live traffic does).
        self._counted: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _tokenise(self, texts: list[str]) -> list[Any]:
        """The tokenizer's encodings of ``texts`` (rayon-parallel, without the GIL):
        ``encode_batch_fast`` where the library has it (the same ids without character
        offsets, which nothing here uses), else ``encode_batch``."""
        fast = getattr(self._tok, "encode_batch_fast", None)
        return list(fast(texts) if fast is not None else self._tok.encode_batch(texts))

    def encode(self, texts: Sequence[str]) -> tuple[Array, Array]:
        """``(input_ids, attention_mask)`` int64 ``[B, S]``, S = longest (<= max_length),
        padded with ``[PAD]`` exactly as the tokenizer's own batch padding does."""
        with self._lock:  # a text twice in the batch takes its kept ids once
            kept = {t: ids for t in dict.fromkeys(texts) if (ids := self._counted.pop(t, None)) is not None}
        rows: list[list[int] | None] = [kept.get(t) for t in texts]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            encs = self._tokenise([texts[i][:self.max_chars] for i in missing])
            for i, enc in zip(missing, encs, strict=True):
                rows[i] = enc.ids
        return pad_rows([r for r in rows if r is not None], self._pad_id)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (after truncation, special tokens included), the texts not
        cached yet tokenised by one batch call (the tokenizer's own thread pool,
        without the GIL), each distinct text once; keeps the ids for the ``encode`` that
        follows."""
        with self._lock:
            known = [self._counted.get(t) for t in texts]
        new = list(dict.fromkeys(t for t, ids in zip(texts, known, strict=True) if ids is None))
        encs = self._tokenise([t[:self.max_chars] for t in new]) if new else []
        fresh = dict(zip(new, (enc.ids for enc in encs), strict=True))
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


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Array, Array]:
    """Token id rows as ``(input_ids, attention_mask)`` int64 ``[B, S]``, S = the longest
    row, shorter rows padded with ``pad_id`` on the right (one vectorised fill, not a numpy
    assignment per row)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    real = np.arange(width) < lengths[:, None]  # row-major: each row's real tokens come first
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return ids, real.astype(np.int64)


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
