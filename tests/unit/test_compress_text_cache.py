"""compress's text encoder tokenises each text once, however often the same texts are fed,
and only a prefix of a very long text, while its ids stay those of tokenising the whole
text and truncating (what the worker feeds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tokenizers")

import headrace.models.tokenizer as tokmod  # noqa: E402
from headrace.models.compress.source import _text_encoder  # noqa: E402

MAX_LENGTH = 32
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


class _Spy:
    """A tokenizer that counts the characters it is asked to tokenise."""

    def __init__(self, tok: Any, seen: list[int]) -> None:
        self._tok, self._seen = tok, seen

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._tok, name)
        if not name.startswith("encode"):
            return attr

        def counted(texts: Any, *a: Any, **kw: Any) -> Any:
            self._seen.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
            return attr(texts, *a, **kw)

        return counted


@pytest.fixture
def encoder(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    from headrace.models.builtin.minilm import default_model_path

    folder = Path(default_model_path())
    seen: list[int] = []
    real = tokmod.load_tokenizer
    monkeypatch.setattr(tokmod, "load_tokenizer", lambda *a, **kw: _Spy(real(*a, **kw), seen))
    repo: Any = SimpleNamespace(file_path=lambda m, f: folder / f)
    manifest: Any = SimpleNamespace(extra={"tokenizer": "tokenizer.json", "max_length": MAX_LENGTH})
    return _text_encoder(repo, manifest, NAMES), seen


def _reference(texts: list[str]) -> list[list[int]]:
    tok = tokmod.load_tokenizer(None, max_length=MAX_LENGTH)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(texts)]


def _rows(feed: Any) -> list[list[int]]:
    return [[int(i) for i, m in zip(ids, mask, strict=True) if m]
            for ids, mask in zip(feed["input_ids"], feed["attention_mask"], strict=True)]


def test_texts_are_tokenised_once_and_long_ones_as_a_prefix(encoder: tuple[Any, list[int]]) -> None:
    encode, seen = encoder
    long = " ".join(f"word{i % 97} and more" for i in range(30_000))  # ~500k characters
    texts = ["A short text.", long, "Another one, a little longer than the first."]
    for _ in range(5):  # compress feeds the same texts again and again
        first = encode(texts)
        encode(texts[:2])
    assert sum(seen) < 20 * MAX_LENGTH * 16, f"tokenised {sum(seen):,} characters for {sum(map(len, texts)):,}"
    assert _rows(first) == _reference(texts)
    assert first["input_ids"].shape == (3, MAX_LENGTH)
    assert set(first) == set(NAMES) and not first["token_type_ids"].any()


def test_prefix_never_changes_the_ids(encoder: tuple[Any, list[int]]) -> None:
    encode, _ = encoder
    texts = [" " * 3000 + "after a long run of blanks " * 40,  # the prefix must grow
             "x" * 5000 + " then words " * 50,  # one huge word
             "\u200b" * 2000 + "zero width first " * 50,
             "plain natural words " * 400]
    assert _rows(encode(texts)) == _reference(texts)
    feed = encode(texts[:1])
    assert np.array_equal(feed["attention_mask"].sum(1), [len(_reference(texts[:1])[0])])
