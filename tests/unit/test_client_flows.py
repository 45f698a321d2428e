"""The SDK's shared flows (client/flows.py) driven by a scripted shell, without Redis: retries
resubmit the same id and respect attempts and deadlines, giving up cancels the request, the
registry checks are cached, ``imap`` resubmits and cleans up, the reader survives outages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import BackoffPolicy, Retry, flows
from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.config import ClientSettings
from headrace.client.core import ClientCore
from headrace.client.effects import (
    Delete,
    Effect,
    ReaderId,
    ReadModel,
    Resolve,
    Send,
    Sleep,
    Wait,
    WakeReader,
    XRead,
    drive,
    iterate,
)
from headrace.client.progress import make_progress
from headrace.client.registry import decode_record
from headrace.client.tickets import Ticket, resolve_all

FAST = Retry(attempts=3, backoff=BackoffPolicy(base_s=0.01, cap_s=0.01, jitter=0.0))
NOW_MS = 1_800_000_000_000


def registry_value(*, seen_ms: int = NOW_MS, workers: bool = True, p50: float = 0.0) -> bytes:
    info: dict[str, Any] = {"model": "affine", "updated_ms": seen_ms, "workers": {}, "signatures": {
        "2": {"seen_ms": seen_ms, "describe": json.dumps({"inputs": {"x": {"dtype": "float32", "shape": [4]}}})}}}
    if workers:
        info["workers"]["w1"] = {"seen_ms": seen_ms, "version": "2", "max_batch": 32, "max_wait_ms": 5.0,
                                 "lag": 3, "pending": 2, "p50_ms": p50, "p99_ms": 2 * p50}
    return json.dumps(info).encode()


class Shell:
    """Performs effects from a script: ``replies`` answers each Send command in turn (an
    ``"ok"`` enqueues, ``"full"`` refuses, an exception fails), ``answer`` decides per Wait
    whether the ticket's result has come."""

    def __init__(self, core: ClientCore, replies: list[Any] | None = None,
                 answer: Callable[[Ticket, int], bool] | None = None, record: bytes | None = registry_value()) -> None:
        self.core = core
        self.replies = list(replies or [])
        self.answer = answer or (lambda t, n: True)
        self.record = record
        self.sent: list[tuple[Any, ...]] = []
        self.sleeps: list[float] = []
        self.reads = 0
        self.waits = 0
        self.markers: list[tuple[Any, ...]] = []
        core.cancel_sink = self.markers.append

    def __call__(self, effect: Effect) -> Any:
        if isinstance(effect, Send):
            out = []
            for cmd in effect.commands:
                self.sent.append(cmd)
                reply = self.replies.pop(0) if self.replies else "ok"
                out.append([1, f"{len(self.sent)}-0".encode()] if reply == "ok"
                           else [0, 5] if reply == "full" else reply)
            return out
        if isinstance(effect, Wait):
            self.waits += 1
            t = effect.ticket
            if not t.done() and self.answer(t, self.waits):  # delivered as the reply reader would
                fields = P.Result(request_id=t.request_id, status="ok", outputs={"y": np.ones(4, np.float32)}).encode()
                self.core.book.deliver(t.reply_to, [(f"{self.waits}-0".encode(), fields)])
            return t.done()
        if isinstance(effect, Sleep):
            self.sleeps.append(effect.seconds)
            return None
        if isinstance(effect, ReadModel):
            self.reads += 1
            if isinstance(self.record, BaseException):
                raise self.record
            return decode_record(effect.model, self.record), NOW_MS
        if isinstance(effect, WakeReader):
            return None
        raise AssertionError(f"unexpected effect {effect!r}")

    def ids(self) -> list[str]:
        """Request ids of the submit commands sent, in order."""
        return [cmd[list(cmd).index(b"id") + 1].decode() for cmd in self.sent]


def core(**settings: Any) -> ClientCore:
    return ClientCore(ClientSettings(**settings), "c1", FAST)


