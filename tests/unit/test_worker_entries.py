"""Every per-entry step fails for that entry alone (issue #10, item 1): parse, numeric
fields, stats, deadline, decode, validate, run, encode, commit. Each test breaks one step
for one entry among good ones and checks that entry gets an answer (or a dead letter) and
the others their results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, encode_request, now_ms
from headrace.cluster.serve.replica import StreamWorkerReplica
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.worker import StreamWorker, WorkerFailed
from headrace.workers.pipeline.entry import elapsed_ms
from headrace.workers.pipeline.work import Meta, Unit
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore

REPLY = "headrace:{affine}:reply:t"


def fields(rid: str, value: float = 1.0, **extra: bytes) -> dict[bytes, bytes]:
    f = encode_request(Request(Envelope(rid, REPLY), inputs={"x": np.full(4, value, np.float32)}))
    f.update({k.encode(): v for k, v in extra.items()})
    return f


async def serve(sv: Any, entries: Sequence[dict[bytes, bytes]], max_deliveries: int = 3) -> MemoryStore:
    """Serve ``entries`` until each request id is answered; the worker must stay healthy."""
    store = MemoryStore()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=8, max_wait_ms=20, block_ms=5, lease_s=5,
                                    max_deliveries=max_deliveries), sv, MemoryBroker(store, "w"))
    with store.lock:
        for f in entries:
            store.add(f)
    task = asyncio.ensure_future(w.run())
    give_up = time.monotonic() + 10
    try:
        while len({r.request_id for r in store.results(REPLY)}) < len(entries):
            assert time.monotonic() < give_up, f"answered: {codes(store)}"
            await asyncio.sleep(0.005)
        assert w.healthy()
    finally:
        await w.stop()
        await task
    assert w.failed is None and store.pending_ids() == []
    return store


def codes(store: MemoryStore) -> dict[str, str]:
    return {r.request_id: (r.code or "ok") for r in store.results(REPLY)}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value,code", [
    (b"9" * 18, "ok"),  # a submit time far in the future: queue time unknown
    (b"9" * 400, E.DECODE_ERROR), (b"9" * 5000, E.DECODE_ERROR),  # the protocol: 1-18 ASCII digits
    (b"-5", E.DECODE_ERROR), (b"\xd9\xa1\xd9\xa2", E.DECODE_ERROR), (b"1e5", E.DECODE_ERROR),
    (b"\xff\xfe", E.DECODE_ERROR),
])
async def test_numeric_fields_of_any_length_and_format(value: bytes, code: str) -> None:
    store = await serve(AffineServable(), [fields("mate1"), fields("odd", ts_ms=value), fields("mate2")])
    got = codes(store)
    assert got == {"mate1": "ok", "odd": code, "mate2": "ok"}
    assert all(r.timings.queue_ms >= 0 for r in store.results(REPLY))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", [b"9" * 400, b"9" * 5000, b"1_000", b"\xd9\xa1\xd9\xa2", b"-1", b"soon"])
async def test_deadlines_of_any_length_and_format_answer_that_entry_only(value: bytes) -> None:
    store = await serve(AffineServable(), [fields("mate1"), fields("odd", deadline_ms=value), fields("mate2")])
    got = codes(store)
    assert got["mate1"] == got["mate2"] == "ok"
    assert got["odd"] in {"ok", E.DEADLINE_EXCEEDED, E.DECODE_ERROR}


def test_stats_and_latencies_never_raise_on_producer_times() -> None:
    unit = Unit()
    for ts in (0, -5, 1, 10**400, now_ms() + 10**6, now_ms() - 10):
        unit.meta.append(Meta("ok", "", ts, 0.0))
    line = unit.stats_line("w", now_ms())
    assert line.ok == 6 and all(0 <= x < 10**13 for x in line.lat_ms) and line.to_fields(1)[b"lat_ms"]
    assert elapsed_ms(1000, 10**400) == 0.0 and elapsed_ms(1000, 400) == 600.0 and elapsed_ms(1000, -1) == 0.0
    assert elapsed_ms(2_000_000_000_500, 2_000_000_000_000) == 500.0


class Faulty(AffineServable):
    """Breaks one step for requests whose x holds ``-7``."""

    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step

    def _bad(self, requests: Sequence[Request]) -> bool:
        return any(bool((r.inputs["x"] == -7).any()) for r in requests)

    def check(self, request: Request) -> None:
        if self.step == "validate" and self._bad([request]):
            raise RuntimeError("a check that breaks")
        super().check(request)

    def length(self, request: Request) -> int:
        if self.step == "length" and self._bad([request]):
            raise ZeroDivisionError("a length that breaks")
        return super().length(request)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        if self.step == "plan":
            raise KeyError("a plan that breaks")
        return super().plan(requests)

    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        out = super().infer(requests) if self.step != "run" or not self._bad(requests) else None
        if out is None:
            raise OverflowError("a model that breaks")
        if self.step == "encode":
            out = [{"y": np.array([object()], dtype=object)} if bool((r.inputs["x"] == -7).any()) else o
                   for r, o in zip(requests, out, strict=True)]
        return out


STEPS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "validate": (E.MODEL_ERROR, lambda c: c == E.MODEL_ERROR),
    "length": ("ok", lambda c: c == "ok"),  # only a batching hint: it runs with length 0
    "plan": ("ok", lambda c: c == "ok"),  # only an optimisation: one call for all
    "run": (E.MAX_DELIVERIES, lambda c: c == E.MAX_DELIVERIES),  # max_deliveries reached at once below
    "encode": (E.MODEL_ERROR, lambda c: c == E.MODEL_ERROR),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("step", list(STEPS))
async def test_a_step_that_breaks_for_one_request_answers_that_request_only(step: str) -> None:
    sv = Faulty(step)
    entries = [fields(f"m{i}", float(i)) for i in range(3)] + [fields("bad", -7.0)] + [fields("m3", 3.0)]
    store = await serve(sv, entries, max_deliveries=1)
    got = codes(store)
    assert STEPS[step][1](got["bad"]), (step, got["bad"])
    for i in range(4):
        (res,) = [r for r in store.results(REPLY) if r.request_id == f"m{i}"]
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(np.full(4, float(i))))


def test_a_ray_replica_whose_worker_task_died_fails_its_health_check_at_once() -> None:
    class DeadThread:
        alive = True
        failed = WorkerFailed("worker task 'write' died (RuntimeError: boom)")

        def healthy(self) -> bool:
            return False

    replica = StreamWorkerReplica.__new__(StreamWorkerReplica)
    replica.thread, replica.tp, replica.replica_id = DeadThread(), None, "r1"  # type: ignore[assignment]
    replica._unhealthy_since = None
    try:
        with pytest.raises(E.ModelError, match="'write' died"):
            replica.check_health()  # no unhealthy_grace_s for a dead task
    finally:
        replica.thread = None  # nothing to stop in __del__
