"""SDK internals without Redis: request preparation, tickets, matching reply entries."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.functions import LIBRARY_SOURCE
from headrace.client.keys import ModelKeys
from headrace.client.submit import function_args, parse_reply, prepare_request, refusal, split_item
from headrace.client.tickets import START_ID, Ticket, TicketBook

KEYS = ModelKeys(namespace="ns", model="affine")
REPLY = KEYS.reply("c1")


def _ticket(rid: str | None = None, timeout_s: float = 5.0) -> Ticket:
    prepared = prepare_request(KEYS, REPLY, {"x": np.ones(4, np.float32)}, None, request_id=rid, deadline_s=0)
    return Ticket(prepared, default_timeout_s=timeout_s)


def _ok(rid: str, value: float = 1.0) -> dict[bytes, bytes]:
    return P.Result(request_id=rid, status=P.STATUS_OK, outputs={"y": np.full(4, value, np.float32)}).encode()


def test_prepare_request_encodes_a_decodable_entry() -> None:
    p = prepare_request(KEYS, REPLY, {"x": [1.0, 2.0, 3.0, 4.0]}, None, request_id="r-1", deadline_s=2.0)
    req = P.decode_request(p.fields)
    assert req.request_id == "r-1" and req.envelope.reply_to == REPLY and req.envelope.model == "affine"
    assert p.stream == "ns:{affine}:requests"
    assert 1500 <= p.deadline_ms - req.envelope.ts_ms <= 2000
    np.testing.assert_array_equal(req.inputs["x"], [1, 2, 3, 4])
    t = prepare_request(KEYS, REPLY, None, "hello", request_id=None, deadline_s=0)
    assert P.decode_request(t.fields).text == "hello" and len(t.request_id) == 32 and t.deadline_ms == 0


@pytest.mark.parametrize("kwargs,code", [
    ({"inputs": None, "text": None}, E.MISSING_FIELD),
    ({"inputs": {"x": np.ones(1)}, "text": "t"}, E.MISSING_FIELD),
    ({"inputs": None, "text": "t", "request_id": "bad id"}, E.DECODE_ERROR),
    ({"inputs": None, "text": "t", "deadline_s": -1}, E.BAD_VALUE),
    ({"inputs": None, "text": "t", "deadline_s": 1e20}, E.BAD_VALUE),  # past the wire's 18 digits of ms
    ({"inputs": None, "text": b"bytes"}, E.BAD_VALUE),
    ({"inputs": {"x": np.ones(1, np.complex64)}, "text": None}, E.BAD_DTYPE),
])
def test_prepare_request_refuses_bad_requests(kwargs: dict[str, object], code: str) -> None:
    args = {"request_id": None, "deadline_s": 0.0, **kwargs}
    with pytest.raises(E.ProtocolError) as info:
        prepare_request(KEYS, REPLY, args.pop("inputs"), args.pop("text"), **args)  # type: ignore[arg-type]
    assert info.value.code == code


def test_function_args_and_reply_parsing() -> None:
    p = prepare_request(KEYS, REPLY, None, "t", request_id="r", deadline_s=0)
    keys, argv = function_args(KEYS, p, 10)
    assert keys == [KEYS.requests, KEYS.limits, KEYS.inbox] and argv[:2] == ["workers", 10]
    assert dict(zip(argv[2::2], argv[3::2], strict=True)) == dict(p.fields)
    assert parse_reply([1, b"1-0"], p, 10) == "1-0"
    with pytest.raises(E.QueueFull) as info:
        parse_reply([0, 10], p, 10)
    assert info.value.code == E.QUEUE_FULL and "backlog of 10" in str(info.value)
    with pytest.raises(E.BrokerError):
        parse_reply(None, p, 10)
    # The function reads the backlog; it never creates groups (workers do, at id 0).
    assert "XINFO" in LIBRARY_SOURCE and "XGROUP" not in LIBRARY_SOURCE


@pytest.mark.parametrize("message,cls,code", [
    ("payload_too_large entry of 9 bytes", E.PayloadTooLargeError, E.PAYLOAD_TOO_LARGE),
    ("missing_field entry field 'id' is missing", E.MissingFieldError, E.MISSING_FIELD),
    ("decode_error bad id", E.DecodeError, E.DECODE_ERROR),
    ("unsupported_version v", E.UnsupportedVersionError, E.UNSUPPORTED_VERSION),
    ("unknown_model m", E.ProtocolError, E.UNKNOWN_MODEL),
    ("Function not found", E.BrokerError, E.BROKER_ERROR),
    ("ERR The stream has exhausted the last possible ID, unable to add more items", E.BrokerError, E.BROKER_ERROR),
    ("unknown command 'FCALL', with args beginning with: ", E.BrokerError, E.BROKER_ERROR),
])
def test_function_refusals_become_errors_with_their_wire_code(message: str, cls: type, code: str) -> None:
    p = prepare_request(KEYS, REPLY, None, "t", request_id="r", deadline_s=0)
    err = refusal(redis.ResponseError(message), p)
    assert isinstance(err, cls) and err.code == code and "r" in str(err)
    if isinstance(err, E.BrokerError):
        assert err.request_id == "r" and not err.retryable  # nothing was added; retrying alone cannot help
    assert refusal(redis.ResponseError("OOM command not allowed"), p) is None  # may or may not have run


def test_split_item() -> None:
    assert split_item("text") == (None, "text")
    inputs = {"x": np.ones(4)}
    assert split_item(inputs) == (inputs, None)
    with pytest.raises(E.ProtocolError):
        split_item(np.ones(4))


def test_ticket_times_out_then_stays_collectable() -> None:
    t = _ticket("r1", timeout_s=0.01)
    with pytest.raises(E.ResultTimeout) as info:
        t.result()
    assert "r1" in str(info.value) and not t.done()
    book = TicketBook()
    assert book.add(t) is True
    assert book.deliver(REPLY, [(b"5-0", _ok("r1"))]) == ["5-0"]
    assert t.done() and t.result(0).ok
    assert len(book) == 0 and book.cursors() == {REPLY: "5-0"}


def test_book_tracks_streams_and_drops_unknown_or_duplicate_results() -> None:
    book = TicketBook()
    a, b = _ticket("a"), _ticket("b")
    assert book.add(a) is True and book.add(b) is False
    assert book.cursors() == {REPLY: START_ID}
    seen: list[str] = []
    a.add_done_callback(lambda t: seen.append(t.request_id))
    ids = book.deliver(REPLY, [(b"1-0", _ok("zzz")), (b"2-0", _ok("a", 3.0)), (b"3-0", _ok("a", 4.0))])
    assert ids == ["1-0", "2-0", "3-0"]
    assert seen == ["a"] and float(a.result(0).outputs["y"][0]) == 3.0  # the first answer wins
    assert [t.request_id for t in book.outstanding()] == ["b"]
    book.discard(b)
    assert len(book) == 0


def test_a_ticket_with_a_done_callback_is_freed_without_the_cyclic_collector() -> None:
    # A closure over the ticket held by its own future made every such ticket a reference
    # cycle; a busy producer then paid for it in full collections that stall its loop.
    seen: list[str] = []
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        book = TicketBook()
        t = _ticket("cb")
        book.add(t)
        t.add_done_callback(lambda ticket: seen.append(ticket.request_id))
        book.deliver(REPLY, [(b"1-0", _ok("cb", 2.0))])
        assert seen == ["cb"] and float(t.result(0).outputs["y"][0]) == 2.0
        ref = weakref.ref(t)
        del t, book
        assert ref() is None  # freed by reference counting alone: no cycle left behind
    finally:
        if was_enabled:
            gc.enable()


def test_a_callback_fires_for_a_ticket_the_caller_dropped() -> None:
    # The book holds the ticket until its answer arrives, so the weak reference the
    # callback goes through is alive when the future completes.
    book = TicketBook()
    seen: list[str] = []
    t = _ticket("gone")
    book.add(t)
    t.add_done_callback(lambda ticket: seen.append(ticket.request_id))
    del t
    book.deliver(REPLY, [(b"1-0", _ok("gone"))])
    assert seen == ["gone"]


def test_undecodable_result_resolves_its_ticket_with_the_code() -> None:
    book = TicketBook()
    t = _ticket("r9")
    book.add(t)
    fields = _ok("r9")
    fields[b"status"] = b"unheard-of"
    book.deliver(REPLY, [(b"1-0", fields)])
    res = t.result(0)
    assert res.status == P.STATUS_ERROR and res.code == E.DECODE_ERROR
    with pytest.raises(E.InferenceFailed):
        res.raise_for_status()


def test_ticket_resolved_from_another_thread_wakes_waiters() -> None:
    book = TicketBook()
    t = _ticket("r2")
    book.add(t)
    threading.Timer(0.05, lambda: book.deliver(REPLY, [(b"1-0", _ok("r2", 7.0))])).start()
    assert float(t.result(5).outputs["y"][0]) == 7.0


def test_ticket_is_awaitable_and_async_timeout_keeps_it_usable() -> None:
    async def scenario() -> float:
        book = TicketBook()
        t = _ticket("r3")
        book.add(t)
        with pytest.raises(E.ResultTimeout):
            await t.wait(0.01)
        asyncio.get_running_loop().call_later(0.02, book.deliver, REPLY, [(b"1-0", _ok("r3", 5.0))])
        res = await t
        return float(res.outputs["y"][0])

    assert asyncio.run(scenario()) == 5.0


def test_async_waiters_are_woken_directly_on_their_loop_and_forgotten_on_timeout() -> None:
    async def scenario() -> None:
        book = TicketBook()
        t = _ticket("r4")
        book.add(t)
        waiting = asyncio.ensure_future(t.wait(5))
        await asyncio.sleep(0)
        assert len(t._waiters) == 1
        book.deliver(REPLY, [(b"1-0", _ok("r4", 2.0))])
        # delivered on the waiter's own loop: completed in place, no thread-safe hop
        assert t._waiters == [] and float((await waiting).outputs["y"][0]) == 2.0
        assert (await t.wait(0)).ok  # done: answered at once, even with a zero timeout

        late = _ticket("r5")
        book.add(late)
        with pytest.raises(E.ResultTimeout):
            await late.wait(0.01)
        assert late._waiters == []  # a timed-out wait leaves nothing behind
        caller = asyncio.ensure_future(late.wait(5))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert late._waiters == [] and not late.done()  # cancelling a caller never cancels the ticket
        book.deliver(REPLY, [(b"2-0", _ok("r5"))])
        assert (await late).ok

    asyncio.run(scenario())


def test_async_waiter_woken_from_the_sync_clients_reader_thread() -> None:
    async def scenario() -> float:
        book = TicketBook()
        t = _ticket("r6")
        book.add(t)
        threading.Timer(0.05, lambda: book.deliver(REPLY, [(b"1-0", _ok("r6", 9.0))])).start()
        return float((await t.wait(5)).outputs["y"][0])

    assert asyncio.run(scenario()) == 9.0


def test_redis_urls_pass_straight_through_to_redis_py() -> None:
    """ACL user/password and rediss:// (TLS) reach redis-py unchanged; nothing connects yet."""
    import redis

    from headrace.client import AsyncClient, Client

    c = Client("rediss://alice:s3cret@cache.example:6380/2", client_id="c1")
    try:
        pool = c._redis.connection_pool
        assert issubclass(pool.connection_class, redis.SSLConnection)
        kw = pool.connection_kwargs
        assert (kw["username"], kw["password"], kw["host"], kw["port"], kw["db"]) == (
            "alice", "s3cret", "cache.example", 6380, 2)
        assert c.reply_stream("minilm") == "headrace:{minilm}:reply:c1"
    finally:
        c.close()
    a = AsyncClient("redis://bob:pw@h:1/0", namespace="ns")
    kw = a._redis.connection_pool.connection_kwargs
    assert (kw["username"], kw["password"]) == ("bob", "pw") and a.reply_stream("m").startswith("ns:{m}:reply:")