def ticket(c: ClientCore, rid: str = "r1", deadline_s: float | None = None) -> Ticket:
    return c.new_ticket("affine", {"x": np.ones(4, np.float32)}, None, rid, deadline_s)


def test_infer_resubmits_the_same_id_after_a_timed_out_attempt() -> None:
    c = core()
    shell = Shell(c, answer=lambda t, n: n >= 3)  # the answer comes during the third wait
    t = ticket(c)
    res = drive(flows.infer(c, t, 0.01, FAST), shell)
    assert res.ok and shell.ids() == ["r1", "r1", "r1"] and t.submissions == 3
    assert shell.sleeps == [0.01, 0.01] and shell.markers == [] and c.book.outstanding() == []


def test_infer_gives_up_after_its_attempts_and_cancels_the_request() -> None:
    c = core()
    shell = Shell(c, answer=lambda t, n: False)
    t = ticket(c)
    with pytest.raises(E.ResultTimeout) as info:
        drive(flows.infer(c, t, 0.01, FAST), shell)
    e = info.value
    assert isinstance(e, TimeoutError) and e.code == E.RESULT_TIMEOUT and e.request_id == "r1"
    assert "timeout_s argument" in str(e)
    assert len(shell.sent) == 3 and t.cancelled() and c.book.outstanding() == []
    [marker] = shell.markers
    assert marker[:2] == ("SET", "headrace:{affine}:cancel:r1") and marker[2] == t.prepared.fields[b"ts_ms"]
    assert marker[3] == "EX" and marker[4] == c.settings.cancel_ttl_s


def test_no_attempt_starts_after_the_deadline() -> None:
    c = core()
    shell = Shell(c, answer=lambda t, n: False)
    t = ticket(c, deadline_s=0.005)
    time.sleep(0.01)
    with pytest.raises(E.ResultTimeout):
        drive(flows.infer(c, t, 0.01, FAST), shell)
    assert len(shell.sent) == 1  # the deadline passed: no resubmission
    assert shell.markers[0][4] <= 6  # the marker lives about as long as the deadline


def test_an_interrupted_infer_cancels_its_request() -> None:
    c = core()
    t = ticket(c)

    def perform(effect: Effect) -> Any:
        if isinstance(effect, Wait):
            raise KeyboardInterrupt  # what a cancelled task or Ctrl-C throws into the flow
        return shell(effect)

    shell = Shell(c)
    with pytest.raises(KeyboardInterrupt):
        drive(flows.infer(c, t, 5.0, FAST), perform)
    assert t.cancelled() and len(shell.markers) == 1 and c.book.outstanding() == []
    with pytest.raises(E.RequestCancelled):
        t.result(0)


def test_submit_retries_connection_failures_but_not_refusals_by_redis() -> None:
    c = core()
    shell = Shell(c, replies=[redis.ConnectionError("lost"), "ok"])
    t = ticket(c)
    drive(flows.submit(c, t, FAST.start()), shell)
    assert t.entry_id == "2-0" and shell.ids() == ["r1", "r1"]

    shell = Shell(c, replies=[redis.exceptions.NoPermissionError("NOPERM no")] * 3)
    t2 = ticket(c, "r2")
    with pytest.raises(E.BrokerError) as info:
        drive(flows.submit(c, t2, FAST.start()), shell)
    e = info.value
    assert len(shell.sent) == 1 and not e.retryable and e.request_id == "r2" and e.code == E.BROKER_ERROR
    assert t2 not in c.book.outstanding()


