"""A real English text corpus that ships offline with Python itself.

Calibration (static quantization), pruning importance, distillation and the fidelity
report all need real sentences that were not written for this project. Two sources ship
with every CPython install, so nothing is downloaded:

* ``pydoc``: the language reference help topics in :mod:`pydoc_data.topics` (the text of
  ``help("FOR")`` etc., taken from the Python documentation);
* ``docstrings``: the docstrings of the standard library's own modules, classes and
  functions, read with :mod:`ast` from the installed sources (nothing is imported).

Two sources of other domains, for checking that a compressed model holds up outside the
domain it was calibrated on:

* ``licenses``: legal text -- the licence files every installed distribution ships in its
  ``.dist-info`` folder (Apache, BSD, MIT, GPL, PSF...) and CPython's own ``LICENSE.txt``;
* ``datasets``: scientific prose -- the descriptions of scikit-learn's bundled and
  fetchable datasets (``sklearn/datasets/descr/*.rst``: how each was collected, what its
  features measure), when scikit-learn is installed.

Text is split into paragraphs, code-like lines (indented blocks, doctest prompts) are
dropped, paragraphs are split into sentences and filtered to prose of a useful length.
The train / held-out split is a deterministic function of each sentence's text (a keyed
hash), so it does not depend on the order sources are read in and a sentence never lands
on both sides. The exact contents follow the installed Python version; :attr:`Corpus.fingerprint`
names the held-out set so reports can say which one they were measured on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from headrace.client.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("pydoc", "docstrings", "licenses", "datasets")
# The calibration domain: Python's own documentation. "licenses" (legal text) and "datasets"
# (scientific dataset descriptions) are other domains, for out-of-domain fidelity checks.
DEFAULT_SOURCES: tuple[str, ...] = ("pydoc", "docstrings")

# Sentences shorter than this are mostly headings or fragments; longer ones are mostly
# run-on lists that the 128-token window would cut anyway.
MIN_CHARS = 30
MAX_CHARS = 400

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WS = re.compile(r"\s+")
# Skip the standard library's own tests, IDLE and vendored third-party copies: they hold
# test fixtures and generated text rather than prose.
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
_SPLIT_KEY = b"headrace-corpus-split-v1"


@dataclass(frozen=True)
class Corpus:
    """A deterministic split of real sentences.

    Attributes:
        train: sentences for calibration, importance scoring and distillation.
        held_out: sentences only ever used to measure fidelity.
        sources: which sources were read.
        fingerprint: first 16 hex digits of the SHA-256 of the held-out sentences, in order.
    """

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    sources: tuple[str, ...]
    fingerprint: str

    def describe(self) -> dict[str, object]:
        """JSON-able summary for manifests and reports."""
        return {"sources": list(self.sources), "train": len(self.train), "held_out": len(self.held_out),
                "fingerprint": self.fingerprint}


def _paragraphs(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        code_like = (line[:1] in (" ", "\t") and line.startswith(("    ", "\t"))) or stripped.startswith(
            (">>>", "...", "$ ", "%", "#", "|", "+-", "==", "--", "*")
        )
        if not stripped or code_like:
            if block:
                yield " ".join(block)
                block = []
            continue
        block.append(stripped)
    if block:
        yield " ".join(block)


def _is_prose(sentence: str) -> bool:
    if not (MIN_CHARS <= len(sentence) <= MAX_CHARS):
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    if letters / len(sentence) < 0.85:
        return False
    # Identifier soup ("foo_bar(x) -> baz") is code, not prose.
    return sentence.count("_") <= 2 and "()" not in sentence and "::" not in sentence


def split_sentences(text: str) -> list[str]:
    """Split free text into filtered prose sentences (code blocks and fragments dropped)."""
    out: list[str] = []
    for para in _paragraphs(text):
        para = _WS.sub(" ", para).strip()
        for sent in _SENTENCE_END.split(para):
            sent = sent.strip()
            if _is_prose(sent):
                out.append(sent)
    return out


def _pydoc_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _docstring_texts() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError) as e:
            # A few stdlib files are deliberately not valid source for this version.
            log.debug("corpus: skipping %s: %s", path, e)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _license_texts() -> Iterator[str]:
    from importlib import metadata

    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if stdlib.is_file():
        yield stdlib.read_text(encoding="utf-8", errors="replace")
    names = ("license", "licence", "copying", "notice")
    for dist in sorted(metadata.distributions(), key=lambda d: str(d.metadata["Name"] or "")):
        for f in dist.files or ():
            if ".dist-info" in str(f) and Path(str(f)).name.lower().startswith(names):
                try:
                    yield Path(str(dist.locate_file(f))).read_text(encoding="utf-8", errors="replace")
                except OSError as e:
                    log.debug("corpus: skipping %s: %s", f, e)


def _dataset_texts() -> Iterator[str]:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return
    for path in sorted((Path(spec.origin).parent / "datasets" / "descr").glob("*.rst")):
        # reST field lists and tables are code-like lines; prose paragraphs survive the filter.
        yield path.read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=8)
def _sentences(sources: tuple[str, ...]) -> tuple[str, ...]:
    readers = {"pydoc": _pydoc_texts, "docstrings": _docstring_texts, "licenses": _license_texts,
               "datasets": _dataset_texts}
    seen: set[str] = set()
    out: list[str] = []
    for source in sources:
        for text in readers[source]():
            for sent in split_sentences(text):
                if sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return tuple(out)


def _held_out_bucket(sentence: str) -> int:
    digest = hashlib.blake2b(sentence.encode("utf-8"), key=_SPLIT_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000


def load_corpus(sources: Sequence[str] = DEFAULT_SOURCES, held_out_fraction: float = 0.1) -> Corpus:
    """Read, filter, deduplicate and split the offline corpus.

    Args:
        sources: any of ``"pydoc"`` (about 1.5k sentences, instant) and ``"docstrings"``
            (about 10k more, a few seconds to parse the standard library).
        held_out_fraction: share of sentences held out for fidelity, in (0, 1).

    Raises:
        ConfigError: an unknown source, or a fraction outside (0, 1).
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ConfigError(f"corpus sources {list(sources)!r}: choose one or more of {list(SOURCES)}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"held_out_fraction={held_out_fraction}: must be between 0 and 1 (exclusive), e.g. 0.1")
    sentences = _sentences(tuple(sources))
    cut = int(held_out_fraction * 10_000)
    train = tuple(s for s in sentences if _held_out_bucket(s) >= cut)
    held = tuple(s for s in sentences if _held_out_bucket(s) < cut)
    fingerprint = hashlib.sha256("\n".join(held).encode("utf-8")).hexdigest()[:16]
    log.info("corpus: %d train / %d held-out sentences from %s (fingerprint %s)",
             len(train), len(held), list(sources), fingerprint)
    return Corpus(train=train, held_out=held, sources=tuple(sources), fingerprint=fingerprint)


def sample(sentences: Sequence[str], n: int, *, seed: int = 0) -> list[str]:
    """``n`` sentences picked deterministically (by ``seed``) from ``sentences``.

    Returns all of them, in order, when ``n >= len(sentences)``.
    """
    if n >= len(sentences):
        return list(sentences)
    import random

    rng = random.Random(seed)
    return [sentences[i] for i in sorted(rng.sample(range(len(sentences)), n))]


def batched(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    """Consecutive chunks of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
