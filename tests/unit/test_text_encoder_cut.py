"""Long texts cut before tokenising (``TextEncoder``, ``CHARS_PER_TOKEN``): the ids always
equal tokenising the whole text and truncating at ``max_length``, also for texts whose
first ``max_length * 16`` characters hold few or no tokens (runs of blanks, newlines,
zero-width spaces) or end inside a huge word; the prefix grows only when it must."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.models.tokenizer import load_tokenizer
from headrace.workers.backends.tokens import TextEncoder

PROBE_TEXTS = [" " * 2000 + "tail words here", "\n" * 1100 + "a real paragraph", "\u200b" * 1500 + " hello"]


def _minilm() -> Path:
    from headrace.models.builtin.minilm import default_model_path

    return Path(default_model_path())


def _byte_level_bpe(folder: Path) -> Path:
    """A RoBERTa-style byte-level BPE (whitespace runs are pre-tokens of their own, their
    tokens depend on the run's length; ``<mask>`` strips the blanks before it)."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    bpe = ByteLevelBPETokenizer()
    corpus = ["the quick brown fox jumps over the lazy dog", "headrace batches requests", "    indented   code",
              "hello world\n\n\n", "aaaa bbbb aaaabbbb"] * 40
    bpe.train_from_iterator(corpus, vocab_size=420, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    path = folder / "tokenizer.json"
    bpe.save(str(path))
    return path


def _whole(path: Path, max_length: int, texts: list[str]) -> list[list[int]]:
    tok = load_tokenizer(path, max_length=max_length)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(texts)]


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [" ", "   ", "\n", "\t", "\u200b", "\u00a0", "hello", "world", "字", "[MASK]", "<mask>", "e\u0301",
              "unaffable", "a" * 130, ",", "quick", "ΣΣ", "'s", "12345", "aaaabbbb"]
    texts = []
    for _ in range(n):
        lead = [rng.choice([" ", "\n", "\u200b", "a", "aaaabbbb "])] * rng.choice([0, 300, 1500, 5000])
        texts.append("".join(lead + [rng.choice(pieces) for _ in range(rng.choice([3, 40, 400, 2500]))]))
    return texts


def _assert_equal_to_whole(enc: TextEncoder, path: Path, texts: list[str]) -> None:
    want = _whole(path, enc.max_length, texts)
    for text, ref in zip(texts, want, strict=True):  # one at a time: a diff names its text
        assert enc.count(text) == len(ref), repr(text[:30])
        ids, _ = enc.encode([text])
        assert ids[0].tolist() == ref, repr(text[:30])
    ids, mask = enc.encode(texts)  # and as one batch, uncounted: the encode path
    for row, m, ref in zip(ids, mask, want, strict=True):
        assert row[:int(m.sum())].tolist() == ref


def test_blank_and_zero_width_runs_keep_the_text_after_them() -> None:
    """The probe's texts: before, the cut kept only the blanks ([CLS] [SEP])."""
    enc = TextEncoder(_minilm(), 64)
    ids, mask = enc.encode(PROBE_TEXTS)
    assert mask.sum(1).tolist() == [5, 5, 3]  # [CLS] tail words here [SEP], ..., [CLS] hello [SEP]
    _assert_equal_to_whole(enc, _minilm(), PROBE_TEXTS)


@pytest.mark.parametrize("tokenizer", ["wordpiece", "byte-level-bpe"])
def test_any_text_tokenises_as_the_whole_text_truncated(tokenizer: str, tmp_path: Path) -> None:
    path = _minilm() if tokenizer == "wordpiece" else _byte_level_bpe(tmp_path)
    for max_length in (16, 64):
        enc = TextEncoder(path, max_length, pad_id=1 if tokenizer != "wordpiece" else None)
        _assert_equal_to_whole(enc, path, PROBE_TEXTS + _random_texts(max_length, 30))


def test_the_prefix_grows_only_when_its_tokens_could_change(tmp_path: Path) -> None:
    """One call of ``max_chars`` characters where the prefix has tokens to spare; doubling
    up to the whole text where it has not (a run of blanks, one huge word)."""
    enc = TextEncoder(_minilm(), 64)
    seen: list[list[int]] = []
    real = enc._tokenise

    def spy(batch: list[str]) -> list[Any]:
        seen.append([len(t) for t in batch])
        return real(batch)

    enc._tokenise = spy  # type: ignore[method-assign]
    prose = "The quick brown fox jumps over the lazy dog. " * 400
    assert enc.count_batch(["short", prose]) == [3, 64] and seen == [[5, enc.max_chars]]
    seen.clear()
    assert enc.count(" " * 3000 + "tail words here") == 5
    assert seen == [[1024], [2048], [3015]]
    seen.clear()
    huge_word = "a" * 50_000  # one pre-token: its cut prefix never holds; [UNK] as a whole
    assert enc.count(huge_word) == 3
    assert seen[-1] == [50_000] and len(seen) == 7
    np.testing.assert_array_equal(enc.encode([huge_word])[0], [_whole(_minilm(), 64, [huge_word])[0]])
