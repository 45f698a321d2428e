"""The worker loop on the in-memory broker: exactly-once answers, bad input, deadlines,
poison isolation and dead-lettering, lease refresh, outages, drain, reconfigure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, encode_request, now_ms
from headrace.workers.backends.fake import AffineServable, LengthServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from headrace.workers.testing.metrics import InMemoryMetrics

REPLY = "headrace:{affine}:reply:t"


def settings(**kw: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(model="affine", max_batch=8, max_wait_ms=1, block_ms=5, lease_s=0.3,
                                max_deliveries=3, drain_timeout_s=5, trim_interval_s=0.05)
    base.update(kw)
    return WorkerSettings(**base)


def affine_fields(rid: str, value: float = 1.0, **env: Any) -> dict[bytes, bytes]:
    x = np.full(4, value, dtype=np.float32)
    return encode_request(Request(Envelope(rid, env.pop("reply_to", REPLY), **env), inputs={"x": x}))


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(*workers: StreamWorker) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(w.run()) for w in workers]
    try:
        yield
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks)


def by_id(store: MemoryStore, reply: str = REPLY) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in store.results(reply):
        out.setdefault(r.request_id, []).append(r)
    return out


@pytest.mark.timeout(20)
async def test_two_workers_answer_every_request_exactly_once_with_the_right_output() -> None:
    store = MemoryStore()
    metrics = InMemoryMetrics()
    sv1, sv2 = AffineServable(delay_ms=1), AffineServable(delay_ms=1)
    w1 = StreamWorker(settings(), sv1, MemoryBroker(store, "w1"), metrics)
    w2 = StreamWorker(settings(), sv2, MemoryBroker(store, "w2"), metrics)
    n = 400
    async with running(w1, w2):
        for i in range(n):
            store.add(affine_fields(f"r{i}", float(i)))
        await wait_for(lambda: len(store.results(REPLY)) >= n)
    got = by_id(store)
    assert sorted(got) == sorted(f"r{i}" for i in range(n))
    for rid, results in got.items():
        assert len(results) == 1
        np.testing.assert_array_equal(results[0].outputs["y"], affine_reference(np.full(4, float(rid[1:]))))
        assert results[0].ok and results[0].timings.batch_size >= 1
    assert store.pending_ids() == []
    assert metrics.count("ok") == n and sum(metrics.batch_sizes) == n
    assert (sv1.invocations + sv2.invocations) == {f"r{i}": 1 for i in range(n)}
    assert max(metrics.batch_sizes) > 1  # it really batches
    assert len(store.stats) >= 1 and int(store.stats[0][b"ok"]) >= 1


@pytest.mark.timeout(20)
async def test_an_error_result_reports_its_queue_time_when_ts_ms_was_sent() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(store, "w1"))
    sent = now_ms() - 2000  # two seconds in the queue before the worker refuses it
    bad = encode_request(Request(Envelope("late-bad", REPLY, ts_ms=sent), inputs={"x": np.ones(4, np.float64)}))
    async with running(w):
        store.add(bad)
        await wait_for(lambda: len(store.results(REPLY)) == 1)
    [res] = store.results(REPLY)
    assert res.code == E.BAD_DTYPE and 2000 <= res.timings.queue_ms < 60_000


async def test_each_bad_input_gets_its_code_and_good_requests_keep_flowing() -> None:
    store = MemoryStore()
    sv = AffineServable()
    w = StreamWorker(settings(max_payload_bytes=1024), sv, MemoryBroker(store, "w1"))
    good = affine_fields("ok-before")
    cases: dict[str, dict[bytes, bytes]] = {
        "bad-msgpack": {**affine_fields("bad-msgpack"), b"body": b"\xc1\xc1\xc1"},
        "no-body": {k: v for k, v in affine_fields("no-body").items() if k != b"body"},
        "bad-dtype": encode_request(Request(Envelope("bad-dtype", REPLY), inputs={"x": np.ones(4, np.float64)})),
        "bad-shape": encode_request(Request(Envelope("bad-shape", REPLY), inputs={"x": np.ones(5, np.float32)})),
        "nan": affine_fields("nan", float("nan")),
        "inf": affine_fields("inf", float("inf")),
        "too-big": {**affine_fields("too-big"), b"body": msgpack.packb({"text": "x" * 2000})},
        "other-model": affine_fields("other-model", model="minilm"),
        "version-9": {**affine_fields("version-9"), b"v": b"9"},
        "text-input": encode_request(Request(Envelope("text-input", REPLY), text="hello")),
        "bad-deadline": {**affine_fields("bad-deadline"), b"deadline_ms": b"soon"},
    }
    expected = {"bad-msgpack": E.DECODE_ERROR, "no-body": E.MISSING_FIELD, "bad-dtype": E.BAD_DTYPE,
                "bad-shape": E.BAD_SHAPE, "nan": E.BAD_VALUE, "inf": E.BAD_VALUE, "too-big": E.PAYLOAD_TOO_LARGE,
                "other-model": E.UNKNOWN_MODEL, "version-9": E.UNSUPPORTED_VERSION, "text-input": E.BAD_VALUE,
                "bad-deadline": E.DECODE_ERROR}
    unroutable = {b"v": b"1", b"body": b"junk"}  # no id, no reply_to: nobody can be told
    async with running(w):
        store.add(good)
        for fields in cases.values():
            store.add(fields)
        unroutable_id = store.add(unroutable)
        store.add(affine_fields("ok-after", 3.0))
        await wait_for(lambda: len(store.results(REPLY)) >= len(cases) + 2 and len(store.dlq) == 1)
    got = {rid: rs[0] for rid, rs in by_id(store).items()}
    for rid, code in expected.items():
        assert got[rid].status == "error" and got[rid].code == code, (rid, got[rid])
    assert got["ok-before"].ok and got["ok-after"].ok
    np.testing.assert_array_equal(got["ok-after"].outputs["y"], affine_reference(np.full(4, 3.0)))
    assert set(sv.invocations) == {"ok-before", "ok-after"}  # nothing bad reached the model
    dlq_id, dlq_fields = store.dlq[0]
    assert dlq_id == unroutable_id and dlq_fields[b"dlq_code"] == E.MISSING_FIELD.encode()
    assert dlq_fields[b"body"] == b"junk" and int(dlq_fields[b"dlq_deliveries"]) == 1
    assert store.pending_ids() == []


@pytest.mark.timeout(20)
async def test_reply_to_outside_the_models_reply_streams_is_dead_lettered_unanswered() -> None:
    store = MemoryStore()
    sv = AffineServable()
    w = StreamWorker(settings(), sv, MemoryBroker(store, "w1"))
    foreign = ["headrace:{minilm}:requests", "headrace:{affine}:dlq", "elsewhere"]
    async with running(w):
        for i, key in enumerate(foreign):
            store.add(affine_fields(f"f{i}", reply_to=key))
        store.add(affine_fields("fine"))
        await wait_for(lambda: len(store.dlq) == len(foreign) and len(store.results(REPLY)) == 1)
    assert all(not store.results(key) for key in foreign), "nothing may be written to a foreign key"
    assert {f[b"id"] for _, f in store.dlq} == {b"f0", b"f1", b"f2"}
    assert all(f[b"dlq_code"] == E.DECODE_ERROR.encode() for _, f in store.dlq)
    assert not any(rid.startswith("f") and rid != "fine" for rid in sv.invocations)
    assert by_id(store)["fine"][0].ok


@pytest.mark.timeout(20)
async def test_foreign_reply_to_is_answered_when_the_restriction_is_off() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(restrict_reply_to=False), AffineServable(), MemoryBroker(store, "w1"))
    async with running(w):
        store.add(affine_fields("f", reply_to="elsewhere"))
        await wait_for(lambda: len(store.results("elsewhere")) == 1)
    assert store.results("elsewhere")[0].ok and not store.dlq


@pytest.mark.timeout(20)
async def test_expired_request_is_answered_expired_without_running() -> None:
    store = MemoryStore()
    sv = AffineServable()
    w = StreamWorker(settings(), sv, MemoryBroker(store, "w1"))
    async with running(w):
        store.add(affine_fields("late", deadline_ms=now_ms() - 1000))
        store.add(affine_fields("fine", deadline_ms=now_ms() + 60_000))
        await wait_for(lambda: len(store.results(REPLY)) == 2)
    got = {rid: rs[0] for rid, rs in by_id(store).items()}
    assert got["late"].status == "expired" and got["late"].code == E.DEADLINE_EXCEEDED
    assert got["fine"].ok
    assert "late" not in sv.invocations


@pytest.mark.timeout(20)
async def test_resubmitted_request_id_is_answered_once_and_acked() -> None:
    store = MemoryStore()
    sv = AffineServable()
    w = StreamWorker(settings(), sv, MemoryBroker(store, "w1"))
    async with running(w):
        store.add(affine_fields("same", 1.0))
        await wait_for(lambda: len(store.results(REPLY)) == 1)
        second = store.add(affine_fields("same", 2.0))
        await wait_for(lambda: second in store.acked)
    assert len(store.results(REPLY)) == 1
    assert sv.invocations["same"] == 1
    assert w.stats()["duplicates"] == 1


@pytest.mark.timeout(20)
async def test_poison_is_isolated_retried_then_dead_lettered_with_producer_told() -> None:
    store = MemoryStore()
    sv = AffineServable(poison=-1.0)
    metrics = InMemoryMetrics()
    w = StreamWorker(settings(lease_s=0.1, max_deliveries=3, max_wait_ms=20), sv, MemoryBroker(store, "w1"), metrics)
    async with running(w):
        for i in range(3):
            store.add(affine_fields(f"mate{i}", float(i)))
        store.add(affine_fields("poison", -1.0))
        await wait_for(lambda: len(store.results(REPLY)) == 4, timeout_s=8)
    got = {rid: rs[0] for rid, rs in by_id(store).items()}
    assert all(got[f"mate{i}"].ok for i in range(3))
    assert got["poison"].status == "error" and got["poison"].code == E.MAX_DELIVERIES
    assert sv.invocations["poison"] >= 3  # ran on each of its deliveries (batched, then alone)
    assert all(sv.invocations[f"mate{i}"] <= 2 for i in range(3))
    (_, dl), = store.dlq
    assert dl[b"id"] == b"poison" and dl[b"dlq_code"] == E.MODEL_ERROR.encode()
    assert int(dl[b"dlq_deliveries"]) == 3 and b"ModelError" in dl[b"dlq_reason"]
    assert store.pending_ids() == []
    assert metrics.count("error", E.MAX_DELIVERIES) == 1


@pytest.mark.timeout(20)
async def test_entry_of_a_dead_consumer_over_max_deliveries_goes_to_the_dlq_unrun() -> None:
    store = MemoryStore()
    dead = MemoryBroker(store, "dead")
    entry_id = store.add(affine_fields("crashy"))
    await dead.ensure_group()
    assert [e.entry_id for e in await dead.read(10, 0)] == [entry_id]
    store.pel[entry_id].deliveries = 3  # it already killed three workers
    store.pel[entry_id].delivered_at_s -= 10
    sv = AffineServable()
    w = StreamWorker(settings(lease_s=0.1, max_deliveries=3), sv, MemoryBroker(store, "w1"))
    async with running(w):
        await wait_for(lambda: len(store.dlq) == 1)
    (res,) = store.results(REPLY)
    assert res.code == E.MAX_DELIVERIES and "crashy" not in sv.invocations
    assert store.dlq[0][1][b"dlq_deliveries"] == b"4"
    assert store.pending_ids() == []


@pytest.mark.timeout(20)
async def test_long_batch_keeps_its_lease_and_is_not_run_twice() -> None:
    store = MemoryStore()
    slow, other = AffineServable(delay_ms=600), AffineServable()
    s = settings(lease_s=0.15, max_batch=4)
    w_slow = StreamWorker(s, slow, MemoryBroker(store, "slow"))
    async with running(w_slow):
        for i in range(4):
            store.add(affine_fields(f"r{i}"))
        await wait_for(lambda: len(slow.batches) == 1)
        w_other = StreamWorker(s, other, MemoryBroker(store, "other"))
        async with running(w_other):  # claims every lease_s/2 while the slow batch runs 4x the lease
            await wait_for(lambda: len(store.results(REPLY)) == 4)
    assert slow.invocations == {f"r{i}": 1 for i in range(4)}
    assert not other.invocations
    assert len(store.results(REPLY)) == 4


@pytest.mark.timeout(20)
async def test_stop_without_drain_leaves_entries_pending_for_another_worker() -> None:
    store = MemoryStore()
    s = settings(lease_s=0.1)
    first = StreamWorker(s, AffineServable(delay_ms=300), MemoryBroker(store, "first"))
    task = asyncio.ensure_future(first.run())
    for i in range(3):
        store.add(affine_fields(f"r{i}"))
    await wait_for(lambda: len(store.pending_ids("first")) == 3)
    await first.stop(drain=False)  # like a crash: nothing committed
    await task
    assert len(store.pending_ids("first")) == 3 and not store.results(REPLY)
    rescuer_sv = AffineServable()
    rescuer = StreamWorker(s, rescuer_sv, MemoryBroker(store, "rescuer"))
    async with running(rescuer):
        await wait_for(lambda: len(store.results(REPLY)) == 3)
    assert sorted(by_id(store)) == ["r0", "r1", "r2"] and store.pending_ids() == []
    assert all(e == 1 for e in rescuer_sv.invocations.values())


@pytest.mark.timeout(20)
async def test_graceful_stop_finishes_in_flight_work() -> None:
    store = MemoryStore()
    sv = AffineServable(delay_ms=150)
    w = StreamWorker(settings(max_batch=4), sv, MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    for i in range(6):
        store.add(affine_fields(f"r{i}"))
    await wait_for(lambda: len(sv.batches) >= 1)  # mid-batch
    await w.stop(drain=True)
    await task
    assert len(store.results(REPLY)) == 6 and store.pending_ids() == []
    assert "w1" not in store.consumers  # left the group: it owned nothing


@pytest.mark.timeout(20)
async def test_entries_returned_by_a_read_in_progress_at_stop_are_still_run() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(block_ms=400), AffineServable(), MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    await wait_for(lambda: "w1" in store.consumers)  # the reader is inside its blocking read
    stopping = asyncio.ensure_future(w.stop(drain=True))
    await asyncio.sleep(0.01)
    store.add(affine_fields("late-arrival"))  # delivered by that read, after stop() began
    await stopping
    await task
    assert [r.request_id for r in store.results(REPLY)] == ["late-arrival"]
    assert store.pending_ids() == []


@pytest.mark.timeout(20)
async def test_drain_gives_up_after_drain_timeout_when_results_cannot_be_written() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(drain_timeout_s=0.3), AffineServable(delay_ms=100), MemoryBroker(store, "w1"))
    task = asyncio.ensure_future(w.run())
    store.add(affine_fields("r0"))
    await wait_for(lambda: bool(store.pending_ids("w1")))
    store.fail_ops = 10**9  # Redis gone for good: the commit can never succeed
    t0 = time.monotonic()
    await w.stop(drain=True)
    await task
    assert time.monotonic() - t0 < 3.0
    store.fail_ops = 0
    assert store.pending_ids() == [store.pending_ids("w1")[0]]  # still pending: redelivered later
    assert not store.results(REPLY)


@pytest.mark.timeout(20)
async def test_broker_outage_is_ridden_out_and_reported_unhealthy() -> None:
    store = MemoryStore()
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(store, "w1"))
    async with running(w):
        await wait_for(w.healthy)
        store.fail_ops = 12
        store.add(affine_fields("during"))
        await wait_for(lambda: not w.healthy())
        await wait_for(lambda: len(store.results(REPLY)) == 1, timeout_s=10)
        await wait_for(w.healthy)
    assert store.results(REPLY)[0].ok and store.fail_ops == 0


@pytest.mark.timeout(20)
async def test_wrong_output_count_is_treated_as_a_model_failure() -> None:
    class Broken(AffineServable):
        def infer(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
            super().infer(requests)
            return []

    store = MemoryStore()
    w = StreamWorker(settings(lease_s=0.1, max_deliveries=1), Broken(), MemoryBroker(store, "w1"))
    async with running(w):
        store.add(affine_fields("r0"))
        await wait_for(lambda: len(store.dlq) == 1)
    (res,) = store.results(REPLY)
    assert res.code == E.MAX_DELIVERIES and "one output map per request" in res.message


@pytest.mark.timeout(20)
async def test_text_model_batches_by_length_and_answers_each() -> None:
    store = MemoryStore()
    sv = LengthServable()
    w = StreamWorker(settings(model="length", max_batch=16, max_wait_ms=30), sv, MemoryBroker(store, "w1"))
    texts = ["a" * n for n in (1, 2, 3, 2, 1, 900, 3, 2)]
    reply = "headrace:{length}:reply:t"
    async with running(w):
        for i, t in enumerate(texts):
            store.add(encode_request(Request(Envelope(f"t{i}", reply), text=t)))
        await wait_for(lambda: len(store.results(reply)) == len(texts))
    got = {r.request_id: int(r.outputs["length"][0]) for r in store.results(reply)}
    assert got == {f"t{i}": len(t) for i, t in enumerate(texts)}
    long_batch = next(b for b in sv.batches if "t5" in b)
    assert long_batch == ["t5"]  # the 900-char text ran alone, not padding the short ones


async def test_reconfigure_validates_and_applies() -> None:
    w = StreamWorker(settings(), AffineServable(), MemoryBroker(MemoryStore(), "w1"))
    w.reconfigure(max_batch=2, preferred_batch=1, max_wait_ms=0)
    assert (w.stats()["max_batch"], w.stats()["preferred_batch"]) == (2, 1)
    with pytest.raises(E.ConfigError):
        w.reconfigure(max_batch=0)
    with pytest.raises(E.ConfigError, match="cannot reconfigure"):
        w.reconfigure(lease_s=5)


@pytest.mark.timeout(20)
def test_worker_thread_serves_and_stops() -> None:
    store = MemoryStore()
    wt = WorkerThread(settings(), AffineServable(), broker=MemoryBroker(store, "t1")).start(timeout_s=5)
    try:
        store.add(affine_fields("r0", 2.0))
        give_up = time.monotonic() + 5
        while not store.results(REPLY) and time.monotonic() < give_up:
            time.sleep(0.01)
        assert wt.healthy()
        wt.reconfigure(max_batch=3)
        assert wt.stats()["max_batch"] == 3
    finally:
        wt.stop(timeout_s=5)
    assert not wt.alive and not wt.healthy()
    np.testing.assert_array_equal(store.results(REPLY)[0].outputs["y"], affine_reference(np.full(4, 2.0)))


@pytest.mark.timeout(20)
async def test_redelivered_requests_run_alone_and_a_stuck_call_hands_back_the_rest() -> None:
    """Entries a dead worker left behind are suspects: each runs on its own. A model call
    past infer_timeout_s stops the worker; the entries it never ran are handed back with
    their delivery count undone, the stuck one keeps its delivery."""
    store = MemoryStore()
    dead = MemoryBroker(store, "dead")
    await dead.ensure_group()
    ids = [store.add(affine_fields("hang", 13.0))] + [store.add(affine_fields(f"r{i}", float(i))) for i in range(3)]
    assert len(await dead.read(10, 0)) == 4
    for i in ids:
        store.pel[i].delivered_at_s -= 10  # abandoned long ago
    sv = AffineServable(hang=13.0)
    w = StreamWorker(settings(lease_s=0.2, infer_timeout_s=0.2), sv, MemoryBroker(store, "w1"))
    try:
        await asyncio.wait_for(w.run(), 10)  # ends by itself: the stuck call stops it
        assert w.stuck is not None and w.stats()["infer_timeouts"] == 1
        assert sv.batches == [["hang"]]  # alone: no batch-mate was in the stuck call
        assert {store.pel[i].deliveries for i in ids[1:]} == {1}  # handed back: 2 - 1
        assert store.pel[ids[0]].deliveries == 2 and store.pel[ids[0]].consumer == "w1"
    finally:
        sv.unhang()
    rescuer_sv = AffineServable()
    async with running(StreamWorker(settings(lease_s=0.2), rescuer_sv, MemoryBroker(store, "rescuer"))):
        await wait_for(lambda: len(store.results(REPLY)) == 4)
    assert rescuer_sv.batches and all(len(b) == 1 for b in rescuer_sv.batches)
    assert sorted(by_id(store)) == ["hang", "r0", "r1", "r2"] and store.pending_ids() == []


class _Overlap(AffineServable):
    """Counts how many model calls run at the same time."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        import threading

        self._gate = threading.Lock()
        self.now = self.most = 0

    def infer(self, requests: Any) -> Any:
        with self._gate:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().infer(requests)
        finally:
            with self._gate:
                self.now -= 1