def test_queue_full_is_retried_no_sooner_than_retry_after() -> None:
    c = core(max_backlog=5)
    shell = Shell(c, replies=["full", "full", "ok"], record=registry_value(p50=200.0))
    t = ticket(c)
    drive(flows.submit(c, t, FAST.start()), shell)
    assert shell.sleeps == [0.2, 0.2]  # the model's recent median latency, above the backoff
    shell = Shell(c, replies=["full"])
    with pytest.raises(E.QueueFull) as info:
        drive(flows.submit(c, ticket(c, "r3"), Retry.none().start()), shell)
    e = info.value
    assert (e.backlog, e.max_backlog, e.request_id, e.model) == (5, 5, "r3", "affine")
    assert "the max_backlog argument" in str(e) and not isinstance(e, E.BrokerError)


def test_registry_checks_are_cached_and_unknown_models_refused() -> None:
    c = core()
    shell = Shell(c)
    for i in range(5):
        drive(flows.submit(c, ticket(c, f"k{i}"), FAST.start()), shell)
    assert shell.reads == 1  # one read serves registry_cache_s of submits

    c = core()
    shell = Shell(c, record=None)
    for _ in range(2):
        with pytest.raises(E.UnknownModel) as info:
            drive(flows.submit(c, ticket(c), FAST.start()), shell)
        assert "require_registered=False" in str(info.value) and info.value.code == E.UNKNOWN_MODEL
    assert shell.reads == 2 and shell.sent == []  # "unknown" is never cached: workers may be starting

    c = core(require_registered=False)
    shell = Shell(c, record=None)
    drive(flows.submit(c, ticket(c), FAST.start()), shell)
    assert shell.reads == 0 and len(shell.sent) == 1


def test_fail_fast_refuses_a_model_without_live_workers() -> None:
    c = core(fail_fast=True)
    stale = registry_value(seen_ms=NOW_MS - 60_000)
    shell = Shell(c, record=stale)
    with pytest.raises(E.ModelUnavailable) as info:
        drive(flows.submit(c, ticket(c), FAST.start()), shell)
    assert info.value.model == "affine" and "60s old" in str(info.value) and shell.sent == []
    assert isinstance(info.value, E.UnavailableError)
    live = core(fail_fast=True)
    drive(flows.submit(live, ticket(live, "r2"), FAST.start()), Shell(live))  # a live worker: accepted


def test_an_unreadable_registry_skips_the_checks_once_and_for_all() -> None:
    c = core()
    denied = E.BrokerError("HGET refused", retryable=False)
    denied.__cause__ = redis.exceptions.NoPermissionError("NOPERM this user has no permissions to run 'hget'")
    shell = Shell(c, record=denied)  # type: ignore[arg-type]
    for i in range(3):
        drive(flows.submit(c, ticket(c, f"u{i}"), FAST.start()), shell)
    assert shell.reads == 1 and len(shell.sent) == 3
    c = core()
    shell = Shell(c, record=E.BrokerError("connection refused"))  # type: ignore[arg-type]
    with pytest.raises(E.BrokerError):
        drive(flows.submit(c, ticket(c), FAST.start()), shell)


def test_imap_resubmits_unanswered_requests_and_cancels_what_is_left_when_abandoned() -> None:
    c = core(max_in_flight=4)
    items = [{"x": np.full(4, i, np.float32)} for i in range(6)]
    shell = Shell(c, answer=lambda t, n: n > 1)  # the first wait times out
    bursts: list[tuple[int, int | None]] = []
    out = list(iterate(flows.imap(c, "affine", items, timeout_s=0.0, deadline_s=None, retry=FAST,
                                  progress=make_progress(lambda d, t: bursts.append((d, t)), 6, "affine"),
                                  raise_on_error=False, chunk_size=1), shell))
    assert len(out) == 6 and all(r.ok for r in out)
    ids = shell.ids()
    assert len(ids) == 6 + 4 and len(set(ids)) == 6  # the whole first window again, same ids
    assert bursts[-1] == (6, 6)

    c = core(max_in_flight=4)
    shell = Shell(c, answer=lambda t, n: False)
    with pytest.raises(E.ResultTimeout):
        list(iterate(flows.imap(c, "affine", items, timeout_s=0.0, deadline_s=None, retry=Retry.none(),
                                progress=make_progress(False, 6, "affine"), raise_on_error=False, chunk_size=1),
                     shell))
    assert c.book.outstanding() == [] and len(shell.markers) == 4  # the window was cancelled

    c = core(max_in_flight=4)
    shell = Shell(c)
    it = iterate(flows.imap(c, "affine", items, timeout_s=1.0, deadline_s=None, retry=None,
                            progress=make_progress(False, 6, "affine"), raise_on_error=False, chunk_size=1), shell)
    next(it)
    it.close()  # the caller stops early: the three requests still out are cancelled
    assert c.book.outstanding() == [] and len(shell.markers) == 3


