"""Load generators: the Poisson schedule, closed and open loops against fake targets,
the queue-less reference target, settings validation and registry parsing."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from benchmarks.lib.probe import split_overhead
from headrace.client import errors as E
from headrace.client.errors import ConfigError
from headrace.cluster.bench.load import Outcome, RunLimits, closed_loop, open_loop, poisson_schedule
from headrace.cluster.bench.run import BenchSettings
from headrace.cluster.bench.targets import InProcessTarget, Payloads, raw_throughput, tensor_payloads
from headrace.workers.backends.fake import AffineServable, affine_reference


class SleepTarget:
    """Answers after ``delay_s``; request indices listed in ``fail`` raise."""

    name = "sleep"

    def __init__(self, delay_s: float = 0.002, fail: set[int] | None = None) -> None:
        self.delay_s, self.fail = delay_s, fail or set()
        self.calls: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def call(self, index: int, timeout_s: float) -> Outcome:
        self.calls.append(index)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if index in self.fail:
                raise RuntimeError("boom")
            await asyncio.sleep(self.delay_s)
            return Outcome("ok", queue_ms=1.0, infer_ms=0.5, batch_size=1)
        finally:
            self.in_flight -= 1


def test_poisson_schedule_is_seeded_bounded_and_has_the_rate() -> None:
    a = poisson_schedule(2000.0, 5.0, seed=3)
    assert a == poisson_schedule(2000.0, 5.0, seed=3)
    assert a != poisson_schedule(2000.0, 5.0, seed=4)
    assert all(0 <= t < 5.0 for t in a) and a == sorted(a)
    assert len(a) / 5.0 == pytest.approx(2000.0, rel=0.05)
    gaps = np.diff(a)
    assert statistics.mean(gaps) == pytest.approx(1 / 2000.0, rel=0.05)
    # exponential gaps: standard deviation equals the mean
    assert float(np.std(gaps)) == pytest.approx(1 / 2000.0, rel=0.1)
    assert len(poisson_schedule(2000.0, 5.0, max_count=7)) == 7
    with pytest.raises(ConfigError):
        poisson_schedule(0.0, 1.0)
    with pytest.raises(ConfigError):
        poisson_schedule(1.0, -1.0)


def test_run_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        RunLimits(duration_s=0)
    with pytest.raises(ConfigError):
        RunLimits(max_requests=0)
    assert RunLimits(1.0, 0.5).total_s == 1.5


@pytest.mark.timeout(10)
def test_closed_loop_keeps_concurrency_and_counts_failures() -> None:
    target = SleepTarget(fail={3})
    limits = RunLimits(duration_s=0.2, warmup_s=0.05, max_requests=10_000, timeout_s=1.0)
    seen: list[int] = []
    rr = asyncio.run(closed_loop(target, 4, limits, progress=seen.append))
    assert target.max_in_flight == 4
    assert len(rr.samples) == len(target.calls) == sum(seen)
    assert sorted(target.calls) == list(range(len(target.calls)))  # each index once
    failed = [s for s in rr.samples if not s.ok]
    assert [s.status for s in failed] == ["send_error"] and failed[0].code == "RuntimeError"
    assert all(s.e2e_ms is not None and s.e2e_ms >= 1.0 for s in rr.samples if s.ok)
    assert (rr.start_s, rr.end_s) == (0.05, 0.25)


@pytest.mark.timeout(10)
def test_closed_loop_stops_at_max_requests() -> None:
    target = SleepTarget(delay_s=0.0)
    rr = asyncio.run(closed_loop(target, 3, RunLimits(duration_s=5.0, warmup_s=0, max_requests=25)))
    assert len(rr.samples) == 25


@pytest.mark.timeout(30)
def test_open_loop_follows_the_schedule_and_sheds_beyond_max_in_flight() -> None:
    target = SleepTarget(delay_s=0.001)
    # generous bounds: this checks the schedule is followed and the run ends, not its speed
    # (a 1 ms sleep took over a second on a machine at load average 19)
    limits = RunLimits(duration_s=0.3, warmup_s=0.0, max_requests=10_000, timeout_s=10.0)
    t0 = time.perf_counter()
    rr = asyncio.run(open_loop(target, 400.0, limits, seed=1))
    assert time.perf_counter() - t0 < 15.0
    assert len(rr.samples) == len(poisson_schedule(400.0, 0.3, seed=1))
    assert len(rr.lateness_ms) == len(rr.samples) and rr.shed == 0
    assert all(s.ok for s in rr.samples)
    slow = SleepTarget(delay_s=0.25)
    rr = asyncio.run(open_loop(slow, 400.0, RunLimits(0.15, 0.0, 10_000, 2.0), seed=1, max_in_flight=5))
    assert slow.max_in_flight == 5
    assert rr.shed == sum(1 for s in rr.samples if s.status == "shed") > 0


@pytest.mark.timeout(10)
def test_in_process_reference_batches_and_answers() -> None:
    servable = AffineServable(delay_ms=5.0)
    payloads = tensor_payloads([{"name": "x", "dtype": "float32", "shape": [4]}], n=16, seed=2)

    async def go() -> list[Outcome]:
        async with InProcessTarget(servable, payloads, max_batch=8, max_wait_ms=20.0) as target:
            return list(await asyncio.gather(*(target.call(i, 5.0) for i in range(16))))

    outs = asyncio.run(go())
    assert all(o.status == "ok" for o in outs)
    assert sum(len(b) for b in servable.batches) == 16
    assert max(len(b) for b in servable.batches) == 8  # batched, capped at max_batch
    assert all(o.infer_ms is not None and o.infer_ms >= 5.0 for o in outs)
    assert {o.batch_size for o in outs} <= {len(b) for b in servable.batches}


class _StrayNext(AffineServable):
    """Raises StopIteration (a stray ``next()``) on its second call."""

    def infer(self, requests: Any) -> Any:
        if len(self.batches) == 1:
            self.batches.append(list(requests))
            next(iter(()))
        return super().infer(requests)


@pytest.mark.timeout(20)
def test_in_process_reference_fails_a_batch_that_raises_stop_iteration_and_goes_on() -> None:
    # An asyncio future refuses StopIteration: through run_in_executor the batch's callers
    # waited until their own timeout, and the serving loop never took the next batch.
    servable = _StrayNext()
    payloads = tensor_payloads([{"name": "x", "dtype": "float32", "shape": [4]}], n=12, seed=3)

    async def go() -> list[Outcome]:
        async with InProcessTarget(servable, payloads, max_batch=4, max_wait_ms=1.0) as target:
            outs = []
            for start in range(0, 12, 4):
                outs += await asyncio.gather(*(target.call(i, 10.0) for i in range(start, start + 4)))
            return outs

    t0 = time.perf_counter()
    outs = asyncio.run(go())
    assert time.perf_counter() - t0 < 5.0, "nobody waited for a timeout"
    assert [o.status for o in outs] == ["ok"] * 4 + ["error"] * 4 + ["ok"] * 4
    assert {o.code for o in outs[4:8]} == {E.MODEL_ERROR}


def test_raw_throughput_runs_whole_batches() -> None:
    servable = AffineServable()
    payloads = tensor_payloads([{"name": "x", "dtype": "float32", "shape": [4]}], n=10, seed=0)
    r = raw_throughput(servable, payloads, batch=4, seconds=0.01, min_batches=3)
    assert r["batches"] >= 3 and r["rps"] > 0
    assert all(len(b) == 4 for b in servable.batches)  # warm-up + measured, all full
    x = payloads.tensors[0]["x"]
    np.testing.assert_allclose(servable.infer([payloads.request(0)])[0]["y"], affine_reference(x))


def test_payloads() -> None:
    p = tensor_payloads([{"name": "ids", "dtype": "int64", "shape": [-1]}, {"name": "m", "dtype": "bool", "shape": [2]}],
                        n=3, seed=0, dynamic_len=5)
    inputs, text = p.item(4)  # cycled
    assert text is None and inputs is not None
    assert inputs["ids"].shape == (5,) and inputs["ids"].dtype == np.int64 and inputs["m"].dtype == bool
    assert p.describe()["inputs"]["ids"] == {"dtype": "int64", "shape": [5]}
    t = Payloads(texts=("a b", "c"))
    assert t.item(3) == (None, "c") and t.request(1).text == "c"
    with pytest.raises(ConfigError):
        Payloads()
    with pytest.raises(ConfigError):
        tensor_payloads([], n=1)


def test_bench_settings_are_validated_eagerly() -> None:
    s = BenchSettings(model="affine", concurrency=(1, 8), duration_s=1, warmup_s=0)
    assert s.levels == (1.0, 8.0)
    assert BenchSettings(model="m", mode="open", rates_rps=(5.0,)).levels == (5.0,)
    with pytest.raises(ConfigError, match="rates_rps"):
        BenchSettings(model="m", mode="open")
    with pytest.raises(ConfigError, match="mode"):
        BenchSettings(model="m", mode="sideways")
    with pytest.raises(ConfigError, match="max_total_s"):
        BenchSettings(model="m", concurrency=(1, 2, 3), duration_s=600, max_total_s=60)
    with pytest.raises(ConfigError, match="HEADRACE_BENCH_DURATION_S"):
        BenchSettings(model="m", duration_s=0)
    env = {"HEADRACE_BENCH_DURATION_S": "3", "HEADRACE_BENCH_CONCURRENCY": "2,4"}
    s = BenchSettings.from_env(env, model="m")
    assert s.duration_s == 3.0 and s.concurrency == (2, 4)


def test_split_overhead() -> None:
    stamps = {"read": 10.002, "infer0": 10.010, "infer1": 10.030, "commit0": 10.031, "commit1": 10.033}
    parts = split_overhead(10.000, 10.0335, stamps)
    assert parts is not None
    assert parts["wire_in"] == pytest.approx(2.0)
    assert parts["serve"] == pytest.approx(29.0)
    assert parts["infer"] == pytest.approx(20.0)
    assert parts["deliver"] == pytest.approx(2.5)
    assert parts["queue"] == pytest.approx(4.5)
    assert split_overhead(10.0, 10.1, {"read": 10.0}) is None


class CyclicTarget(SleepTarget):
    """Leaves a reference cycle behind per request, so the cyclic collector has work."""

    async def call(self, index: int, timeout_s: float) -> Outcome:
        a: list[object] = []
        a.append(a)
        return await super().call(index, timeout_s)


@pytest.fixture
def thawed() -> Iterator[None]:
    """A heap nobody froze: a worker run in this process earlier (``run_standalone``
    freezes its startup heap) may have left it frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.timeout(10)
