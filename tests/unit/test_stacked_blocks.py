"""Multi-sample tensor entries carried as blocks (one array per input) for servables that run
stacked samples: admission checks the first sample for all and falls back to one request
per sample when any may fail; the batcher weighs and cuts blocks; a failing block is halved
down to the failing sample; stacked outputs are answered without a result per sample; a
servable that only overrides ``infer`` keeps being called per request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, Timings, decode_result, encode_request, now_ms
from headrace.client.results import encode_stacked_result
from headrace.client.samples import MultiRequest
from headrace.workers.backends.base import runs_stacked
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.admission import Admission, Samples
from headrace.workers.engine.batcher import Batcher
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.work import Work, split_work
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.clock import ManualClock
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.worker import serve_until

AFF = "headrace:{affine}:reply:t"


def multi(rid: str, xs: np.ndarray[Any, Any], deadline_ms: int = 0) -> dict[bytes, bytes]:
    return MultiRequest(Envelope(rid, AFF, deadline_ms=deadline_ms), inputs={"x": xs}).encode()



def admitted(servable: AffineServable, xs: np.ndarray[Any, Any]) -> Samples:
    settings = WorkerSettings(model="affine")
    adm = Admission(settings, servable, Answers("affine", "1", "w"), Counter())
    fields = multi("m", xs)
    res = adm.prepare_all([(Entry("1-0", fields), Envelope("m", AFF))], now_ms())[0]
    assert isinstance(res, Samples)
    return res


def test_admission_carries_a_clean_tensor_entry_as_one_block_else_sample_by_sample() -> None:
    xs = np.arange(40, dtype=np.float32).reshape(10, 4)
    res = admitted(AffineServable(), xs)
    [work] = res.works
    assert work.block and work.count == 10 and work.index == 0 and res.group.left == 10
    np.testing.assert_array_equal(work.request.inputs["x"], xs)

    bad = xs.copy()
    bad[3, 1] = np.nan  # may fail its check: every sample goes alone, the NaN one refused in its slot
    res = admitted(AffineServable(), bad)
    assert [w.index for w in res.works] == [0, 1, 2, 4, 5, 6, 7, 8, 9] and not any(w.block for w in res.works)
    assert res.group.slots[3] is not None and res.group.slots[3].code == E.BAD_VALUE

    # the first sample fails the servable's check (shape 3 instead of 4): per sample, each refused
    res = admitted(AffineServable(), np.zeros((4, 3), np.float32))
    assert res.works == [] and res.group.complete
    assert {s.code for s in res.group.slots if s is not None} == {E.BAD_SHAPE}


def block(count: int, index: int = 0) -> Work:
    xs = np.arange(count * 4, dtype=np.float32).reshape(count, 4) + index
    return Work(Entry(f"{index}-0", {}), Request(Envelope("b", AFF), inputs={"x": xs}), 0, 0, None, index, count, True)


def test_split_work_cuts_a_block_into_row_views() -> None:
    w = block(10)
    head, tail = split_work(w, 4)
    assert (head.index, head.count, tail.index, tail.count) == (0, 4, 4, 6)
    assert np.shares_memory(head.request.inputs["x"], w.request.inputs["x"])
    np.testing.assert_array_equal(tail.request.inputs["x"], w.request.inputs["x"][4:])
    with pytest.raises(ValueError):
        split_work(w, 10)


def test_the_batcher_counts_samples_and_cuts_the_block_that_does_not_fit() -> None:
    clock = ManualClock()
    b: Batcher[Work] = Batcher(max_batch=8, preferred_batch=8, max_wait_ms=50, clock=clock, split=split_work)
    b.put(block(5, 0), 0, 5)
    assert len(b) == 5 and b.take_ready() is None  # 5 samples < preferred 8
    b.put(block(7, 100), 0, 7)
    assert len(b) == 12 and b.time_to_ready() == 0.0
    first = b.take()
    assert [(w.index, w.count) for w in first] == [(0, 5), (100, 3)] and len(b) == 4
    second = b.take()
    assert [(w.index, w.count) for w in second] == [(103, 4)] and len(b) == 0

    plain: Batcher[Work] = Batcher(max_batch=4, max_wait_ms=0, clock=clock)  # no split: the oldest goes alone
    plain.put(block(6), 0, 6)
    plain.put(block(1, 50), 0, 1)
    assert [w.count for w in plain.take()] == [6] and [w.count for w in plain.take()] == [1]


@pytest.mark.timeout(20)
async def test_blocks_are_packed_cut_and_answered_from_stacked_outputs() -> None:
    store = MemoryStore()
    sv = AffineServable()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=8, preferred_batch=8, max_wait_ms=20, block_ms=5), sv,
                     MemoryBroker(store, "w"))
    sizes = {"big": 19, "a": 3, "b": 5}
    data = {rid: np.arange(n * 4, dtype=np.float32).reshape(n, 4) + 100 * k for k, (rid, n) in enumerate(sizes.items())}
    with store.lock:
        for rid, xs in data.items():
            store.add(multi(rid, xs))
        store.add(encode_request(Request(Envelope("one", AFF), inputs={"x": np.full(4, 3.0, np.float32)})))
    await serve_until(w, lambda: len(store.results(AFF)) == 4)
    assert all(len(b) <= 8 for b in sv.batches) and sum(len(b) for b in sv.batches) == 28
    assert any(len(set(b)) > 1 for b in sv.batches), "samples of several entries share a call"
    raw = {f[b"id"].decode(): f for _, f in store.replies[AFF]}
    for rid, xs in data.items():
        body = msgpack.unpackb(raw[rid][b"body"])
        assert body["samples"] == [{"status": "ok"}] * len(xs) and body["stacked"]["y"]["shape"] == [len(xs), 4]
        res = decode_result(raw[rid])
        assert res.ok and res.timings.batch_size == max(len(b) for b in sv.batches if rid in b)
        np.testing.assert_array_equal(np.stack([s.outputs["y"] for s in res.samples]), affine_reference(xs))
    np.testing.assert_array_equal(decode_result(raw["one"]).outputs["y"], affine_reference(np.full(4, 3.0)))
    assert len(store.pending_ids()) == 0


@pytest.mark.timeout(30)
async def test_a_poison_sample_in_a_block_is_found_by_halving_and_the_rest_answered() -> None:
    store = MemoryStore()
    sv = AffineServable(poison=-1.0)
    w = StreamWorker(WorkerSettings(model="affine", max_batch=64, preferred_batch=64, max_wait_ms=50, block_ms=5),
                     sv, MemoryBroker(store, "w"))
    xs = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    xs[45] = -1.0
    with store.lock:
        store.add(multi("p", xs))
    await serve_until(w, lambda: len(store.results(AFF)) == 1)
    res = store.results(AFF)[0]
    assert res.ok and [s.status for s in res.samples].count("error") == 1
    assert res.samples[45].code == E.MODEL_ERROR and "sample 45" in res.samples[45].message
    ok = [i for i in range(64) if i != 45]
    np.testing.assert_array_equal(np.stack([res.samples[i].outputs["y"] for i in ok]), affine_reference(xs[ok]))
    assert len(sv.batches) <= 1 + 2 * 6, "halving: two calls per level of a 64-row block"
    assert not store.dlq and len(store.pending_ids()) == 0


class _Capped(AffineServable):
    """An affine model that runs at most 4 samples per call (a manifest's max_batch)."""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_batch": 4}


@pytest.mark.timeout(30)
async def test_calls_are_cut_to_the_models_max_batch_and_timings_say_so() -> None:
    # A model whose manifest says max_batch 4: the worker (max_batch 32) makes calls of at
    # most 4 samples, cutting a 10-sample block across them, and each answer's
    # timings.batch_size is its real call; the registry says 4 as well.
    store = MemoryStore()
    sv = _Capped()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=32, preferred_batch=32, max_wait_ms=50, block_ms=5),
                     sv, MemoryBroker(store, "w"))
    xs = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    with store.lock:
        store.add(multi("block", xs))
        for i in range(3):
            store.add(encode_request(Request(Envelope(f"one{i}", AFF), inputs={"x": np.full(4, i, np.float32)})))
    await serve_until(w, lambda: len(store.results(AFF)) == 4)
    assert sv.batches and max(len(b) for b in sv.batches) <= 4 and sum(len(b) for b in sv.batches) == 13
    by = {r.request_id: r for r in store.results(AFF)}
    np.testing.assert_array_equal(np.stack([s.outputs["y"] for s in by["block"].samples]), affine_reference(xs))
    assert all(by[f"one{i}"].timings.batch_size <= 4 for i in range(3))
    assert by["block"].timings.batch_size <= 4
    assert w.registry_facts()["max_batch"] == 4


