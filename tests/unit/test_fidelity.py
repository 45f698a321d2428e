"""Fidelity metrics: exact values on constructed cases, and cross-checks against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.client.errors import ConfigError
from headrace.models.builtin.corpus import load_corpus, sample, split_sentences
from headrace.models.compress import fidelity as fd


def _emb(n: int = 40, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_identical_embeddings_are_perfect() -> None:
    x = _emb()
    f = fd.embedding_fidelity(x, x * 3.0)  # scale does not matter to cosine
    assert f.mean_cosine == pytest.approx(1.0)
    assert f.min_cosine == pytest.approx(1.0)
    assert f.overlap_at_k == pytest.approx(1.0)
    assert f.spearman == pytest.approx(1.0)
    assert f.k == 10 and f.n == 40


def test_noise_lowers_every_metric_monotonically() -> None:
    x = _emb(n=80)
    rng = np.random.default_rng(1)
    small = fd.embedding_fidelity(x, x + 0.05 * rng.normal(size=x.shape))
    large = fd.embedding_fidelity(x, x + 0.8 * rng.normal(size=x.shape))
    assert 0.99 < small.mean_cosine < 1.0
    assert large.mean_cosine < small.mean_cosine
    assert large.min_cosine < small.min_cosine
    assert large.overlap_at_k < small.overlap_at_k
    assert large.spearman < small.spearman


def test_overlap_counts_shared_neighbours_exactly() -> None:
    # Points on a line: neighbours of each point are its closest positions. Reversing the
    # direction of every vector changes nothing; a random permutation of rows does.
    x = _emb(n=12, d=4, seed=3)
    assert fd.overlap_at_k(x, x, k=3) == 1.0
    perm = np.random.default_rng(0).permutation(12)
    assert fd.overlap_at_k(x, x[perm], k=3) < 1.0


def test_spearman_matches_scipy_including_ties() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5])
    b = np.array([2.0, 1.0, 4.0, 3.0, 7.0, 6.0, 6.0, 0.0])
    assert fd.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=3, max_value=30), st.integers(min_value=0, max_value=10_000))
def test_pairwise_spearman_is_a_correlation(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    r = fd.pairwise_spearman(a, b)
    assert -1.0 - 1e-9 <= r <= 1.0 + 1e-9
    assert fd.pairwise_spearman(a, a) == pytest.approx(1.0)


def test_shape_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="same shape"):
        fd.embedding_fidelity(_emb(n=5), _emb(n=6))
    with pytest.raises(ConfigError, match="at least 2"):
        fd.embedding_fidelity(_emb(n=1), _emb(n=1))
    with pytest.raises(ConfigError, match="k="):
        fd.overlap_at_k(_emb(n=5), _emb(n=5), k=5)


def test_small_samples_clip_k() -> None:
    f = fd.embedding_fidelity(_emb(n=6), _emb(n=6))
    assert f.k == 5


def test_classifier_fidelity() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.1, 0.2]])
    labels = np.array([0, 1, 1, 1])
    teacher = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.3, 0.2]])
    f = fd.classifier_fidelity(logits, labels, teacher)
    assert f.accuracy == pytest.approx(0.75)
    assert f.agreement == pytest.approx(0.75)
    assert f.n == 4
    with pytest.raises(ConfigError):
        fd.classifier_fidelity(logits, labels[:3])


def test_corpus_is_real_deterministic_and_disjoint() -> None:
    a = load_corpus(("pydoc",))
    b = load_corpus(("pydoc",))
    assert a == b
    assert len(a.train) > 500 and len(a.held_out) > 50
    assert not set(a.train) & set(a.held_out)
    assert all(s[0].isupper() and s[-1] in ".!?" for s in a.held_out)
    assert sample(a.train, 10, seed=1) == sample(a.train, 10, seed=1)
    assert len(set(sample(a.train, 10, seed=1))) == 10


def test_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="choose one or more"):
        load_corpus(("wikipedia",))
    with pytest.raises(ConfigError, match="held_out_fraction"):
        load_corpus(("pydoc",), held_out_fraction=1.5)


def test_split_sentences_drops_code() -> None:
    text = (
        "The for statement is used to iterate over the elements of a sequence. It runs once per item.\n"
        "\n"
        "   for x in range(3):\n"
        "       print(x)\n"
        "\n"
        ">>> list(range(3))\n"
        "Short.\n"
    )
    assert split_sentences(text) == [
        "The for statement is used to iterate over the elements of a sequence.",
    ]