def test_runs_freeze_the_generators_heap_and_count_its_collections(thawed: None) -> None:
    """The generator's own collections are reported with the run, and the heap it had
    before (frozen while it runs, so not walked) is thawed afterwards."""
    assert gc.get_freeze_count() == 0
    limits = RunLimits(duration_s=0.3, warmup_s=0.0, max_requests=3_000, timeout_s=1.0)
    frozen_during: list[int] = []

    class Watching(CyclicTarget):
        async def call(self, index: int, timeout_s: float) -> Outcome:
            if index == 0:  # once: gc.get_freeze_count() walks the whole frozen heap
                frozen_during.append(gc.get_freeze_count())
            return await super().call(index, timeout_s)

    rr = asyncio.run(open_loop(Watching(delay_s=0.0), 2000.0, limits, seed=1))
    stats = rr.generator_stats()
    assert frozen_during[0] > 0 and gc.get_freeze_count() == 0
    assert stats["gc_collections"] >= 1 and stats["gc_max_ms"] >= 0.0
    assert stats["gc_total_ms"] >= stats["gc_max_ms"] and "late_p99_ms" in stats
    closed = asyncio.run(closed_loop(CyclicTarget(delay_s=0.0), 4, RunLimits(0.2, 0.0, 2_000, 1.0)))
    assert closed.generator_stats()["gc_collections"] >= 1 and gc.get_freeze_count() == 0


def test_a_run_keeps_a_freeze_the_process_made_itself(thawed: None) -> None:
    gc.freeze()
    before = gc.get_freeze_count()
    asyncio.run(closed_loop(SleepTarget(delay_s=0.0), 2, RunLimits(0.05, 0.0, 50, 1.0)))
    assert gc.get_freeze_count() >= before > 0
