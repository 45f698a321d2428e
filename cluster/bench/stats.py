"""Statistics of a benchmark run: per-request samples in, a JSON-able load-point report out.

Everything here is pure Python (no numpy, no Redis) so the arithmetic is unit-testable.

Latency split of one request (all in ms), from the result's timings:

* queue wait = ``queue_ms``: producer's submit until the worker read the entry off the stream;
* inference = ``infer_ms``: the model run of the batch the request was part of;
* delivery = end-to-end - queue - inference: what is left, i.e. the wait in the worker's
  batcher (for batch-mates or for the model to be free), the result's commit, and the
  client's read of the reply stream.

``queue_ms`` is computed by the worker from two Unix-millisecond stamps, so it has a 1 ms
resolution; the end-to-end latency is measured by the client with ``time.perf_counter``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_TIMEOUT = "timeout"       # no answer before the run's collection deadline
STATUS_SEND_ERROR = "send_error"  # the request could not be submitted (Redis error, queue full)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method); None for no values.

    Raises:
        ValueError: ``q`` outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    frac = pos - lo
    return s[lo] + (s[hi] - s[lo]) * frac


@dataclass(frozen=True)
class Sample:
    """One request as the load generator saw it.

    Attributes:
        sent_s: submit time in seconds since the run started (``perf_counter`` based).
        e2e_ms: submit to result received (ms); None when no result came back.
        status: ``ok``, a wire status (``error``, ``expired``, ``rejected``), ``timeout``
            or ``send_error``.
        code: the wire error code for failures, else empty.
        queue_ms / infer_ms / batch_size: the result's timings (None / 0 when the system
            under test does not report them).
        key: the request id, when the system has one (joins with worker-side probes).
    """

    sent_s: float
    e2e_ms: float | None
    status: str
    code: str = ""
    queue_ms: float | None = None
    infer_ms: float | None = None
    batch_size: int = 0
    key: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK and self.e2e_ms is not None

    @property
    def done_s(self) -> float | None:
        """When the result arrived (s since the run started), None without one."""
        return None if self.e2e_ms is None else self.sent_s + self.e2e_ms / 1000.0

    @property
    def delivery_ms(self) -> float | None:
        """End-to-end minus queue wait minus inference (see module doc); None when the
        timings are missing. Never negative (clock granularity of ``queue_ms``)."""
        if self.e2e_ms is None or self.queue_ms is None or self.infer_ms is None:
            return None
        return max(0.0, self.e2e_ms - self.queue_ms - self.infer_ms)


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of one latency quantity in ms (None when there were no values)."""

    n: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> LatencySummary:
        vs = [float(v) for v in values if v is not None]
        if not vs:
            return cls()
        return cls(n=len(vs), mean=sum(vs) / len(vs), p50=percentile(vs, 50), p90=percentile(vs, 90),
                   p99=percentile(vs, 99), max=max(vs))


def batch_distribution(batch_sizes: Iterable[int]) -> dict[int, float]:
    """How many batches of each size ran, estimated from per-request batch sizes.

    Every request reports the size ``b`` of the batch it ran in, so ``b`` requests report
    each batch of size ``b``: the batch count of size ``b`` is ``requests_with_b / b``
    (exact when the window holds whole batches). Sizes <= 0 (unknown) are ignored.
    """
    counts = Counter(b for b in batch_sizes if b > 0)
    return {b: counts[b] / b for b in sorted(counts)}


def mean_batch(dist: Mapping[int, float]) -> float | None:
    """Mean batch size over batches (not over requests) of a :func:`batch_distribution`."""
    batches = sum(dist.values())
    if batches <= 0:
        return None
    return sum(b * n for b, n in dist.items()) / batches