@pytest.mark.timeout(30)
async def test_an_entry_of_bad_samples_logs_a_warning_or_two_not_one_per_call(caplog: pytest.LogCaptureFixture) -> None:
    # Every one of 256 samples fails alone: ~500 model calls on the way down. A producer
    # sending such entries must not be able to fill the worker's log with them.
    store = MemoryStore()
    sv = AffineServable(poison=-1.0)
    w = StreamWorker(WorkerSettings(model="affine", max_batch=256, preferred_batch=256, max_wait_ms=50, block_ms=5),
                     sv, MemoryBroker(store, "w"))
    xs = np.full((256, 4), -1.0, np.float32)
    with store.lock:
        store.add(multi("bad", xs))
    with caplog.at_level("WARNING", logger="headrace.workers.engine.inference"):
        await serve_until(w, lambda: len(store.results(AFF)) == 1)
    res = store.results(AFF)[0]
    assert [s.code for s in res.samples] == [E.MODEL_ERROR] * 256
    assert len(sv.batches) >= 256
    warnings = [r for r in caplog.records if r.name == "headrace.workers.engine.inference" and r.levelname == "WARNING"]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]


@pytest.mark.timeout(20)
async def test_a_block_past_its_deadline_is_answered_expired_in_every_slot() -> None:
    store = MemoryStore()
    sv = AffineServable(delay_ms=300)
    w = StreamWorker(WorkerSettings(model="affine", max_batch=4, preferred_batch=4, max_wait_ms=1, block_ms=5), sv,
                     MemoryBroker(store, "w"))
    with store.lock:  # four single samples fill the first (300 ms) call; the block waits behind them
        for i in range(4):
            store.add(encode_request(Request(Envelope(f"slow{i}", AFF), inputs={"x": np.zeros(4, np.float32)})))
        store.add(multi("late", np.ones((6, 4), np.float32), deadline_ms=now_ms() + 150))
    await serve_until(w, lambda: len(store.results(AFF)) == 5)
    late = {r.request_id: r for r in store.results(AFF)}["late"]
    assert [s.status for s in late.samples] == ["expired"] * 6
    assert {s.code for s in late.samples} == {E.DEADLINE_EXCEEDED}


