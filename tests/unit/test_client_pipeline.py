"""SDK submit batching without Redis: the AsyncClient's auto-pipeline (against a stand-in
for redis-py's pipeline) and the map window's bookkeeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.bulk import MapWindow, Step
from headrace.client.functions import LIBRARY_SOURCE, SUBMIT_FUNCTION
from headrace.client.keys import ModelKeys
from headrace.client.pipeline import AutoPipeline
from headrace.client.submit import function_args, prepare_request, submit_command
from headrace.client.tickets import Ticket

pytestmark = pytest.mark.timeout(30)

KEYS = ModelKeys(namespace="ns", model="m")
REPLY = KEYS.reply("c1")

Answer = Callable[[tuple[Any, ...]], Any]


class StubRedis:
    """Just enough of ``redis.asyncio.Redis`` for AutoPipeline: ``pipeline()`` records
    each round trip and answers every command with ``answer(command)``."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda cmd: [1, f"{cmd[1]}-0".encode()])
        self.round_trips: list[list[tuple[Any, ...]]] = []
        self.fail_next: Exception | None = None
        self.loaded = 0

    def pipeline(self, transaction: bool = True) -> StubPipeline:
        assert transaction is False
        return StubPipeline(self)

    async def function_load(self, code: str) -> str:
        assert code == LIBRARY_SOURCE
        self.loaded += 1
        return "headrace"


class StubPipeline:
    def __init__(self, owner: StubRedis) -> None:
        self.owner = owner
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False
        self.owner.round_trips.append(list(self.commands))
        await asyncio.sleep(0.001)  # the round trip: other coroutines run meanwhile
        if self.owner.fail_next is not None:
            err, self.owner.fail_next = self.owner.fail_next, None
            raise err
        return [self.owner.answer(cmd) for cmd in self.commands]


def _pipeline(stub: StubRedis, **kw: Any) -> AutoPipeline:
    return AutoPipeline(stub, **kw)  # type: ignore[arg-type]


async def test_concurrent_submits_of_one_pass_share_one_round_trip() -> None:
    stub = StubRedis()
    pipe = _pipeline(stub)

    async def one(i: int) -> Any:
        return await pipe.submit(("EVALSHA", i))

    replies = await asyncio.gather(*(one(i) for i in range(200)))
    assert replies == [[1, f"{i}-0".encode()] for i in range(200)]
    assert len(stub.round_trips) == 1 and [c[1] for c in stub.round_trips[0]] == list(range(200))
    assert (pipe.flushes, pipe.commands, pipe.pending()) == (1, 200, 0)


async def test_batches_are_capped_and_late_submits_ride_the_next_round_trip() -> None:
    stub = StubRedis()
    pipe = _pipeline(stub, max_batch=30)
    first = [pipe.submit(("EVALSHA", i)) for i in range(70)]
    await asyncio.sleep(0)  # the flusher took its first batch and is on its way
    late = [pipe.submit(("EVALSHA", 100 + i)) for i in range(5)]
    await asyncio.gather(*first, *late)
    assert [len(rt) for rt in stub.round_trips] == [30, 30, 15]  # queued in order, sent in order
    assert [c[1] for rt in stub.round_trips for c in rt] == list(range(70)) + list(range(100, 105))
    await pipe.aclose()


