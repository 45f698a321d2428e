"""The broker contract: the same scenarios against the in-memory broker (the unit tests'
fake) and the Redis broker, so the fake cannot drift from what the worker meets in
production (reads sized to a byte budget, oversize entries truncated, UNWRITABLE replies,
refused commits, outages on every call, delivery counts, trimming). The inbox relay's
scenarios are in test_inbox_contract.py; the harnesses in tests/support/broker_harness.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from headrace.client import errors as E
from headrace.workers.broker.base import CommitRejected
from headrace.workers.pipeline import ops
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.ops import DUPLICATE, UNWRITABLE, WRITTEN, Ack, DeadLetterOp, Reply
from headrace.workers.pipeline.stats import BatchStats
from tests.support.broker_harness import KEYS, MAX_ENTRY, REPLY, req, result_fields


@pytest.mark.timeout(20)
async def test_read_delivers_new_entries_once_oldest_first(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    await b.ensure_group()  # idempotent
    ids = [h.add(req(f"r{i}")) for i in range(3)]
    got = await b.read(10, 10)
    assert [e.entry_id for e in got] == ids and all(e.deliveries == 1 and not e.truncated for e in got)
    assert got[0].fields[b"id"] == b"r0" and got[0].size_bytes == sum(len(k) + len(v) for k, v in req("r0").items())
    assert await b.read(10, 10) == []
    assert set(h.pending()) == set(ids)


@pytest.mark.timeout(20)
async def test_a_read_that_waits_returns_one_entry(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()

    async def later() -> None:
        await asyncio.sleep(0.05)
        for i in range(3):
            h.add(req(f"w{i}"))

    task = asyncio.ensure_future(later())
    got = await b.read(10, 2000)
    await task
    assert [e.fields[b"id"] for e in got] == [b"w0"]
    assert [e.fields[b"id"] for e in await b.read(10, 10)] == [b"w1", b"w2"]


@pytest.mark.timeout(20)
async def test_reads_are_sized_to_the_budget_and_an_oversize_entry_comes_alone_truncated(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    small = [h.add(req(f"s{i}", pad=500)) for i in range(4)]
    big = h.add(req("big", pad=MAX_ENTRY + 1, extra=b"y" * 10))
    after = h.add(req("after"))
    one = len(b"".join(k + v for k, v in req("s0", pad=500).items()))
    got = await b.read(10, 10, budget_bytes=2 * one)
    assert [e.entry_id for e in got] == small[:2]
    got = await b.read(10, 10, budget_bytes=1)  # the first entry always fits
    assert [e.entry_id for e in got] == small[2:3]
    got = await b.read(10, 10, budget_bytes=10**9)
    assert [e.entry_id for e in got] == small[3:4], "an oversize entry is never read with others"
    (trunc,) = await b.read(10, 10, budget_bytes=10**9)
    assert trunc.entry_id == big and trunc.truncated and trunc.field_count == 5
    assert trunc.size_bytes > MAX_ENTRY and set(trunc.fields) == {b"v", b"id", b"reply_to"}
    assert [e.entry_id for e in await b.read(10, 10)] == [after]
    assert big in h.pending(), "the oversize entry is delivered (pending) like any other"


@pytest.mark.timeout(20)
async def test_commit_writes_a_result_once_and_acks(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    e1, e2 = h.add(req("same")), h.add(req("same"))
    await b.read(10, 10)
    out = await b.commit([Reply(e1, "same", REPLY, result_fields("same"))],
                         [BatchStats("a", 1, 1, 0, 1.5, (2.0,))])
    assert out == [WRITTEN]
    assert await b.commit([Reply(e2, "same", REPLY, result_fields("same")), Ack(e2)]) == [DUPLICATE, DUPLICATE]
    assert len(h.replies(REPLY)) == 1 and h.pending() == {}
    assert await b.answered(["same", "other"]) == [True, False]


@pytest.mark.timeout(20)
async def test_cancel_markers_are_read_per_request_id(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    h.cancel("gone", 1_700_000_000_123)
    assert await b.cancel_marks(["gone", "kept"]) == [1_700_000_000_123, 0]
    assert await b.cancel_marks([]) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("h", ["redis"], indirect=True)
async def test_a_junk_cancel_marker_is_not_read_whole(h: Any) -> None:
    """A producer's ACL lets it SET any cancel marker to any value (up to 512 MB). The worker
    reads a bounded prefix of each, so junk costs it neither memory nor network; junk and
    keys of another type count as no marker."""
    b = h.broker()
    await b.ensure_group()
    h.cancel("real", 1_700_000_000_123)
    h.r.set(KEYS.cancel("junk"), b"9" * (32 << 20))
    h.r.rpush(KEYS.cancel("list"), b"1700000000123")
    ids = ["junk", "real", "list", "none"]

    def sent() -> int:
        return int(h.r.info("stats")["total_net_output_bytes"])

    before = sent()
    assert await b.cancel_marks(ids) == [0, 1_700_000_000_123, 0, 0]
    assert await b.prechecks(ids) == ([False] * 4, [0, 1_700_000_000_123, 0, 0])
    assert sent() - before < 64 << 10  # the 32 MB value never left Redis


@pytest.mark.timeout(20)
@pytest.mark.parametrize("h", ["memory", "redis", "partitioned", "cluster"], indirect=True)
async def test_prechecks_ask_both_markers_of_each_request_id(h: Any) -> None:
    """What admission asks before running newly read entries (one round trip on Redis):
    the same answers as ``answered`` and ``cancel_marks``, in the order asked. On a Redis
    Cluster too, where redis-py's pipeline refuses its ``mget`` method (a refused pre-check
    is only logged, so nothing else would show it)."""
    b = h.broker()
    await b.ensure_group()
    e1 = h.add(req("done"))
    await b.read(10, 10)
    assert await b.commit([Reply(e1, "done", REPLY, result_fields("done"))]) == [WRITTEN]
    h.cancel("gone", 1_700_000_000_123)
    ids = ["new", "done", "gone", "other"]
    assert await b.prechecks(ids) == ([False, True, False, False], [0, 0, 1_700_000_000_123, 0])
    assert await b.prechecks(ids) == (await b.answered(ids), await b.cancel_marks(ids))
    assert await b.prechecks([]) == ([], [])


@pytest.mark.timeout(20)
async def test_a_reply_to_a_key_of_another_type_is_unwritable_and_dead_lettered(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    bad_key = KEYS.reply("string")
    h.wrong_type(bad_key)
    eid = h.add(req("u"))
    await b.read(10, 10)
    assert await b.commit([Reply(eid, "u", bad_key, result_fields("u"))]) == [UNWRITABLE]
    (dead,) = h.dlq()
    assert dead[b"id"] == b"u" and dead[ops.DLQ_CODE] == E.INTERNAL_ERROR.encode()
    assert dead[ops.DLQ_ENTRY_ID] == h.stream_id(eid).encode() and h.pending() == {}
    assert await b.answered(["u"]) == [False], "no marker: a replay may answer it"


@pytest.mark.timeout(20)
async def test_dead_letters_keep_bounded_fields_and_tell_the_producer(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    wide = req("wide", **{f"f{i}": b"v" for i in range(4000)})
    e1, e2 = h.add(wide), h.add(req("told"))
    got = {e.entry_id: e for e in await b.read(10, 10)}
    reply = result_fields("told")
    out = await b.commit([
        DeadLetterOp(e1, got[e1].fields, "why", E.DECODE_ERROR, 1, entry_bytes=got[e1].size_bytes,
                     entry_fields=got[e1].field_count),
        DeadLetterOp(e2, got[e2].fields, "poison", E.MODEL_ERROR, 3, "told", REPLY, reply)])
    assert out == [WRITTEN, WRITTEN]
    first, second = h.dlq()
    assert len(first) <= ops.DLQ_MAX_FIELDS + 8 and first[ops.DLQ_ENTRY_FIELDS] == b"4004"
    assert int(first[ops.DLQ_DROPPED_FIELDS]) == 4004 - ops.DLQ_MAX_FIELDS
    assert second[b"body"] == req("told")[b"body"] and second[ops.DLQ_DELIVERIES] == b"3"
    assert h.replies(REPLY) == [reply] and h.pending() == {}


@pytest.mark.timeout(20)
async def test_a_commit_the_queue_refuses_raises_commit_rejected(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    h.wrong_type(h.dlq_key)
    e1, e2 = h.add(req("fine")), h.add(req("doomed"))
    got = {e.entry_id: e for e in await b.read(10, 10)}
    with pytest.raises(CommitRejected):
        await b.commit([Reply(e1, "fine", REPLY, result_fields("fine")),
                        DeadLetterOp(e2, got[e2].fields, "x", E.DECODE_ERROR, 1)])
    # What ran before the refused op stays (a script is not rolled back), with its marker:
    assert await b.commit([Reply(e1, "fine", REPLY, result_fields("fine"))]) == [DUPLICATE]
    assert len(h.replies(REPLY)) == 1 and set(h.pending()) == {e2}


@pytest.mark.timeout(20)
async def test_claim_takes_idle_entries_with_their_delivery_count_and_leases_hold(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    ids = [h.add(req(f"c{i}")) for i in range(3)]
    await a.read(10, 10)
    assert await b.claim_abandoned(200, 10) == []
    await idle(0.3)
    assert await a.refresh_lease([ids[0]]) == [ids[0]]  # a keeps ids[0]
    claimed = await b.claim_abandoned(200, 10)
    assert [(e.entry_id, e.deliveries) for e in claimed] == [(ids[1], 2), (ids[2], 2)]
    assert await a.refresh_lease(ids) == [ids[0]], "a lease is never refreshed back from its new owner"
    assert h.pending()[ids[1]] == ("b", 2)


@pytest.mark.timeout(20)
async def test_claims_are_sized_and_skip_nothing(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    ids = [h.add(req(f"k{i}", pad=500)) for i in range(3)]
    big = h.add(req("kbig", pad=MAX_ENTRY + 1))
    for _ in range(4):
        await a.read(10, 10)
    await idle(0.3)
    first = await b.claim_abandoned(200, 10, budget_bytes=1)
    assert [e.entry_id for e in first] == ids[:1]
    rest = await b.claim_abandoned(200, 10, budget_bytes=10**9)
    assert [e.entry_id for e in rest] == [*ids[1:], big]
    assert rest[-1].truncated and rest[-1].deliveries == 2 and b"body" not in rest[-1].fields


@pytest.mark.timeout(20)
async def test_release_hands_back_with_the_delivery_undone(h: Any, idle: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    eid = h.add(req("h"))
    (entry,) = await a.read(10, 10)
    assert await b.release([entry], 60_000) == [], "only the owner hands back"
    assert await a.release([entry], 60_000) == [eid]
    (again,) = await b.claim_abandoned(1000, 10)
    assert again.entry_id == eid and again.deliveries == 1


@pytest.mark.timeout(20)
async def test_trim_keeps_pending_and_unread_and_backlog_counts_them(h: Any) -> None:
    b = h.broker()
    await b.ensure_group()
    ids = [h.add(req(f"t{i}")) for i in range(5)]
    await b.read(3, 10)
    await b.commit([Ack(ids[0]), Ack(ids[1])])
    assert await b.trim() == 2
    assert h.length() == 3
    backlog = await b.backlog()
    assert (backlog.lag, backlog.pending) == (2, 1)


@pytest.mark.timeout(20)
async def test_samples_per_entry_is_published_at_least_one(h: Any) -> None:
    b = h.broker()
    await b.publish_samples_per_entry(31.5)
    assert h.samples_per_entry() == 31.5
    await b.publish_samples_per_entry(0.2)  # below one sample per entry: one
    assert h.samples_per_entry() == 1.0


@pytest.mark.timeout(20)
async def test_consumers_are_deleted_only_when_they_own_nothing(h: Any) -> None:
    a, b = h.broker("a"), h.broker("b")
    await a.ensure_group()
    h.add(req("o1"))
    (mine,) = await a.read(1, 10)
    h.add(req("o2"))
    (theirs,) = await b.read(1, 10)
    await b.commit([Ack(theirs.entry_id)])
    assert await a.delete_idle_consumers(0, only="a") == []
    assert await a.delete_idle_consumers(0) == ["b"]
    assert set(h.pending()) == {mine.entry_id}


@pytest.mark.timeout(30)
async def test_every_call_raises_broker_error_when_the_queue_is_unreachable(h: Any) -> None:
    b = h.unreachable()
    calls = [b.ensure_group(), b.read(1, 10), b.claim_abandoned(1, 1), b.refresh_lease(["1-0"]), b.release([Entry("1-0", {})], 1),
             b.answered(["x"]), b.cancel_marks(["x"]), b.prechecks(["x"]), b.commit([Ack("1-0")]), b.trim(), b.backlog(), b.heartbeat({"version": "1"}),
             b.unregister(), b.delete_idle_consumers(0), b.ping(), b.relay(1), b.wait_inbox(10),
             b.publish_samples_per_entry(2.0)]
    for call in calls:
        with pytest.raises(E.BrokerError):
            await call
    await b.close()  # never raises
