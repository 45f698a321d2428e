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


# --- any model: metrics chosen by output kind -------------------------------------------------

KINDS = ("classification", "binary", "embedding", "other")
#: Least range (max - min) of a [0, 1] output on the held-out data for it to be taken as a
#: probability (judged by agreement at 0.5) rather than a value (judged by its error).
BINARY_MIN_RANGE = 0.5


@dataclass(frozen=True)
class ErrorFidelity:
    """Elementwise error of any float output against the reference.

    ``rel_error`` is ``mean|d| / mean|ref|`` (robust where single reference values are ~0);
    ``max_rel_error`` is ``max|d| / max|ref|``; ``spread_error`` is ``mean|d|`` over the
    reference's spread between samples, ``mean|ref - mean(ref)|`` (its magnitude where it
    does not vary); ``score`` is ``1 - spread_error`` clipped to [0, 1]. The spread, not the
    magnitude: an output of 1000 +- 0.02 that comes back 0.06 off is ruined, though the error
    is 0.006 % of its size.
    """

    n: int
    max_abs_error: float
    mean_abs_error: float
    rel_error: float
    max_rel_error: float
    spread_error: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_fidelity(reference: FloatArray, output: FloatArray) -> ErrorFidelity:
    """Elementwise errors of ``output`` against ``reference`` (same shape, any rank).

    Raises:
        ConfigError: the shapes differ or the arrays are empty.
    """
    r = np.asarray(reference, dtype=np.float64)
    o = np.asarray(output, dtype=np.float64)
    if r.shape != o.shape or r.size == 0:
        raise ConfigError(f"error fidelity needs two non-empty arrays of one shape, got {r.shape} and {o.shape}")
    d = np.abs(r - o)
    ref_mean, ref_max = float(np.abs(r).mean()), float(np.abs(r).max())
    rel = float(d.mean() / ref_mean) if ref_mean > 0 else float(d.mean() > 0)
    max_rel = float(d.max() / ref_max) if ref_max > 0 else float(d.max() > 0)
    spread = float(np.abs(r - r.mean(axis=0)).mean()) if r.ndim and r.shape[0] > 1 else 0.0
    scale = spread if spread > 1e-6 * ref_mean else ref_mean  # a constant output: its size
    by_spread = float(d.mean() / scale) if scale > 0 else float(d.mean() > 0)
    return ErrorFidelity(n=int(r.shape[0]) if r.ndim else 1, max_abs_error=float(d.max()),
                         mean_abs_error=float(d.mean()), rel_error=rel, max_rel_error=max_rel,
                         spread_error=by_spread, score=float(min(1.0, max(0.0, 1.0 - by_spread))))


def infer_kind(name: str, reference: np.ndarray[Any, Any], postprocess: str = "none") -> str:
    """The output kind that picks the fidelity metrics, guessed from the output's name, the
    manifest's post-processing and the fp32 values (pass ``kind`` explicitly to override).

    * integer and string outputs (labels), and ``[n, c]`` outputs named like logits/probabilities/scores, or with
      ``softmax``/``argmax`` post-processing, or with 2 <= c <= 32: ``classification``;
    * ``[n]`` / ``[n, 1]`` floats inside [0, 1] spread over at least half of it: ``binary`` (a
      probability, e.g. a detector). Values in a narrow band (a regressor around 0.5) are
      ``other``: agreement at 0.5 would let errors many times their spread pass;
    * ``[n, d]`` floats with ``l2_normalize`` post-processing, an embedding-like name, or d > 32:
      ``embedding``;
    * anything else: ``other``.
    """
    ref = np.asarray(reference)
    lname = name.lower()
    if ref.dtype.kind in "iubOU":
        return "classification"
    flat = ref.reshape(ref.shape[0], -1) if ref.ndim >= 1 and ref.shape[0] else ref
    if ref.ndim in (1, 2) and flat.shape[-1] == 1 and ref.size and float(ref.min()) >= 0.0 \
            and float(ref.max()) <= 1.0:
        return "binary" if float(ref.max()) - float(ref.min()) >= BINARY_MIN_RANGE - 1e-9 else "other"
    if ref.ndim != 2:
        return "other"
    c = ref.shape[1]
    if postprocess in ("softmax", "argmax") or any(k in lname for k in ("logit", "prob", "score", "class")):
        return "classification"
    if postprocess == "l2_normalize" or any(k in lname for k in ("embed", "pool", "sentence", "hidden")):
        return "embedding"
    if 2 <= c <= 32:
        return "classification"
    return "embedding" if c > 32 else "other"


def labels_of(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Class predictions of a classification output: argmax of scores, or the labels themselves
    (integers or strings)."""
    v = np.asarray(values)
    if v.dtype.kind in "iubOU":
        return v.reshape(len(v), -1)[:, 0] if v.ndim > 1 else v
    return np.asarray(v.reshape(len(v), -1).argmax(axis=1))


def fidelity_for(kind: str, reference: np.ndarray[Any, Any], output: np.ndarray[Any, Any],
                 labels: np.ndarray[Any, Any] | None = None) -> dict[str, float]:
    """The metrics of ``kind`` for one output, plus ``score``: the figure ``--min-fidelity`` is
    held to (classification and binary: top-1 agreement; embedding: mean cosine; other:
    ``1 - mean|d| / mean|ref - mean(ref)|``, see :class:`ErrorFidelity`).

    Raises:
        ConfigError: an unknown kind, or shapes that do not line up.
    """
    if kind not in KINDS:
        raise ConfigError(f"output kind {kind!r}: choose one of {list(KINDS)}")
    ref, out = np.asarray(reference), np.asarray(output)
    if ref.shape != out.shape:
        raise ConfigError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    if kind != "classification" and (ref.dtype.kind in "OU" or out.dtype.kind in "OU"):
        raise ConfigError(f"a string output (labels) is judged by agreement only: its kind must be classification, "
                          f"not {kind!r}")
    if kind == "embedding":
        e = embedding_fidelity(ref.reshape(len(ref), -1), out.reshape(len(out), -1))
        return {**e.to_dict(), "score": e.mean_cosine}
    if kind == "classification":
        pr, po = labels_of(ref), labels_of(out)
        d: dict[str, float] = {"n": float(len(pr)), "agreement": float((pr == po).mean())}
        if labels is not None and len(labels) == len(po):
            d["accuracy"] = float((po == np.asarray(labels).reshape(-1)).mean())
            d["reference_accuracy"] = float((pr == np.asarray(labels).reshape(-1)).mean())
        if out.dtype.kind == "f":
            d.update({k: v for k, v in error_fidelity(ref, out).to_dict().items() if k != "score"})
        return {**d, "score": d["agreement"]}
    err = error_fidelity(ref, out).to_dict()
    if kind == "binary":
        agree = float(((ref.reshape(-1) > 0.5) == (out.reshape(-1) > 0.5)).mean())
        return {**err, "agreement": agree, "score": agree}
    return err
