"""The broker contract for the inbox (strict submit mode): relaying it into the request
stream, waiting for it, dead-lettering what breaks the entry bounds, putting back what
cannot be added; against the in-memory broker, Redis, a partitioned model and a Redis
Cluster, where the pipelined wait and relay goes through the cluster client (the harnesses
in tests/support/broker_harness.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from headrace.client import errors as E
from headrace.client.protocol import now_ms
from headrace.workers.broker.base import RelayStep
from tests.support.broker_harness import PAYLOAD, packed, req

# The harness fixture of tests/integration/conftest.py, with a Redis Cluster's added.
pytestmark = pytest.mark.parametrize("h", ["memory", "redis", "partitioned", "cluster"], indirect=True)


@pytest.mark.timeout(20)
async def test_relay_moves_the_oldest_inbox_elements_into_the_stream_in_order(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    assert await b.relay(10) == RelayStep(0, 0, 0)
    for i in range(5):
        h.push(packed(req(f"i{i}")))
    step = await b.relay(3)
    assert step == RelayStep(3, 0, 2) and h.inbox() == 2
    assert (await b.relay(10)).added == 2 and h.inbox() == 0
    got = await b.read(10, 10)
    assert [e.fields[b"id"] for e in got] == [f"i{i}".encode() for i in range(5)]
    assert dict(got[0].fields) == req("i0"), "the entry is the element's fields, nothing added"
    assert h.dlq() == []


@pytest.mark.timeout(20)
async def test_relay_dead_letters_what_breaks_the_entry_bounds_without_its_payload(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    def mp(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=False)  # strings as msgpack str, as cmsgpack packs them

    bad = {
        b"not msgpack \xc1": "decode_error",
        msgpack.packb([b"v", b"1"], use_bin_type=True): "decode_error",  # bin types: Lua's cmsgpack refuses them
        mp({"v": "1", "id": "m"}): "decode_error",                         # a map, not pairs
        mp([b"v", b"1"]) + mp([b"v", b"1"]): "decode_error",               # two objects
        mp([b"v", b"1", b"id"]): "decode_error",                           # odd
        mp([b"v", 1, b"id", b"x"]): "decode_error",                        # not strings
        mp([b"v", [b"1"], b"id", b"x"]): "decode_error",                   # nested
        mp([b"id", b"a", b"id", b"b"]): "decode_error",                    # a name twice
        mp([b"x" * 65, b"1"]): "decode_error",                             # a long name
        mp([x for i in range(17) for x in (f"f{i}".encode(), 1)]): "payload_too_large",  # 17 fields
        packed(req("fat", pad=PAYLOAD)): "payload_too_large",              # all fields > max_payload_bytes
        b"\x91" + mp(b"y" * (4 * PAYLOAD)): "payload_too_large",          # oversize: never decoded
    }
    h.push(packed(req("good-1")))
    for raw in bad:
        h.push(raw)
    h.push(packed(req("good-2")))
    step = await b.relay(100)
    assert step == RelayStep(2, len(bad), 0)
    assert [e.fields[b"id"] for e in await b.read(10, 10)] == [b"good-1", b"good-2"]
    letters = h.dlq()
    assert [d[b"dlq_code"].decode() for d in letters] == list(bad.values())
    assert all(d[b"dlq_entry_id"] == b"inbox" for d in letters)
    assert [int(d[b"dlq_entry_bytes"]) for d in letters] == [len(raw) for raw in bad]
    assert max(len(v) for d in letters for v in d.values()) < 1024, "no payload was copied"


@pytest.mark.timeout(20)
async def test_waiting_for_the_inbox_leaves_the_element_for_any_relay(h: Any) -> None:
    a, other = h.broker("a"), h.broker("b")
    await a.ensure_group()
    assert await a.wait_inbox(20) is False

    async def later() -> None:
        await asyncio.sleep(0.05)
        h.push(packed(req("w")))

    task = asyncio.ensure_future(later())
    assert await a.wait_inbox(2000) is True
    await task
    assert h.inbox() == 1, "the wait took nothing"
    # The waiting worker may die now: any other relays the element, once.
    assert await other.relay(10) == RelayStep(1, 0, 0)
    assert await a.relay(10) == RelayStep(0, 0, 0)
    assert [e.fields[b"id"] for e in await a.read(10, 10)] == [b"w"]


@pytest.mark.timeout(20)
async def test_wait_and_relay_moves_what_arrives_during_the_wait(h: Any) -> None:
    a = h.broker("a")
    await a.ensure_group()
    assert await a.wait_and_relay(10, 20) == RelayStep(0, 0, 0), "a wait that times out moves nothing"

    async def later() -> None:
        await asyncio.sleep(0.05)
        h.push(packed(req("w1")))
        h.push(packed(req("w2")))

    task = asyncio.ensure_future(later())
    step = await a.wait_and_relay(10, 2000)
    await task
    assert step.added >= 1 and step.dead_lettered == 0
    rest = await a.relay(10)  # whatever arrived after the step's relay, the next one takes
    assert step.added + rest.added == 2 and rest.left == 0 and h.inbox() == 0
    assert [e.fields[b"id"] for e in await a.read(10, 10)] == [b"w1", b"w2"]


@pytest.mark.timeout(20)
async def test_a_dead_letter_from_wait_and_relay_carries_the_time_it_was_relayed(h: Any) -> None:
    """The pipelined wait and relay is sent before the element arrives: its dead letters
    must still carry the time they were made, not the time the wait began."""
    a = h.broker("a")
    await a.ensure_group()
    pushed: list[int] = []

    async def later() -> None:
        await asyncio.sleep(0.4)
        pushed.append(now_ms())
        h.push(b"\xc1 not msgpack")

    task = asyncio.ensure_future(later())
    step = await a.wait_and_relay(10, 3000)
    await task
    assert step.dead_lettered == 1
    stamped = int(h.dlq()[0][b"dlq_ts_ms"])
    assert pushed[0] - 50 <= stamped <= now_ms() + 50, (stamped, pushed)


@pytest.mark.timeout(20)
async def test_a_relay_that_cannot_add_puts_everything_back_in_order(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    for i in range(3):
        h.push(packed(req(f"p{i}")))
    h.wrong_type(h.requests_key)  # a stream key of another type: every XADD fails
    with pytest.raises(E.BrokerError):
        await b.relay(10)
    assert h.inbox() == 3 and h.dlq() == [], "nothing popped is lost"
