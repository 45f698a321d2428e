"""Model calls: how a batch becomes calls (``timings.batch_size`` is the call's size), how
a failing call is split to isolate the failing request, and that the costly admission work
(tokenising a text) runs off the event loop, on texts cut to what the model can use."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.fake import AffineServable, LengthServable, affine_reference
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.worker import serve_until

REPLY = "headrace:{img}:reply:t"


class Images(Servable):
    """Images of any height and width; only equal shapes stack into one call (as an image
    model with dynamic axes served by the manifest servables)."""

    name, version = "img", "1"
    inputs = (TensorSpec("x", "float32", (-1, -1)),)
    outputs = (TensorSpec("mean", "float32", ()),)

    def __init__(self) -> None:
        self.calls: list[int] = []

    def check(self, request: Request) -> None:
        pass

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(r.inputs["x"].shape), []).append(i)
        return list(groups.values())

    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        batch = np.stack([r.inputs["x"] for r in requests])  # raises on mixed shapes
        self.calls.append(len(requests))
        return [{"mean": np.float32(m)} for m in batch.mean(axis=(1, 2))]


@pytest.mark.timeout(20)
async def test_batch_size_is_the_size_of_the_model_call_the_request_ran_in() -> None:
    # Seen: mixed-shape images split into two calls of 8 reported batch_size 16.
    store = MemoryStore()
    sv = Images()
    w = StreamWorker(WorkerSettings(model="img", max_batch=16, preferred_batch=16, max_wait_ms=500, block_ms=5),
                     sv, MemoryBroker(store, "w"))
    with store.lock:
        for i in range(16):
            shape = (2, 3) if i % 2 else (4, 4)
            x = np.full(shape, float(i), np.float32)
            store.add(encode_request(Request(Envelope(f"r{i}", REPLY), inputs={"x": x})))
    await serve_until(w, lambda: len(store.results(REPLY)) == 16)
    assert sorted(sv.calls) == [8, 8]
    for res in store.results(REPLY):
        assert res.ok and res.timings.batch_size == 8, res
        assert float(res.outputs["mean"]) == float(res.request_id[1:])


def test_manifest_servables_plan_their_calls_by_shape_and_max_batch(tmp_path: Path) -> None:
    from headrace.models.repository.store import IOSpec, ModelRepository
    from headrace.workers.backends import load_servable
    from tests.unit.test_servables import affine_graph, rowsum_graph, save

    repo = ModelRepository(tmp_path / "repo")
    repo.add("rowsum", {"model.onnx": save(rowsum_graph(), tmp_path / "r.onnx")}, format="onnx",
             inputs=[IOSpec("x", "float32", (-1,))], outputs=[IOSpec("s", "float32", (1,))], max_batch=2)
    repo.add("affine", {"model.onnx": save(affine_graph(), tmp_path / "a.onnx")}, format="onnx",
             inputs=[IOSpec("x", "float32", (3,))], outputs=[IOSpec("y", "float32", (3,))])
    s = load_servable(WorkerSettings(model="rowsum", model_repo=str(repo.root)))
    reqs = [Request(Envelope(f"r{i}", "q"), inputs={"x": np.zeros(n, np.float32)}) for i, n in
            enumerate((3, 6, 3, 3, 6))]
    assert s.plan(reqs) == [[0, 2], [3], [1, 4]]
    plain = load_servable(WorkerSettings(model="affine", model_repo=str(repo.root)))
    same = [Request(Envelope(f"a{i}", "q"), inputs={"x": np.zeros(3, np.float32)}) for i in range(3)]
    assert plain.plan(same) == [[0, 1, 2]]


@pytest.mark.timeout(30)
async def test_a_failing_call_is_split_in_halves_until_the_poison_runs_alone() -> None:
    store = MemoryStore()
    sv = AffineServable(poison=-1.0)
    w = StreamWorker(WorkerSettings(model="affine", max_batch=32, preferred_batch=32, max_wait_ms=500, block_ms=5,
                                    lease_s=30, max_deliveries=1), sv, MemoryBroker(store, "w"))
    reply = "headrace:{affine}:reply:t"
    with store.lock:
        for i in range(32):
            x = np.full(4, -1.0 if i == 21 else float(i), np.float32)
            store.add(encode_request(Request(Envelope(f"r{i}", reply), inputs={"x": x})))
    await serve_until(w, lambda: len(store.results(reply)) == 32)
    got = {r.request_id: r for r in store.results(reply)}
    assert got["r21"].code == "max_deliveries_exceeded" and len(store.dlq) == 1
    for i in range(32):
        if i != 21:
            assert got[f"r{i}"].ok
            np.testing.assert_array_equal(got[f"r{i}"].outputs["y"], affine_reference(np.full(4, float(i))))
    # 32 -> 16 -> 8 -> one by one: 1 + 2 + 2 + 8 calls, not the 33 of re-running each alone;
    # a batch-mate ran at most 4 times (the calls on the poison's way down).
    assert len(sv.batches) == 13
    assert max(n for rid, n in sv.invocations.items() if rid != "r21") <= 4
    assert sum(1 for b in sv.batches if len(b) == 1) == 8


@pytest.mark.timeout(20)
async def test_texts_are_checked_and_costed_off_the_event_loop() -> None:
    # Seen: 64 long CJK texts tokenised on the event loop stalled a worker for 23 s.
    loop_threads: set[int] = set()
    seen: dict[str, set[int]] = {"check": set(), "length": set()}

    class Spy(LengthServable):
        def check(self, request: Request) -> None:
            seen["check"].add(threading.get_ident())
            super().check(request)

        def length(self, request: Request) -> int:
            seen["length"].add(threading.get_ident())
            return super().length(request)

    store = MemoryStore()
    reply = "headrace:{length}:reply:t"
    w = StreamWorker(WorkerSettings(model="length", block_ms=5), Spy(), MemoryBroker(store, "w"))
    for i in range(8):
        store.add(encode_request(Request(Envelope(f"t{i}", reply), text="字" * 100_000)))
    loop_threads.add(threading.get_ident())
    await serve_until(w, lambda: len(store.results(reply)) == 8)
    assert all(r.ok and int(r.outputs["length"][0]) == 100_000 for r in store.results(reply))
    assert seen["check"] and seen["length"] and not (seen["check"] | seen["length"]) & loop_threads


def test_long_texts_are_cut_before_tokenising_without_changing_what_the_model_sees() -> None:
    from headrace.models.builtin.minilm import default_model_path
    from headrace.models.tokenizer import CHARS_PER_TOKEN
    from headrace.workers.backends.tokens import TextEncoder

    enc = TextEncoder(default_model_path(), 128)
    assert enc.max_chars == 128 * CHARS_PER_TOKEN
    seen: list[int] = []
    real = enc._tokenise
    enc._tokenise = lambda batch: seen.extend(map(len, batch)) or real(batch)  # type: ignore[method-assign]
    assert enc.count("字" * 100_000) == 128 and seen == [enc.max_chars]
    prose = "The quick brown fox jumps over the lazy dog, again and again. " * 200
    full = TextEncoder(default_model_path(), 128)
    full.max_chars = len(prose)
    ids, mask = enc.encode([prose, "short"])
    ref_ids, ref_mask = full.encode([prose, "short"])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