class NonWire(AffineServable):
    """Runs stacked; any row of 7 turns the call's whole output complex (not a wire dtype);
    a row of 5 makes it return too few rows."""

    def runs_stacked(self) -> bool:
        return True

    def infer_stacked(self, inputs: Mapping[str, np.ndarray[Any, Any]],
                      request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        out = super().infer_stacked(inputs, request_ids)
        if bool((inputs["x"] == 7).any()):
            return {"y": out["y"].astype(np.complex64)}
        if bool((inputs["x"] == 5).any()):
            return {"y": out["y"][:-1]}
        return out


@pytest.mark.timeout(20)
async def test_outputs_a_block_cannot_send_fail_its_samples_and_the_worker_goes_on() -> None:
    store = MemoryStore()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=3, max_wait_ms=20, block_ms=5), NonWire(),
                     MemoryBroker(store, "w"))
    with store.lock:
        store.add(multi("dtype", np.full((3, 4), 7.0, np.float32)))
        store.add(multi("short", np.full((2, 4), 5.0, np.float32)))
        store.add(multi("fine", np.zeros((2, 4), np.float32)))
    await serve_until(w, lambda: len(store.results(AFF)) == 3)
    got = {r.request_id: r for r in store.results(AFF)}
    assert [s.code for s in got["dtype"].samples] == [E.MODEL_ERROR] * 3
    assert [s.code for s in got["short"].samples] == [E.MODEL_ERROR] * 2
    assert "one row per sample" in got["short"].samples[0].message
    assert got["fine"].ok and all(s.ok for s in got["fine"].samples)


class PerRequestOnly(AffineServable):
    def infer(self, requests):  # type: ignore[no-untyped-def]
        return super().infer(requests)


class ValueCheck(AffineServable):
    def check(self, request: Request) -> None:
        super().check(request)


def test_a_subclass_that_overrides_infer_or_check_is_run_per_request() -> None:
    assert runs_stacked(AffineServable()) and runs_stacked(NonWire())
    assert not runs_stacked(PerRequestOnly()) and not runs_stacked(ValueCheck())

    class Broken(AffineServable):
        def runs_stacked(self) -> bool:
            raise RuntimeError("bug")

    assert not runs_stacked(Broken())


def test_encode_stacked_result_matches_the_per_sample_encoding() -> None:
    y = np.arange(12, dtype=np.float32).reshape(3, 4)
    fields = encode_stacked_result("s", {"y": y}, Timings(1.0, 2.0, 3, "w"), "affine", "1")
    res = decode_result(fields)
    assert res.ok and res.model == "affine" and [s.status for s in res.samples] == ["ok"] * 3
    np.testing.assert_array_equal(np.stack([s.outputs["y"] for s in res.samples]), y)
    with pytest.raises(ValueError):
        encode_stacked_result("s", {"y": y, "z": np.zeros(2)}, Timings())


def test_an_onnx_servable_runs_stacked_samples_as_it_runs_requests(tmp_path: Path) -> None:
    from headrace.models.repository.store import IOSpec, ModelRepository
    from headrace.workers.backends.loader import servable_from_manifest
    from tests.support.compress import tiny_mlp_onnx

    repo = ModelRepository(tmp_path / "repo")
    m = repo.add("tiny", {"model.onnx": tiny_mlp_onnx(tmp_path / "tiny.onnx")}, format="onnx",
                 inputs=[IOSpec("x", "float32", (16,))], outputs=[IOSpec("logits", "float32", (4,))],
                 max_batch=3, postprocess="softmax")
    sv = servable_from_manifest(repo, m, intra_op_threads=1)
    try:
        assert runs_stacked(sv)
        xs = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
        stacked = sv.infer_stacked({"x": xs}, [f"r{i}" for i in range(8)])["logits"]
        each = sv.infer([Request(Envelope(f"r{i}", AFF), inputs={"x": xs[i]}) for i in range(8)])
        assert stacked.shape == (8, 4)  # three calls of at most max_batch=3 rows, concatenated
        np.testing.assert_allclose(stacked, np.stack([o["logits"] for o in each]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stacked.sum(axis=1), 1.0, rtol=1e-5)
    finally:
        sv.close()