async def test_each_command_gets_its_own_reply_or_error() -> None:
    stub = StubRedis(lambda cmd: redis.ResponseError("NOPERM no") if cmd[1] % 3 == 0 else [0, 7])
    pipe = _pipeline(stub)
    futures = [pipe.submit(("EVALSHA", i)) for i in range(9)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for i, out in enumerate(outcomes):
        if i % 3 == 0:
            assert isinstance(out, redis.ResponseError) and "NOPERM" in str(out)
        else:
            assert out == [0, 7]
    assert len(stub.round_trips) == 1


async def test_a_missing_function_is_loaded_and_only_the_refused_commands_are_resent() -> None:
    flushed = {"yes": True}

    def answer(cmd: tuple[Any, ...]) -> Any:
        if flushed["yes"] and cmd[1] >= 2:
            return redis.ResponseError("Function not found")
        return [1, b"1-0"]

    stub = StubRedis(answer)
    orig_load = stub.function_load

    async def load(code: str) -> str:
        flushed["yes"] = False
        return await orig_load(code)

    stub.function_load = load  # type: ignore[method-assign]
    pipe = _pipeline(stub)
    replies = await asyncio.gather(*(pipe.submit(("EVALSHA", i)) for i in range(5)))
    assert replies == [[1, b"1-0"]] * 5
    assert stub.loaded == 1
    assert [[c[1] for c in rt] for rt in stub.round_trips] == [[0, 1, 2, 3, 4], [2, 3, 4]]


async def test_a_failed_round_trip_fails_every_caller_of_that_pipeline_only() -> None:
    stub = StubRedis()
    pipe = _pipeline(stub)
    stub.fail_next = redis.ConnectionError("Connection reset by peer")
    outcomes = await asyncio.gather(*(pipe.submit(("EVALSHA", i)) for i in range(4)), return_exceptions=True)
    assert all(isinstance(o, redis.ConnectionError) for o in outcomes)
    assert await pipe.submit(("EVALSHA", 9)) == [1, b"9-0"]  # the next pipeline is fine
    stub.fail_next = RuntimeError("bug in a parser")  # anything else reaches callers as a RedisError
    with pytest.raises(redis.RedisError, match="bug in a parser"):
        await pipe.submit(("EVALSHA", 10))


async def test_a_caller_cancelled_before_its_pipeline_left_sends_nothing() -> None:
    stub = StubRedis()
    pipe = _pipeline(stub)
    keep, drop = pipe.submit(("EVALSHA", 1)), pipe.submit(("EVALSHA", 2))
    drop.cancel()
    assert await keep == [1, b"1-0"]
    assert [[c[1] for c in rt] for rt in stub.round_trips] == [[1]]


async def test_cancelling_the_flusher_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    stub = StubRedis()
    pipe = _pipeline(stub)
    fut = pipe.submit(("EVALSHA", 1))
    await asyncio.sleep(0)  # the flusher is in its round trip now
    queued = pipe.submit(("EVALSHA", 2))  # waits for the next pipeline
    assert pipe._flusher is not None
    pipe._flusher.cancel()
    for f in (fut, queued):
        with pytest.raises(redis.ConnectionError, match="cancelled"):
            await f
    assert await pipe.submit(("EVALSHA", 3)) == [1, b"3-0"]  # a new flusher starts

    unstarted = pipe.submit(("EVALSHA", 4))
    assert pipe._flusher is not None
    pipe._flusher.cancel()  # before its first step
    with pytest.raises(redis.ConnectionError, match="cancelled"):
        await unstarted
    assert await pipe.submit(("EVALSHA", 5)) == [1, b"5-0"]
    await pipe.aclose()
    assert pipe._flusher is None


async def test_a_client_that_may_not_load_the_function_keeps_the_error_and_does_not_resend() -> None:
    stub = StubRedis(lambda cmd: redis.ResponseError("Function not found"))

    async def refuse(code: str) -> str:
        stub.loaded += 1
        raise redis.exceptions.NoPermissionError("this user has no permissions to run the 'function|load' command")

    stub.function_load = refuse  # type: ignore[method-assign]
    pipe = _pipeline(stub)
    out = await asyncio.gather(*(pipe.submit(("FCALL", i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, redis.ResponseError) and "Function not found" in str(o) for o in out)
    assert stub.loaded == 1 and len(stub.round_trips) == 1


def test_submit_command_matches_function_args() -> None:
    p = prepare_request(KEYS, REPLY, None, "t", request_id="r", deadline_s=0)
    keys, argv = function_args(KEYS, p, 10)
    assert keys == [KEYS.requests, KEYS.limits, KEYS.inbox]
    assert submit_command(KEYS, p, 10) == ("FCALL", SUBMIT_FUNCTION, 3, *keys, *argv)


def test_prepare_request_checks_the_id_without_decoding_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fields: Any) -> Any:
        raise AssertionError("prepare_request must not decode the entry it just encoded")

    monkeypatch.setattr(P, "decode_envelope", boom)
    assert prepare_request(KEYS, REPLY, None, "t", request_id="ok-1", deadline_s=0).request_id == "ok-1"
    for bad in ("", "x" * 129, "bad id", "naïve"):
        with pytest.raises(E.ProtocolError) as info:
            prepare_request(KEYS, REPLY, None, "t", request_id=bad, deadline_s=0)
        assert info.value.code == E.DECODE_ERROR
    with pytest.raises(E.ProtocolError):
        prepare_request(KEYS, REPLY, None, "t", request_id=42, deadline_s=0)  # type: ignore[arg-type]
    fresh = prepare_request(KEYS, REPLY, None, "t", request_id=None, deadline_s=0).request_id
    assert len(fresh) == 32 and int(fresh, 16) >= 0


# --- the map window ------------------------------------------------------------------------


def _prepare(source: Any, rid: str | None) -> Ticket:
    inputs, text = source
    return Ticket(prepare_request(KEYS, REPLY, inputs, text, request_id=rid, deadline_s=0))


def _answer(ticket: Ticket) -> None:
    assert ticket._resolve(P.Result(request_id=ticket.request_id, status=P.STATUS_OK))


def _drive(window: MapWindow, decide: Callable[[int, Ticket], E.HeadraceError | None],
           max_steps: int = 1000) -> tuple[list[str], list[int], list[Step]]:
    """Run a map driver whose requests are answered as soon as they are enqueued; return the
    popped texts, the size of each send and the steps taken."""
    out: list[str] = []
    sends: list[int] = []
    steps: list[Step] = []
    sent_count = 0
    for _ in range(max_steps):
        step = window.step()
        steps.append(step)
        if step is Step.SEND:
            batch = window.to_send()
            sends.append(len(batch))
            errors = []
            for t in batch:
                err = decide(sent_count, t)
                sent_count += 1
                errors.append(err)
                if err is None:
                    _answer(t)
            window.sent(errors)
        elif step is Step.POP:
            t = window.oldest()
            assert t.done()
            window.popleft()
            out.append(t.prepared.fields[b"body"].decode("latin-1"))
            while window.oldest_done():
                out.append(window.popleft()[0].prepared.fields[b"body"].decode("latin-1"))
            window.popped()
        elif step is Step.BACK_OFF:
            window.back_off_s()
        else:
            return out, sends, steps
    raise AssertionError("the window did not finish")


def _texts(n: int) -> list[str]:
    return [f"item-{i:03d}" for i in range(n)]


def test_window_sends_what_it_has_room_for_and_pops_every_ready_result() -> None:
    window = MapWindow(_texts(10), max_in_flight=4, wait_s=10, prepare=_prepare)
    out, sends, _ = _drive(window, lambda i, t: None)
    assert [o[-7:] for o in out] == [f"item-{i:03d}"[-7:] for i in range(10)]
    assert sends == [4, 4, 2]


def test_window_keeps_input_order_across_refusals_and_resends_with_the_same_id() -> None:
    ids: dict[str, list[str]] = {}

    def decide(i: int, t: Ticket) -> E.HeadraceError | None:
        ids.setdefault(t.prepared.fields[b"body"].decode("latin-1")[-8:], []).append(t.request_id)
        # the queue takes the first two, refuses the next three, then takes everything
        return E.QueueFull("full") if 2 <= i < 5 else None

    window = MapWindow(_texts(6), max_in_flight=6, wait_s=10, prepare=_prepare)
    out, sends, steps = _drive(window, decide)
    assert [o[-8:] for o in out] == [t[-8:] for t in _texts(6)]
    assert sends == [6, 3]  # items 2, 3, 4 again, after popping 0 and 1
    assert Step.POP in steps[:3]
    for rids in ids.values():
        assert len(set(rids)) == 1  # a resent request keeps its id


def test_window_backs_off_when_its_oldest_request_is_refused_then_gives_up() -> None:
    window = MapWindow(_texts(3), max_in_flight=3, wait_s=0.05, prepare=_prepare)
    assert window.step() is Step.SEND
    window.sent([E.QueueFull("full")] * len(window.to_send()))
    assert window.step() is Step.BACK_OFF
    assert [window.back_off_s() for _ in range(8)][:3] == [0.01, 0.02, 0.04]
    assert window.back_off_s() == 1.0  # capped
    assert window.step() is Step.SEND  # after backing off it tries again
    time.sleep(0.06)
    with pytest.raises(E.QueueFull):
        window.sent([E.QueueFull("still full")] * len(window.to_send()))


def test_window_raises_broker_errors_and_bad_items() -> None:
    window = MapWindow(_texts(3), max_in_flight=8, wait_s=10, prepare=_prepare)
    batch = window.to_send()
    with pytest.raises(E.BrokerError):
        window.sent([None, E.BrokerError("down"), None][:len(batch)])
    bad = MapWindow(["ok", 3.5], max_in_flight=8, wait_s=10, prepare=_prepare)
    with pytest.raises(E.ProtocolError):
        bad.to_send()