@pytest.mark.timeout(20)
async def test_instances_run_batches_side_by_side_and_answer_each_once() -> None:
    store = MemoryStore()
    sv = _Overlap(delay_ms=150)
    w = StreamWorker(settings(max_batch=4, instances=2), sv, MemoryBroker(store, "w1"))
    for i in range(16):
        store.add(affine_fields(f"r{i}", float(i)))
    async with running(w):
        await wait_for(lambda: len(store.results(REPLY)) == 16)
    assert sv.most == 2  # two batches in the model at once, never more
    assert sv.invocations == {f"r{i}": 1 for i in range(16)}
    got = by_id(store)
    assert all(len(v) == 1 for v in got.values()) and len(got) == 16
    np.testing.assert_array_equal(got["r3"][0].outputs["y"], affine_reference(np.full(4, 3.0, np.float32)))
    assert w.stats()["instances"] == 2 and store.pending_ids() == []


def test_instances_need_a_thread_safe_servable() -> None:
    class Unsafe(AffineServable):
        thread_safe = False

    with pytest.raises(E.ConfigError, match="thread-safe"):
        StreamWorker(settings(instances=2), Unsafe(), MemoryBroker(MemoryStore(), "w"))
    with pytest.raises(E.ConfigError, match="instances"):
        settings(instances=0)