def test_forget_and_cancel_are_local_and_idempotent() -> None:
    c = core()
    shell = Shell(c)
    t = ticket(c)
    drive(flows.submit(c, t, FAST.start()), shell)
    assert c.forget(t) and not c.forget(t) and t.cancelled()
    assert not t.cancel() and shell.markers == []  # forgotten: workers were not told
    unsent = ticket(c, "r9")
    assert unsent.cancel() and shell.markers == []  # never sent: nothing to tell the workers


def test_the_reader_survives_outages_and_keeps_its_deletes() -> None:
    c = core()
    t = ticket(c)
    c.book.add(t)
    calls: list[str] = []
    results = {t.request_id: P.Result(request_id="r1", status="ok").encode()}

    def perform(effect: Effect) -> Any:
        calls.append(type(effect).__name__)
        if isinstance(effect, ReaderId):
            return 7
        if isinstance(effect, XRead):
            if calls.count("XRead") == 1:
                return [[t.reply_to.encode(), [(b"1-0", results["r1"])]]]
            raise redis.ConnectionError("gone")
        if isinstance(effect, Delete):
            if calls.count("Delete") == 1:
                raise redis.ConnectionError("gone while deleting")
            assert effect.entries == {t.reply_to: ["1-0"]}  # kept for the next round
            c.closed = True
            return None
        if isinstance(effect, Resolve):
            resolve_all(effect.answered)
            return None
        if isinstance(effect, Sleep):
            return None
        raise AssertionError(effect)

    drive(flows.read_loop(c), perform)
    assert t.result(0).ok and c.reconnects == 1 and c.reader_conn_id == 7
    assert calls[:4] == ["ReaderId", "XRead", "Resolve", "Delete"]


def test_an_unreachable_registry_does_not_stop_submits_to_a_model_seen_registered(
        caplog: pytest.LogCaptureFixture) -> None:
    """On a Redis Cluster the registry key lives on one master: with it down, a model this
    client saw registered is still submitted to (its streams may be on masters that are up);
    a model never seen, or a refusal by Redis, still fails the submit."""
    c = core(registry_cache_s=0.0)
    shell = Shell(c)
    drive(flows.submit(c, ticket(c, "seen"), FAST.start()), shell)
    down = E.BrokerError("HGET headrace:models failed: Connection refused")
    down.__cause__ = redis.exceptions.ConnectionError("Connection refused")
    shell.record = down  # type: ignore[assignment]
    for i in range(3):
        drive(flows.submit(c, ticket(c, f"d{i}"), FAST.start()), shell)
    assert shell.ids() == ["seen", "d0", "d1", "d2"] and shell.reads == 4
    assert caplog.text.count("cannot read the model registry") == 1, "warned once, not per submit"

    fresh = core()
    with pytest.raises(E.BrokerError, match="Connection refused"):
        drive(flows.submit(fresh, ticket(fresh), FAST.start()), Shell(fresh, record=down))  # type: ignore[arg-type]
    refused = E.BrokerError("HGET failed: WRONGTYPE")
    refused.__cause__ = redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    shell.record = refused  # type: ignore[assignment]
    with pytest.raises(E.BrokerError, match="WRONGTYPE"):
        drive(flows.submit(c, ticket(c, "w"), FAST.start()), shell)
