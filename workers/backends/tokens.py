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


#: characters of a text first tokenised, per token of ``max_length``: natural text averages
#: 3-6 characters a token, so this prefix nearly always holds the truncated tokens, and a
#: 100,000-character text costs what 16 characters a token do. A prefix that does not hold
#: them for sure (a run of blanks or zero-width characters, one huge word) is doubled until
#: it does, up to the whole text: the cut bounds the cost, never changes the answer.
CHARS_PER_TOKEN = 16

#: characters before the end of a cut prefix whose tokens are not trusted, on top of the
#: longest added token: a normaliser looks at a few neighbouring characters (NFKC
#: composition, final sigma), and an added token cut in half spans several pre-tokens.
CUT_MARGIN_CHARS = 8


class TextEncoder:
    """Tokeniser for a text model: ``count`` for bucketing, ``encode`` for batches.

    A text longer than ``max_chars`` (``max_length * CHARS_PER_TOKEN``) is tokenised as a
    prefix (the tokens past ``max_length`` are truncated anyway; tokenising the rest would
    only cost time), doubled until its first ``max_length`` tokens provably are those of the
    whole text (see :meth:`_prefix_holds`), so the ids always equal tokenising the whole
    text and truncating: at most about twice the cost of tokenising the whole text, and one
    call for any text with a few words a token. Texts up to ``max_chars`` take the fast
    path unchanged.

    Each text is tokenised once: ``count_batch`` (off the event loop, when a read is
    admitted) keeps the token ids it computed (at most ``cache_size`` texts), and ``encode``
    (in the inference thread) takes them back instead of tokenising the batch again. A text
    twice in one read, or counted again before its batch ran, is tokenised once; texts never
    counted (or evicted) are tokenised in ``encode``.
    """

    def __init__(self, tokenizer_path: Path, max_length: int, cache_size: int = 8192,
                 pad_id: int | None = None) -> None:
        from headrace.client.optional import WORKER, require
        from headrace.models.tokenizer import load_tokenizer

        Tokenizer = require("tokenizers", WORKER, purpose="text models").Tokenizer
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
        # Long texts: tokenised without truncation (every token of the prefix, with word
        # ids and offsets, to tell whether the cut could have changed the kept ones), then
        # truncated and given their special tokens by self._tok.post_process.
        self._untruncated = Tokenizer.from_str(self._tok.to_str())
        self._untruncated.no_truncation()
        added = self._tok.get_added_tokens_decoder().values()
        self._cut_margin = max((len(a.content) for a in added), default=0) + CUT_MARGIN_CHARS

    def _tokenise(self, texts: list[str]) -> list[Any]:
        """The tokenizer's encodings of ``texts`` (rayon-parallel, without the GIL).

        Texts shorter than ``max_chars`` (the hot path): truncated at ``max_length``, by
        ``encode_batch_fast`` where the library has it (the same ids without character
        offsets, which they do not need), else ``encode_batch``. Texts of ``max_chars`` or
        more (cut prefixes): not truncated and without special tokens, with word ids and
        offsets, for :meth:`_prefix_holds` and ``post_process``.
        """
        long = [i for i, t in enumerate(texts) if len(t) >= self.max_chars]
        fast = getattr(self._tok, "encode_batch_fast", None)
        if not long:
            return list(fast(texts) if fast is not None else self._tok.encode_batch(texts))
        out: list[Any] = list(self._untruncated.encode_batch([texts[i] for i in long], add_special_tokens=False))
        if len(long) == len(texts):
            return out
        is_long = set(long)
        short = [t for i, t in enumerate(texts) if i not in is_long]
        encs = iter(fast(short) if fast is not None else self._tok.encode_batch(short))
        longs = iter(out)
        return [next(longs) if i in is_long else next(encs) for i in range(len(texts))]

    def _prefix_holds(self, enc: Any, prefix: str) -> bool:
        """Whether the first ``max_length`` tokens of ``prefix`` (``enc``: its untruncated
        encoding, without special tokens) are those of any text it begins.

        They are when they all come before the prefix's last pre-token (the word the cut
        may have split: WordPiece, BPE and Unigram tokenise each pre-token on its own) and
        end ``_cut_margin`` characters before the cut, and before the blanks there (an
        added token cut in half spans several pre-tokens; a normaliser reads its
        neighbours; a run of blanks is one pre-token whose tokens depend on its length, and
        an ``lstrip`` added token after it swallows it). A tokenizer without pre-tokenizer
        (the whole text one word) never holds: its texts are tokenised whole.
        """
        n = self.max_length  # >= the content tokens truncation keeps (specials come on top)
        words = enc.word_ids
        if len(words) <= n:
            return False
        last_word = words[-1]
        if last_word is None or any(w is None or w >= last_word for w in words[:n]):
            return False
        # str.isspace is a superset of the tokenizers' whitespace: this strips at least the
        # blanks they would make a pre-token of.
        limit = len(prefix[:max(len(prefix) - self._cut_margin, 0)].rstrip())
        return max(end for _, end in enc.offsets[:n]) <= limit

    def _ids_of(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (special tokens included, truncated at ``max_length``),
        equal to tokenising the whole text and truncating: one batch call for all the
        texts (each long one cut to ``max_chars``), and one more per doubling of the
        prefixes that did not hold."""
        cuts = [t[:self.max_chars] for t in texts]
        encs = self._tokenise(cuts)
        rows: list[list[int]] = [enc.ids for enc in encs]  # short texts: final as they are
        todo = {i: (cut, enc) for i, (cut, enc) in enumerate(zip(cuts, encs, strict=True))
                if len(cut) >= self.max_chars}
        while todo:
            again: dict[int, str] = {}
            for i, (cut, enc) in todo.items():
                if len(cut) < len(texts[i]) and not self._prefix_holds(enc, cut):
                    again[i] = texts[i][:2 * len(cut)]  # up to the whole text, which always holds
                else:
                    rows[i] = self._tok.post_process(enc).ids  # truncated, specials added
            longer = self._tokenise(list(again.values())) if again else []
            todo = {i: (cut, enc) for (i, cut), enc in zip(again.items(), longer, strict=True)}
        return rows

    def encode(self, texts: Sequence[str]) -> tuple[Array, Array]:
        """``(input_ids, attention_mask)`` int64 ``[B, S]``, S = longest (<= max_length),
        padded with ``[PAD]`` exactly as the tokenizer's own batch padding does."""
        with self._lock:  # a text twice in the batch takes its kept ids once
            kept = {t: ids for t in dict.fromkeys(texts) if (ids := self._counted.pop(t, None)) is not None}
        rows: list[list[int] | None] = [kept.get(t) for t in texts]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            for i, ids in zip(missing, self._ids_of([texts[i] for i in missing]), strict=True):
                rows[i] = ids
        return pad_rows([r for r in rows if r is not None], self._pad_id)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (after truncation, special tokens included), the texts not
        cached yet tokenised by one batch call (the tokenizer's own thread pool,
        without the GIL), each distinct text once; keeps the ids for the ``encode`` that
        follows."""
        with self._lock:
            known = [self._counted.get(t) for t in texts]
        new = list(dict.fromkeys(t for t, ids in zip(texts, known, strict=True) if ids is None))
        fresh = dict(zip(new, self._ids_of(new) if new else [], strict=True))
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
