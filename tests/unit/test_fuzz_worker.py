"""Fuzzing the worker loop: batches that mix valid requests with every kind of bad input.

One real :class:`StreamWorker` (in a :class:`WorkerThread`, on the in-memory broker) serves
every example, so a crash, a wedged loop or a leaked entry in one example shows up in the
later ones. Per example, every entry must end up answered exactly once (or, when it has no
usable id / reply stream, in the dead-letter stream) with the code the decoder and the
model's input check give it; valid requests in the same batch must get the model's output.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.samples import SampleSlot, declared_count, decode_samples, is_multi
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.backends.validate import check_finite
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.pipeline.entry import route_of
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.fuzz_cases import INPUT_CODES, OK, Case, any_case, dump_outcomes, examples, record, valid_case


@dataclass
class Served:
    store: MemoryStore
    thread: WorkerThread
    answered: set[tuple[str, str]]  # (reply_to, request id) answered so far
    dlq_seen: int = 0


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    store = MemoryStore()
    settings_ = WorkerSettings(model="affine", max_batch=16, max_wait_ms=1, block_ms=5, lease_s=30,
                               drain_timeout_s=5, trim_interval_s=0.5)
    thread = WorkerThread(settings_, AffineServable(), MemoryBroker(store, "fuzz-worker")).start()
    yield Served(store, thread, set())
    thread.stop(drain=True, timeout_s=10)
    out = os.environ.get("HEADRACE_FUZZ_REPORT")
    if out:
        dump_outcomes(out)


@dataclass(frozen=True)
class Expected:
    """Where an entry's outcome must show up: a reply (``route`` = (reply_to, id)) or the DLQ."""

    route: tuple[str, str] | None
    code: str
    #: a multi-sample entry that runs: each slot's code and input (None when refused).
    slots: tuple[tuple[str, np.ndarray | None], ...] | None = None


def expected(fields: dict[bytes, bytes], at_ms: int) -> Expected:
    """The oracle: the decoder's and the affine model's verdict, in the worker's order
    (envelope, model name, deadline, body, finite values, signature)."""
    try:
        env = P.decode_envelope(fields)
    except E.ProtocolError as err:
        rid_reply = route_of(fields)  # (request id, reply_to) when still usable
        return Expected((rid_reply[1], rid_reply[0]) if rid_reply else None, err.code)
    route = (env.reply_to, env.request_id)
    if env.model and env.model != "affine":
        return Expected(route, E.UNKNOWN_MODEL)
    if env.expired(at_ms):
        return Expected(route, E.DEADLINE_EXCEEDED)
    try:
        body = P.unpack_body(fields.get(b"body"))
        declared = declared_count(fields)
        if is_multi(body):
            return Expected(route, OK, tuple(_slot(s) for s in decode_samples(env, body, declared, 1024)))
        if declared not in (None, 1):
            return Expected(route, E.BAD_VALUE)
        _check(P.decode_body_map(env, body))
    except E.ProtocolError as err:
        return Expected(route, err.code)
    return Expected(route, OK)


def _check(req: P.Request) -> None:
    check_finite(req)
    AffineServable().check(req)


def _slot(slot: SampleSlot) -> tuple[str, np.ndarray | None]:
    if slot.request is None:
        return slot.code, None
    try:
        _check(slot.request)
    except E.ProtocolError as err:
        return err.code, None
    return OK, slot.request.inputs["x"]


def wait_idle(store: MemoryStore, timeout_s: float = 10.0) -> None:
    """Until every entry was delivered and acknowledged."""
    give_up = time.monotonic() + timeout_s
    while store.undelivered() or store.pending_ids():
        assert time.monotonic() < give_up, "the worker left entries unanswered"
        time.sleep(0.002)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("HEADRACE_FUZZ_RANDOM", "") == "")
@given(st.lists(st.one_of(valid_case(), any_case), min_size=1, max_size=12))
def test_every_entry_of_a_mixed_batch_gets_exactly_one_specific_answer(served: Served, cases: list[Case]) -> None:
    store = served.store
    at = P.now_ms()
    before = {rt: len(store.replies.get(rt, [])) for rt in list(store.replies)}
    with store.lock:  # one lock hold: the worker reads them together, as one XREADGROUP would
        added = [(store.add(c.fields), c, expected(c.fields, at)) for c in cases]
    wait_idle(store)
    assert served.thread.healthy(), "the worker loop must survive any input"

    new: dict[tuple[str, str], list[P.Result]] = {}
    for rt, entries in list(store.replies.items()):
        for _eid, f in entries[before.get(rt, 0):]:
            res = P.decode_result(f)
            new.setdefault((rt, res.request_id), []).append(res)
    dead = {f[b"dlq_entry_id"].decode(): f for _i, f in store.dlq[served.dlq_seen:]}
    served.dlq_seen = len(store.dlq)

    routes: dict[tuple[str, str], list[tuple[Case, Expected]]] = {}
    for entry_id, case, exp in added:
        if exp.route is None:
            assert entry_id in dead, f"{case!r}: unroutable entry must be dead-lettered"
            assert dead[entry_id][b"dlq_code"].decode() == exp.code
            record("worker", case.family, f"dlq:{exp.code}")
        else:
            routes.setdefault(exp.route, []).append((case, exp))
    for route, group in routes.items():
        got = new.get(route, [])
        if route in served.answered:
            # The id was answered in an earlier example: dedupe acks it without a new result.
            assert got == [], f"{route} answered twice"
            for case, _ in group:
                record("worker", case.family, "duplicate_acked")
            continue
        assert len(got) == 1, f"{route}: {len(got)} results for {[c.family for c, _ in group]}"
        served.answered.add(route)
        res = got[0]
        outcome = OK if res.ok else res.code
        # Two entries of one batch may share an id; then either verdict may win the marker.
        assert outcome in {exp.code for _, exp in group}, (route, outcome, group)
        assert outcome == OK or outcome in INPUT_CODES | {E.UNKNOWN_MODEL, E.DEADLINE_EXCEEDED}, outcome
        case = next(c for c, e in group if e.code == outcome)
        record("worker", case.family, outcome)
        if case.expect is not None:
            assert outcome == case.expect, f"{case.family}: expected {case.expect}, got {outcome}"
        check_answer(res, case, next(e for c, e in group if e.code == outcome))


def check_answer(res: P.Result, case: Case, exp: Expected) -> None:
    """The result carries the model's outputs (per slot for a multi-sample entry) or says why not."""
    if exp.slots is not None:
        assert [OK if s.ok else s.code for s in res.samples] == [code for code, _ in exp.slots], res
        for s, (code, x) in zip(res.samples, exp.slots, strict=True):
            if code == OK:
                np.testing.assert_array_equal(s.outputs["y"], affine_reference(x))
            else:
                assert code in INPUT_CODES and s.message and not s.outputs
    elif res.ok:
        x = P.decode_request(case.fields).inputs["x"]
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(x))
    else:
        assert res.message and not res.outputs


def test_the_worker_survived_the_fuzz_and_counted_no_internal_errors(served: Served) -> None:
    # Runs after the property (same module fixture): the worker is still up and no request
    # reached code that answered internal_error or model_error.
    stats = served.thread.stats()
    assert served.thread.healthy() and stats["running"]
    assert stats.get("answered_error", 0) + stats.get("answered_ok", 0) + stats.get("answered_expired", 0) > 0
    codes = [P.decode_result(f).code for entries in served.store.replies.values() for _i, f in entries]
    assert E.INTERNAL_ERROR not in codes and E.MODEL_ERROR not in codes