@dataclass(frozen=True)
class LoadPoint:
    """What one load level produced, over the measurement window (warm-up excluded).

    Attributes:
        label: free text naming the system or setting.
        mode: ``closed`` (``concurrency`` submitters, each waits for its answer) or
            ``open`` (Poisson arrivals at ``offered_rps``).
        window_s: length of the measurement window (s).
        sent: requests submitted inside the window.
        completed: results received inside the window (any status).
        ok: successful results among ``sent``.
        errors: failures among ``sent`` by status/code (``timeout``, ``send_error``, codes).
        throughput_rps: successful results received per second inside the window.
        achieved_rps: requests submitted per second inside the window (open loop: how
            close the generator came to ``offered_rps``).
        e2e / queue / infer / delivery: latency summaries of the ok requests sent inside
            the window (ms).
        batches: batch-size distribution (size -> batches, see :func:`batch_distribution`).
        mean_batch: mean batch size over batches.
    """

    label: str
    mode: str
    window_s: float
    sent: int
    completed: int
    ok: int
    errors: dict[str, int]
    throughput_rps: float
    achieved_rps: float
    e2e: LatencySummary
    queue: LatencySummary
    infer: LatencySummary
    delivery: LatencySummary
    batches: dict[int, float] = field(default_factory=dict)
    mean_batch: float | None = None
    concurrency: int | None = None
    offered_rps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["batches"] = {str(k): round(v, 2) for k, v in self.batches.items()}
        return d


def summarize(samples: Sequence[Sample], *, label: str, mode: str, start_s: float, end_s: float,
              concurrency: int | None = None, offered_rps: float | None = None,
              extra: Mapping[str, Any] | None = None) -> LoadPoint:
    """Reduce the samples of one run to its :class:`LoadPoint` over the window
    ``[start_s, end_s)`` (seconds since the run started).

    Latencies and errors are taken from requests *sent* inside the window; throughput
    counts ok results *received* inside it (what a saturated system delivers per second,
    independent of how long the last requests took).

    Raises:
        ValueError: an empty or inverted window.
    """
    if not end_s > start_s:
        raise ValueError(f"measurement window [{start_s}, {end_s}) is empty")
    window = end_s - start_s
    sent = [s for s in samples if start_s <= s.sent_s < end_s]
    ok = [s for s in sent if s.ok]
    received = [s for s in samples if s.done_s is not None and start_s <= s.done_s < end_s]
    errors: Counter[str] = Counter()
    for s in sent:
        if not s.ok:
            errors[f"{s.status}:{s.code}" if s.code else s.status] += 1
    dist = batch_distribution(s.batch_size for s in ok)
    return LoadPoint(
        label=label, mode=mode, window_s=window, sent=len(sent), completed=len(received),
        ok=len(ok), errors=dict(errors),
        throughput_rps=sum(1 for s in received if s.ok) / window,
        achieved_rps=len(sent) / window,
        e2e=LatencySummary.of(s.e2e_ms for s in ok),
        queue=LatencySummary.of(s.queue_ms for s in ok),
        infer=LatencySummary.of(s.infer_ms for s in ok),
        delivery=LatencySummary.of(s.delivery_ms for s in ok),
        batches=dist, mean_batch=mean_batch(dist), concurrency=concurrency, offered_rps=offered_rps,
        extra=dict(extra or {}),
    )


def overhead(system: LatencySummary, reference: LatencySummary) -> dict[str, float | None]:
    """Latency a system adds over a reference at the same load, per percentile (ms):
    ``system.pXX - reference.pXX``; None where either is missing."""
    out: dict[str, float | None] = {}
    for q in ("p50", "p90", "p99"):
        a, b = getattr(system, q), getattr(reference, q)
        out[q] = None if a is None or b is None else a - b
    return out


def fmt_ms(v: float | None, digits: int = 1) -> str:
    """A latency for tables: ``12.3`` or ``-`` when missing."""
    return "-" if v is None else f"{v:.{digits}f}"


def latency_pair(point: Mapping[str, Any], sep: str = " / ") -> str:
    """``p50<sep>p99`` (ms) of a load point's end-to-end latency, in its JSON form."""
    return f"{fmt_ms(point['e2e']['p50'])}{sep}{fmt_ms(point['e2e']['p99'])}"


def open_level_cells(system: Mapping[str, Any], loads: Sequence[str], sep: str = " / ") -> tuple[list[str], int]:
    """Table cells of a compared system's open-loop levels (``benchmarks/compare.py`` JSON):
    per level its p50/p99, ``overloaded (max N/s)`` when the level was above what the system
    sustained (not run), ``-`` when missing; and the errors of the levels that ran."""
    cells: list[str] = []
    errors = 0
    for lv in loads:
        o = system["open"].get(lv)
        if o is None:
            cells.append("-")
        elif o.get("overloaded"):
            cells.append(f"overloaded (max {o['sustained_rps']:.0f}/s)")
        else:
            cells.append(latency_pair(o, sep))
            errors += sum(o["errors"].values())
    return cells, errors
