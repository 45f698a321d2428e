"""Multi-sample entries (protocol v1): one entry of N samples, one result with N slots.

Packed with other entries into calls of at most ``max_batch``, split when larger; a bad
sample is refused in its own slot, a sample the model fails on is isolated by bisection
while every other sample (its entry-mates included) is answered; the count is capped."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, Result, decode_result, encode_request, encode_result
from headrace.client.samples import MultiRequest, declared_count
from headrace.workers.backends.fake import AffineServable, LengthServable, affine_reference
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.worker import serve_until

AFF = "headrace:{affine}:reply:t"
LEN = "headrace:{length}:reply:t"



def affine_worker(store: MemoryStore, **kw: object) -> tuple[StreamWorker, AffineServable]:
    sv = AffineServable(poison=kw.pop("poison", None))  # type: ignore[arg-type]
    settings = WorkerSettings(model="affine", **{"max_batch": 8, "max_wait_ms": 20, "block_ms": 5, **kw})  # type: ignore[arg-type]
    return StreamWorker(settings, sv, MemoryBroker(store, "w")), sv


def multi(rid: str, xs: np.ndarray, reply: str = AFF) -> dict[bytes, bytes]:
    return MultiRequest(Envelope(rid, reply), inputs={"x": xs}).encode()


def test_codec_round_trip_and_count_field() -> None:
    fields = MultiRequest(Envelope("m", LEN), texts=["a", "bb"]).encode()
    assert declared_count(fields) == 2
    assert msgpack.unpackb(fields[b"body"]) == {"texts": ["a", "bb"]}
    with pytest.raises(E.DecodeError):
        declared_count({b"n": b"-1"})
    with pytest.raises(E.ProtocolError) as err:
        MultiRequest(Envelope("m", AFF), inputs={"x": np.zeros((2, 4)), "m": np.zeros((3, 4))}).encode()
    assert err.value.code == E.BAD_SHAPE
    slots = (Result("m", "ok", {"y": np.arange(3, dtype=np.float32)}), Result("m", "error", code="bad_value",
                                                                             message="no"))
    back = decode_result(encode_result(Result("m", "ok", samples=slots)))
    assert [s.status for s in back.samples] == ["ok", "error"] and back.samples[1].code == "bad_value"
    np.testing.assert_array_equal(back.samples[0].outputs["y"], np.arange(3, dtype=np.float32))
    assert decode_result(encode_result(Result("s", "ok"))).samples == ()
    # equal output signatures travel as one stacked tensor; mixed ones slot by slot
    same = [Result("m", "ok", {"y": np.full(2, i, np.float32)}) for i in range(3)]
    wire = encode_result(Result("m", "ok", samples=(*same, slots[1])))
    body = msgpack.unpackb(wire[b"body"])
    assert body["stacked"]["y"]["shape"] == [4, 2] and "outputs" not in body["samples"][0]
    back = decode_result(wire)
    assert [float(s.outputs["y"][0]) for s in back.samples[:3]] == [0.0, 1.0, 2.0] and not back.samples[3].outputs
    mixed = decode_result(encode_result(Result("m", "ok", samples=(same[0], Result("m", "ok", {"y": np.ones(5)})))))
    assert [s.outputs["y"].shape for s in mixed.samples] == [(2,), (5,)]
    assert "stacked" not in msgpack.unpackb(encode_result(Result("m", "ok", samples=tuple(mixed.samples)))[b"body"])


@pytest.mark.timeout(20)
async def test_entries_are_packed_and_split_into_calls_of_at_most_max_batch() -> None:
    store = MemoryStore()
    w, sv = affine_worker(store, max_batch=8, preferred_batch=8)
    sizes = {"big": 19, "a": 3, "b": 5, "one": 1}
    data = {rid: np.arange(n * 4, dtype=np.float32).reshape(n, 4) + k for k, (rid, n) in enumerate(sizes.items())}
    with store.lock:
        for rid, xs in data.items():
            if rid == "one":  # an old single-sample producer, unchanged
                store.add(encode_request(Request(Envelope(rid, AFF), inputs={"x": xs[0]})))
            else:
                store.add(multi(rid, xs))
    await serve_until(w, lambda: len(store.results(AFF)) == 4)
    got = {r.request_id: r for r in store.results(AFF)}
    assert all(len(b) <= 8 for b in sv.batches) and sum(len(b) for b in sv.batches) == 28
    assert any(len(set(b)) > 1 for b in sv.batches), "samples of several entries share a call"
    assert got["one"].ok and got["one"].samples == ()
    np.testing.assert_array_equal(got["one"].outputs["y"], affine_reference(data["one"][0]))
    for rid in ("big", "a", "b"):
        res = got[rid]
        assert res.ok and len(res.samples) == sizes[rid]
        assert res.timings.batch_size == max(len(b) for b in sv.batches if rid in b)
        for i, s in enumerate(res.samples):
            assert s.ok, s
            np.testing.assert_array_equal(s.outputs["y"], affine_reference(data[rid][i]))
    assert len(store.pending_ids()) == 0


@pytest.mark.timeout(30)
async def test_a_poison_sample_is_isolated_and_everyone_else_is_answered() -> None:
    store = MemoryStore()
    w, sv = affine_worker(store, max_batch=16, preferred_batch=16, poison=-1.0, max_wait_ms=200)
    xs = np.ones((10, 4), np.float32) * np.arange(10, dtype=np.float32)[:, None]
    xs[6] = -1.0
    with store.lock:
        store.add(multi("p", xs))
        for i in range(6):
            store.add(encode_request(Request(Envelope(f"s{i}", AFF), inputs={"x": np.full(4, 100.0 + i, np.float32)})))
    await serve_until(w, lambda: len(store.results(AFF)) == 7)
    got = {r.request_id: r for r in store.results(AFF)}
    p = got["p"]
    assert p.ok and [s.status for s in p.samples] == ["ok"] * 6 + ["error"] + ["ok"] * 3
    assert p.samples[6].code == E.MODEL_ERROR and "sample 6" in p.samples[6].message
    with pytest.raises(E.InferenceFailed):
        p.samples[6].raise_for_status()
    for i in (0, 9):
        np.testing.assert_array_equal(p.samples[i].outputs["y"], affine_reference(xs[i]))
    assert all(got[f"s{i}"].ok for i in range(6)) and not store.dlq
    assert len(store.pending_ids()) == 0


@pytest.mark.timeout(20)
async def test_bad_samples_are_refused_in_their_slot_alone() -> None:
    store = MemoryStore()
    sv = LengthServable()
    w = StreamWorker(WorkerSettings(model="length", max_batch=4, max_wait_ms=10, block_ms=5), sv,
                     MemoryBroker(store, "w"))
    body = {"texts": ["ok", 7, "x" * 100_001, "fine"]}
    fields = {**MultiRequest(Envelope("t", LEN), texts=["-"]).encode(), b"body": msgpack.packb(body), b"n": b"4"}
    with store.lock:
        store.add(fields)
        store.add(MultiRequest(Envelope("allbad", LEN), texts=["-"]).encode() | {b"body": msgpack.packb(
            {"texts": [1, 2]}), b"n": b"2"})
    await serve_until(w, lambda: len(store.results(LEN)) == 2)
    got = {r.request_id: r for r in store.results(LEN)}
    t = got["t"]
    assert [s.code for s in t.samples] == ["", E.BAD_VALUE, E.PAYLOAD_TOO_LARGE, ""]
    assert int(t.samples[0].outputs["length"][0]) == 2 and int(t.samples[3].outputs["length"][0]) == 4
    assert [s.code for s in got["allbad"].samples] == [E.BAD_VALUE, E.BAD_VALUE]


@pytest.mark.timeout(20)
async def test_entry_wide_faults_get_one_error_result() -> None:
    store = MemoryStore()
    w, _ = affine_worker(store, max_samples_per_entry=4)
    base = multi("x", np.zeros((2, 4), np.float32))
    with store.lock:
        store.add(multi("many", np.zeros((5, 4), np.float32)))
        store.add({**base, b"id": b"count", b"n": b"3"})
        store.add({**base, b"id": b"digits", b"n": b"two"})
        store.add({**base, b"id": b"shape", b"n": b"3", b"body": msgpack.packb(
            {"samples": 3, "inputs": {"x": {"dtype": "float32", "shape": [2, 4], "data": bytes(32)}}})})
        store.add({**base, b"id": b"zero", b"n": b"1", b"body": msgpack.packb({"samples": 0, "inputs": {}})})
    await serve_until(w, lambda: len(store.results(AFF)) == 5)
    got = {r.request_id: (r.status, r.code) for r in store.results(AFF)}
    assert got == {"many": ("error", E.TOO_MANY_SAMPLES), "count": ("error", E.BAD_VALUE),
                   "digits": ("error", E.DECODE_ERROR), "shape": ("error", E.BAD_SHAPE),
                   "zero": ("error", E.BAD_VALUE)}


@pytest.mark.timeout(20)
async def test_an_entry_answered_before_is_not_answered_again() -> None:
    store = MemoryStore()
    w, sv = affine_worker(store)
    with store.lock:
        store.add(multi("d", np.zeros((3, 4), np.float32)))
        store.add(multi("d", np.zeros((3, 4), np.float32)))
    await serve_until(w, lambda: store.undelivered() == 0 and not store.pending_ids())
    assert len(store.results(AFF)) == 1


def test_max_samples_per_entry_is_validated() -> None:
    with pytest.raises(E.ConfigError, match="max_samples_per_entry"):
        WorkerSettings(max_samples_per_entry=0)


@pytest.mark.timeout(20)
async def test_an_oversize_multi_sample_entry_is_dead_lettered_unread_and_its_producer_told() -> None:
    store = MemoryStore()
    settings = WorkerSettings(model="affine", max_batch=8, max_wait_ms=20, block_ms=5, max_payload_bytes=1024,
                              memory_budget_bytes=1 << 20, max_samples_per_entry=8192)
    sv = AffineServable()
    w = StreamWorker(settings, sv, MemoryBroker(store, "w", max_entry_bytes=settings.max_entry_bytes))
    with store.lock:
        store.add(multi("huge", np.ones((8000, 4), np.float32)))  # 128 KB: past 1 KiB + 64 KiB
        store.add(multi("small", np.ones((3, 4), np.float32)))
    await serve_until(w, lambda: len(store.results(AFF)) == 2)
    got = {r.request_id: r for r in store.results(AFF)}
    assert got["huge"].code == E.PAYLOAD_TOO_LARGE and len(store.dlq) == 1
    assert got["small"].ok and len(got["small"].samples) == 3
    assert all(len(b) <= 8 for b in sv.batches) and "huge" not in {rid for b in sv.batches for rid in b}


@pytest.mark.timeout(20)
async def test_a_redelivered_multi_sample_entry_runs_apart_and_is_answered_once() -> None:
    store = MemoryStore()
    with store.lock:
        store.add(multi("again", np.arange(40, dtype=np.float32).reshape(10, 4)))
        store.add(multi("fresh", np.ones((5, 4), np.float32)))
    dead = MemoryBroker(store, "dead")  # a worker that read the first entry and died
    await dead.ensure_group()
    assert len(await dead.read(1, 5)) == 1
    w, sv = affine_worker(store, lease_s=0.1, max_batch=4)
    await serve_until(w, lambda: len(store.results(AFF)) == 2)
    got = {r.request_id: r for r in store.results(AFF)}
    assert [s.ok for s in got["again"].samples] == [True] * 10
    np.testing.assert_array_equal(got["again"].samples[9].outputs["y"], affine_reference(np.arange(36, 40.0)))
    # the redelivered entry's samples ran in calls of their own (at most max_batch each)
    again_calls = [b for b in sv.batches if "again" in b]
    assert all(set(b) == {"again"} and len(b) <= 4 for b in again_calls) and sum(map(len, again_calls)) == 10
    assert not store.pending_ids() and len(store.results(AFF)) == 2


class Liar:
    """An output that claims a wire dtype but is no array."""

    dtype = np.dtype("float32")


class Unencodable(AffineServable):
    """A non-wire dtype for samples of 7 and an object array for 9 (that sample's fault),
    an output no encoder can send for 5 (its entry fails)."""

    def infer(self, requests):  # type: ignore[no-untyped-def]
        out = super().infer(requests)
        for o, r in zip(out, requests, strict=True):
            if bool((r.inputs["x"] == 7).any()):
                o["y"] = o["y"].astype(np.complex64)
            if bool((r.inputs["x"] == 9).any()):
                o["y"] = np.array([object()] * 4, dtype=object)
            if bool((r.inputs["x"] == 5).any()):
                o["y"] = Liar()  # type: ignore[assignment]
        return out


@pytest.mark.timeout(20)
async def test_outputs_that_cannot_be_sent_fail_their_sample_or_entry_and_the_worker_goes_on() -> None:
    store = MemoryStore()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=8, max_wait_ms=20, block_ms=5), Unencodable(),
                     MemoryBroker(store, "w"))
    xs = np.ones((3, 4), np.float32)
    xs[1] = 7.0
    with store.lock:
        store.add(multi("dtype", xs))
        store.add(multi("object", np.full((2, 4), 9.0, np.float32)))
        store.add(multi("liar", np.full((2, 4), 5.0, np.float32)))
        store.add(multi("fine", np.zeros((2, 4), np.float32)))
    await serve_until(w, lambda: len(store.results(AFF)) == 4)
    got = {r.request_id: r for r in store.results(AFF)}
    assert [s.code for s in got["dtype"].samples] == ["", E.MODEL_ERROR, ""]
    assert [s.code for s in got["object"].samples] == [E.MODEL_ERROR] * 2
    assert got["liar"].code == E.MODEL_ERROR and not got["liar"].samples
    assert got["fine"].ok and all(s.ok for s in got["fine"].samples)
