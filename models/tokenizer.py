"""The BERT WordPiece tokenizer of all-MiniLM-L6-v2, via the ``tokenizers`` library.

sentence-transformers truncates all-MiniLM-L6-v2 inputs at ``max_seq_length`` = 256 tokens
(the packaged ``tokenizer.json`` says 128 and pads to a fixed 128; we override both): we
truncate at 256 and pad each batch to its longest member, which is what the model saw.
"""

from __future__ import annotations

import itertools
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


class PrefixTokenizer:
    """Truncated token ids of texts, what the worker feeds a text model and what compression
    calibrates it on.

    A text longer than ``max_chars`` (``max_length * CHARS_PER_TOKEN``) is tokenised as a
    prefix (the tokens past ``max_length`` are truncated anyway; tokenising the rest would
    only cost time), doubled until its first ``max_length`` tokens provably are those of the
    whole text (see :meth:`_prefix_holds`), so the ids always equal tokenising the whole
    text and truncating: at most about twice the cost of tokenising the whole text, and one
    call for any text with a few words a token. Texts up to ``max_chars`` take the fast
    path unchanged.

    Args:
        path: ``tokenizer.json`` or a folder holding it.
        max_length: truncation length in tokens (special tokens included).
        pad_id: the id rows are padded with; None: the tokenizer's ``[PAD]`` (0 without one).

    Raises:
        ModelNotFoundError / ModelError / MissingDependencyError: as :func:`load_tokenizer`.
    """

    def __init__(self, path: str | Path, max_length: int, pad_id: int | None = None) -> None:
        Tokenizer = require("tokenizers", WORKER, purpose="text models").Tokenizer
        self.max_length = max_length
        self.max_chars = max_length * CHARS_PER_TOKEN
        self._tok = load_tokenizer(path, max_length=max_length)
        self._tok.no_padding()  # padding is done per batch, from the ids (pad_ids)
        # BERT pads with [PAD] (0), RoBERTa with <pad> (1): the manifest's extra.pad_id wins.
        pad = pad_id if pad_id is not None else self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else int(pad)
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

    def ids_of(self, texts: Sequence[str]) -> list[list[int]]:
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


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Token id rows as ``(input_ids, attention_mask)`` int64 ``[B, S]``, S = the longest
    row, shorter rows padded with ``pad_id`` on the right (one vectorised fill, not a numpy
    assignment per row)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    real = np.arange(width) < lengths[:, None]  # row-major: each row's real tokens come first
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return ids, real.astype(np.int64)
