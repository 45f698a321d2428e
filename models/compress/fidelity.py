"""Fidelity of a compressed model against its fp32 teacher.

For an embedding model every metric compares the compressed model's embeddings of the
same held-out sentences with the teacher's:

* ``mean_cosine`` / ``min_cosine``: per-sentence cosine similarity, averaged and worst case;
* ``overlap_at_k``: for each sentence, the share of its ``k`` nearest neighbours (by
  cosine, itself excluded) that the two models agree on, averaged -- what a retrieval user
  would notice;
* ``spearman``: Spearman rank correlation of all pairwise similarities (upper triangle) --
  whether the geometry of the space is kept, not only each point.

For a classifier: ``accuracy`` on labelled test data and ``agreement`` (share of argmax
predictions equal to the teacher's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from headrace.client.errors import ConfigError

FloatArray = npt.NDArray[np.floating[Any]]

# Budgets from the issue: the INT8 model must keep these against the fp32 teacher.
INT8_MIN_MEAN_COSINE = 0.99
INT8_MIN_OVERLAP_AT_10 = 0.90
STUDENT_MIN_MEAN_COSINE = 0.95


@dataclass(frozen=True)
class EmbeddingFidelity:
    """Agreement of a compressed encoder with the teacher on ``n`` held-out sentences."""

    n: int
    mean_cosine: float
    min_cosine: float
    overlap_at_k: float
    k: int
    spearman: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierFidelity:
    """Accuracy on labelled data, and agreement with the teacher's predictions."""

    n: int
    accuracy: float
    agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_pair(teacher: FloatArray, student: FloatArray) -> tuple[FloatArray, FloatArray]:
    t = np.asarray(teacher, dtype=np.float64)
    s = np.asarray(student, dtype=np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise ConfigError(f"fidelity needs two (n, dim) arrays of the same shape, got {t.shape} and {s.shape}")
    if t.shape[0] < 2:
        raise ConfigError(f"fidelity needs at least 2 samples, got {t.shape[0]}")
    return t, s


def _normalise(x: FloatArray) -> FloatArray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norm, 1e-12))


def cosine_per_row(teacher: FloatArray, student: FloatArray) -> FloatArray:
    """Cosine similarity of each row of ``student`` with the same row of ``teacher``.

    Raises:
        ConfigError: shapes differ or are not 2-D with at least 2 rows.
    """
    t, s = _check_pair(teacher, student)
    return np.asarray(np.sum(_normalise(t) * _normalise(s), axis=1))


def _knn(sim: FloatArray, k: int) -> npt.NDArray[np.int64]:
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    # argpartition is O(n) per row; the order inside the top k does not matter for overlap.
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def overlap_at_k(teacher: FloatArray, student: FloatArray, k: int = 10) -> float:
    """Mean share of each sample's ``k`` nearest neighbours (cosine, itself excluded) on
    which both models agree; 1.0 = identical neighbourhoods.

    Raises:
        ConfigError: ``k`` is not in ``[1, n-1]`` or shapes are wrong.
    """
    t, s = _check_pair(teacher, student)
    n = t.shape[0]
    if not 1 <= k <= n - 1:
        raise ConfigError(f"k={k} must be between 1 and n-1={n - 1}; use more samples or a smaller k")
    tn, sn = _normalise(t), _normalise(s)
    nt, ns = _knn(tn @ tn.T, k), _knn(sn @ sn.T, k)
    shared = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(nt, ns, strict=True)]
    return float(np.mean(shared) / k)


def _ranks(x: FloatArray) -> FloatArray:
    """Average ranks (ties share the mean rank), as in Spearman's definition."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    sorted_x = x[order]
    # Tied runs get their mean rank.
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(x)]))
    for a, b in zip(starts, ends, strict=True):
        if b - a > 1:
            ranks[order[a:b]] = (a + b - 1) / 2.0
    return ranks


def spearman(a: FloatArray, b: FloatArray) -> float:
    """Spearman rank correlation of two equally long 1-D arrays (nan if one is constant)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def pairwise_spearman(teacher: FloatArray, student: FloatArray) -> float:
    """Spearman correlation between the two models' pairwise cosine similarities
    (every unordered pair of distinct samples once)."""
    t, s = _check_pair(teacher, student)
    tn, sn = _normalise(t), _normalise(s)
    iu = np.triu_indices(t.shape[0], k=1)
    return spearman((tn @ tn.T)[iu], (sn @ sn.T)[iu])


def embedding_fidelity(teacher: FloatArray, student: FloatArray, k: int = 10) -> EmbeddingFidelity:
    """All embedding metrics at once; ``k`` is clipped to ``n - 1`` for tiny samples.

    Raises:
        ConfigError: shapes differ or fewer than 2 samples.
    """
    t, s = _check_pair(teacher, student)
    k_eff = min(k, t.shape[0] - 1)
    cos = cosine_per_row(t, s)
    return EmbeddingFidelity(
        n=int(t.shape[0]),
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        overlap_at_k=overlap_at_k(t, s, k_eff),
        k=k_eff,
        spearman=pairwise_spearman(t, s),
    )


def classifier_fidelity(
    logits: FloatArray, labels: npt.NDArray[np.integer[Any]], teacher_logits: FloatArray | None = None
) -> ClassifierFidelity:
    """Test accuracy of ``logits`` (n, classes) against ``labels`` (n,), and the share of
    predictions equal to the teacher's (1.0 when no teacher is given).

    Raises:
        ConfigError: shapes do not line up.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ConfigError(f"classifier_fidelity needs logits (n, c) and labels (n,), got {logits.shape}, {labels.shape}")
    pred = logits.argmax(axis=1)
    agreement = 1.0
    if teacher_logits is not None:
        teacher_logits = np.asarray(teacher_logits)
        if teacher_logits.shape != logits.shape:
            raise ConfigError(f"teacher logits {teacher_logits.shape} differ from logits {logits.shape}")
        agreement = float((teacher_logits.argmax(axis=1) == pred).mean())
    return ClassifierFidelity(n=int(len(labels)), accuracy=float((pred == labels).mean()), agreement=agreement)