def test_a_ticket_awaited_only_from_asyncio_makes_no_thread_future() -> None:
    # The thread future (a threading.Condition inside) cost the SDK ~9 us of CPU per
    # request; the asyncio paths never block a thread, so they must never make one.
    async def scenario() -> Ticket:
        book = TicketBook()
        t = _ticket("a1")
        book.add(t)
        asyncio.get_running_loop().call_later(0.01, book.deliver, REPLY, [(b"1-0", _ok("a1", 4.0))])
        assert float((await t).outputs["y"][0]) == 4.0
        return t

    t = asyncio.run(scenario())
    assert t._future is None and t.done() and not t.cancelled()


def test_thread_waits_made_before_and_after_the_outcome_both_see_it() -> None:
    book = TicketBook()
    early, late, cancelled = _ticket("e"), _ticket("l"), _ticket("c")
    book.add_all([early, late, cancelled])
    seen: list[str] = []
    early.add_done_callback(lambda t: seen.append("early:" + t.request_id))
    got: list[float] = []
    blocked = threading.Thread(target=lambda: got.append(float(early.result(5).outputs["y"][0])))
    blocked.start()
    book.deliver(REPLY, [(b"1-0", _ok("e", 6.0)), (b"2-0", _ok("l", 8.0))])
    blocked.join(5)
    assert got == [6.0] and seen == ["early:e"]
    # Made after the outcome: done at once, callbacks fire in the caller's thread.
    late.add_done_callback(lambda t: seen.append("late:" + t.request_id))
    assert seen == ["early:e", "late:l"] and late._thread_future().done()
    assert float(late.result(0).outputs["y"][0]) == 8.0
    assert cancelled.cancel() and cancelled.cancelled() and not cancelled.cancel()
    with pytest.raises(E.RequestCancelled):
        cancelled.result(0)
    with pytest.raises(E.RequestCancelled):
        cancelled._thread_future().result(0)
    assert book.deliver(REPLY, [(b"3-0", _ok("c"))]) == ["3-0"] and cancelled.cancelled()


def test_async_waiters_made_while_another_thread_resolves_all_wake() -> None:
    # A waiter added just as the sync Client's reader thread completes the ticket must wake
    # either way; with the waiter list taken in between it would wait until its timeout.
    n = 2000

    async def scenario() -> int:
        book = TicketBook()
        tickets = [_ticket(f"race-{i}") for i in range(n)]
        book.add_all(tickets)
        start = threading.Event()

        def reader() -> None:
            start.wait(5)
            for i in range(0, n, 50):
                book.deliver(REPLY, [(f"{j + 1}-0".encode(), _ok(f"race-{j}", float(j))) for j in range(i, i + 50)])

        th = threading.Thread(target=reader)
        th.start()
        start.set()
        results = await asyncio.gather(*(t.wait(10) for t in tickets))
        th.join(5)
        return sum(1 for i, r in enumerate(results) if float(r.outputs["y"][0]) == float(i))

    assert asyncio.run(scenario()) == n
