"""The worker loop on the in-memory broker, answering: exactly-once answers, bad input,
foreign reply streams, deadlines, duplicates, poison isolation and dead-lettering, model
failures, and text batched by length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, encode_request, now_ms
from headrace.workers.backends.fake import AffineServable, LengthServable, affine_reference
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from headrace.workers.testing.metrics import InMemoryMetrics
from tests.support.memory_worker import REPLY, affine_fields, by_id, running, settings, wait_for


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
async def test_a_model_raising_stop_iteration_fails_that_request_and_the_worker_answers_the_next() -> None:
    class Exhausted(AffineServable):
        def infer(self, requests: Sequence[Request]) -> list[dict[str, Any]]:
            if any(r.envelope.request_id == "bad" for r in requests):
                next(iter(()))  # a servable's stray next() on an empty iterator
            return super().infer(requests)

    store = MemoryStore()
    # no model-call timeout: before, the call's StopIteration never reached the worker and it waited forever
    w = StreamWorker(settings(lease_s=0.1, max_deliveries=1, infer_timeout_s=0), Exhausted(),
                     MemoryBroker(store, "w1"))
    async with running(w):
        store.add(affine_fields("bad"))
        await wait_for(lambda: len(store.dlq) == 1)
        store.add(affine_fields("good", 3.0))
        await wait_for(lambda: "good" in by_id(store))
        assert w.healthy()
    res = {r.request_id: r for r in store.results(REPLY)}
    assert res["bad"].code == E.MAX_DELIVERIES and "StopIteration" in res["bad"].message
    assert res["good"].ok and float(res["good"].outputs["y"][0]) == 7.0


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
