"""Mixed precision: quantize one weight-bearing node at a time to measure what each costs
(:func:`sensitivity_scan`), then keep the most sensitive ones in fp32 -- as few as the
fidelity floor allows, found by doubling then bisection over the ranked list
(:func:`mixed_precision`). Works with any quantizer and any score function."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.models.compress.graph import WeightNode, weight_nodes

log = logging.getLogger(__name__)

# (src, dst, nodes_to_quantize or None for all, nodes_to_exclude) -> None
QuantizeFn = Callable[[Path, Path, Sequence[str] | None, Sequence[str]], None]
# model path -> score, higher is better (mean cosine, accuracy)
ScoreFn = Callable[[Path], float]


@dataclass(frozen=True)
class NodeSensitivity:
    """Score of the model with only ``node`` quantized; ``loss`` = baseline - score."""

    node: str
    op_type: str
    score: float
    loss: float


@dataclass(frozen=True)
class MixedPrecisionResult:
    """Outcome of :func:`mixed_precision`.

    Attributes:
        path: the written model.
        excluded: nodes left in fp32, most sensitive first.
        score: the written model's score on the scan data.
        threshold: the budget it had to meet.
        met: whether it met the budget (False only if even the fp32 baseline does not).
        trials: (number of excluded nodes, score) for every candidate tried.
        sensitivities: the scan, most sensitive first.
    """

    path: Path
    excluded: tuple[str, ...]
    score: float
    threshold: float
    met: bool
    trials: tuple[tuple[int, float], ...] = ()
    sensitivities: tuple[NodeSensitivity, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"excluded": list(self.excluded), "score": self.score, "threshold": self.threshold,
                "met": self.met, "trials": [list(t) for t in self.trials],
                "sensitivities": [s.__dict__ for s in self.sensitivities[:10]]}


def sensitivity_scan(
    src: str | Path,
    quantize: QuantizeFn,
    score: ScoreFn,
    nodes: Sequence[WeightNode],
    *,
    baseline: float | None = None,
    progress: bool = True,
) -> list[NodeSensitivity]:
    """Quantize each node alone and score the result; most sensitive (largest loss) first.

    Cost: one quantization and one scoring per node.

    Args:
        quantize: ``(src, dst, nodes_to_quantize, nodes_to_exclude)``, e.g. a partial of
            :func:`quantize_dynamic_int8`.
        score: higher-is-better score of a model file on scan data.
        baseline: the fp32 model's score (computed if not given).
    """
    from tqdm.auto import tqdm

    src = Path(src)
    base = score(src) if baseline is None else baseline
    out: list[NodeSensitivity] = []
    with tempfile.TemporaryDirectory(prefix="headrace-scan-") as tmp:
        dst = Path(tmp) / "one.onnx"
        for node in tqdm(nodes, desc="sensitivity scan", unit="node", disable=not progress):
            quantize(src, dst, [node.name], ())
            s = score(dst)
            out.append(NodeSensitivity(node.name, node.op_type, s, base - s))
    out.sort(key=lambda x: x.loss, reverse=True)
    return out


def mixed_precision(
    src: str | Path,
    dst: str | Path,
    quantize: QuantizeFn,
    score: ScoreFn,
    threshold: float,
    *,
    nodes: Sequence[WeightNode] | None = None,
    sensitivities: Sequence[NodeSensitivity] | None = None,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Quantize ``src`` to ``dst`` leaving in fp32 the fewest most-sensitive nodes for which
    ``score(model) >= threshold``.

    First the fully quantized model is tried; if it meets the budget no scan is run. Otherwise
    the nodes are ranked by :func:`sensitivity_scan` (unless ``sensitivities`` is given) and
    the number kept in fp32 is found by doubling, then bisection (assumes the score grows as
    more nodes stay fp32, which holds closely in practice).

    Raises:
        ModelError: quantization failed.
    """
    src, dst = Path(src), Path(dst)
    candidates = list(nodes) if nodes is not None else weight_nodes(src)
    trials: list[tuple[int, float]] = []

    def attempt(k: int, ranked: Sequence[NodeSensitivity]) -> float:
        quantize(src, dst, None, [s.node for s in ranked[:k]])
        s = score(dst)
        trials.append((k, s))
        log.info("mixed precision: %d node(s) in fp32 -> score %.5f (budget %.5f)", k, s, threshold)
        return s

    first = attempt(0, [])
    if first >= threshold:
        return MixedPrecisionResult(dst, (), first, threshold, True, tuple(trials), tuple(sensitivities or ()))

    ranked = list(sensitivities) if sensitivities is not None else sensitivity_scan(
        src, quantize, score, candidates, progress=progress)
    scores: dict[int, float] = {0: first}
    hi = _fewest_passing(lambda k: attempt(k, ranked), len(ranked), threshold, scores)
    if hi is None:
        n = len(ranked)
        log.warning("mixed precision: even with every candidate node in fp32 the score %.5f misses %.5f",
                    scores[n], threshold)
        return MixedPrecisionResult(dst, tuple(s.node for s in ranked), scores[n], threshold, False,
                                    tuple(trials), tuple(ranked))
    if trials[-1][0] != hi:  # the file on disk must be the chosen one
        attempt(hi, ranked)
    return MixedPrecisionResult(dst, tuple(s.node for s in ranked[:hi]), scores[hi], threshold, True,
                                tuple(trials), tuple(ranked))


def _fewest_passing(attempt: Callable[[int], float], n: int, threshold: float,
                    scores: dict[int, float]) -> int | None:
    """The smallest k in 1..n with ``attempt(k) >= threshold``, by doubling then bisection
    (``scores`` collects every tried k); None if even ``k = n`` fails."""
    lo, hi, k = 0, None, 1  # lo: largest k known to fail; hi: smallest k known to pass
    while k <= n:
        scores[k] = attempt(k)
        if scores[k] >= threshold:
            hi = k
            break
        lo, k = k, k * 2
    if hi is None:
        if n not in scores:
            scores[n] = attempt(n)
        if scores[n] < threshold:
            return None
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        scores[mid] = attempt(mid)
        lo, hi = (lo, mid) if scores[mid] >= threshold else (mid, hi)
    return hi
