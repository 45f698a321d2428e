"""Benchmark statistics: percentiles, latency split, batch distribution, load-point windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from headrace.cluster.bench.stats import (
    LatencySummary,
    Sample,
    batch_distribution,
    mean_batch,
    overhead,
    percentile,
    summarize,
)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = random.Random(7)
    values = [rng.expovariate(0.1) for _ in range(1001)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_ignores_missing_values() -> None:
    s = LatencySummary.of([None, 1.0, 2.0, 3.0, None])
    assert (s.n, s.mean, s.p50, s.max) == (3, 2.0, 2.0, 3.0)
    assert LatencySummary.of([None]) == LatencySummary()


def test_delivery_is_what_is_left_and_never_negative() -> None:
    s = Sample(0.0, 10.0, "ok", queue_ms=2.0, infer_ms=5.0, batch_size=4)
    assert s.delivery_ms == pytest.approx(3.0)
    # queue_ms has a 1 ms resolution; rounding may make the parts exceed the total.
    assert Sample(0.0, 6.5, "ok", queue_ms=2.0, infer_ms=5.0).delivery_ms == 0.0
    assert Sample(0.0, 6.5, "ok").delivery_ms is None
    assert Sample(1.0, 500.0, "ok").done_s == pytest.approx(1.5)
    assert not Sample(1.0, None, "timeout").ok


def test_batch_distribution_counts_batches_not_requests() -> None:
    # Two batches of 4 and one of 1: eight requests report 4, one reports 1.
    dist = batch_distribution([4] * 8 + [1, 0])
    assert dist == {1: 1.0, 4: 2.0}
    assert mean_batch(dist) == pytest.approx(9 / 3)
    assert mean_batch({}) is None


def test_summarize_uses_the_window_for_sends_and_receipts() -> None:
    samples = [
        Sample(0.5, 10.0, "ok", queue_ms=1, infer_ms=5, batch_size=2),   # warm-up: ignored
        Sample(1.0, 10.0, "ok", queue_ms=1, infer_ms=5, batch_size=2),
        Sample(1.5, 20.0, "ok", queue_ms=2, infer_ms=5, batch_size=2),
        Sample(2.0, None, "timeout"),
        Sample(2.5, 30.0, "error", code="model_error"),
        Sample(2.999, 5000.0, "ok", batch_size=1),                       # sent inside, received after
        Sample(3.5, 10.0, "ok"),                                         # after the window
    ]
    p = summarize(samples, label="x", mode="closed", start_s=1.0, end_s=3.0, concurrency=4)
    assert p.sent == 5
    assert p.ok == 3
    assert p.errors == {"timeout": 1, "error:model_error": 1}
    assert p.completed == 3  # 1.01, 1.52, 2.53 received inside; 7.999 is not
    assert p.throughput_rps == pytest.approx(2 / 2.0)
    assert p.achieved_rps == pytest.approx(5 / 2.0)
    assert p.e2e.n == 3 and p.e2e.max == 5000.0
    assert p.queue.p50 == pytest.approx(1.5)
    assert p.batches == {1: 1.0, 2: 1.0}
    doc = p.to_json()
    json.dumps(doc)  # JSON-able
    assert doc["batches"] == {"1": 1.0, "2": 1.0}
    with pytest.raises(ValueError):
        summarize(samples, label="x", mode="closed", start_s=2.0, end_s=2.0)


def test_overhead_is_percentile_difference() -> None:
    a = LatencySummary(n=3, p50=5.0, p90=8.0, p99=10.0)
    b = LatencySummary(n=3, p50=4.0, p90=6.5, p99=7.0)
    assert overhead(a, b) == {"p50": 1.0, "p90": 1.5, "p99": 3.0}
    assert overhead(a, LatencySummary())["p50"] is None


def test_batch_summary_lists_the_most_frequent_sizes() -> None:
    from headrace.cluster.bench.run import batch_summary

    assert batch_summary({1: 2.0, 32: 40.0, 17: 3.0, 5: 1.0}) == "32x40 17x3 1x2"
    assert batch_summary({}) == "-"
