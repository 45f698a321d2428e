"""The commit script on a real Redis, where the broker contract cannot look: every entry of a
batch acked (one XACK per script, in slices) and every reply stream written given its TTL
(one PEXPIRE per stream), for batches of mixed ops, batches larger than one XACK slice, and a
batch the script refuses half-way."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from headrace.workers.broker import scripts
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline.ops import DUPLICATE, UNWRITABLE, WRITTEN, Ack, DeadLetterOp, Reply
from tests.support.broker_harness import KEYS, RedisHarness, req, result_fields

HB = tuple[RedisHarness, RedisBroker]


@pytest.fixture
async def hb(redis_url: str) -> AsyncIterator[HB]:
    """The Redis harness and a Redis broker on it, its group made; closed after the test."""
    h = RedisHarness(redis_url)
    b = h.broker()
    assert isinstance(b, RedisBroker)
    try:
        await b.ensure_group()
        yield h, b
    finally:
        await h.close()


def _reply_ttl_ms(b: RedisBroker) -> int:
    return b.settings.reply_ttl_s * 1000


@pytest.mark.timeout(60)
async def test_a_mixed_batch_acks_every_entry_and_gives_each_reply_stream_its_ttl(hb: HB) -> None:
    h, b = hb
    streams = [KEYS.reply(f"c{i}") for i in range(3)]
    h.wrong_type(KEYS.reply("bad"))
    ids = [h.add(req(f"r{i}")) for i in range(30)]
    assert len(await b.read(100, 10)) == 30
    ops: list[Reply | Ack | DeadLetterOp] = [Reply(e, f"r{i}", streams[i % 3], result_fields(f"r{i}"))
                                             for i, e in enumerate(ids[:24])]
    ops += [Ack(ids[24]), Ack(ids[25])]
    ops.append(Reply(ids[26], "r26", KEYS.reply("bad"), result_fields("r26")))
    ops.append(Reply(ids[27], "r0", streams[0], result_fields("r0")))  # r0 answered above
    ops.append(DeadLetterOp(ids[28], req("r28"), "model failed", "model_error", 1, request_id="r28",
                            reply_to=streams[1], reply_fields=result_fields("r28")))
    ops.append(DeadLetterOp(ids[29], req("r29"), "no route", "decode_error", 1))
    out = await b.commit(ops)
    assert out == [WRITTEN] * 24 + [DUPLICATE, DUPLICATE, UNWRITABLE, DUPLICATE, 1, 1]
    assert h.pending() == {}, "every entry of the batch is acked, whatever its op"
    for i, s in enumerate(streams):
        assert len(h.replies(s)) == 8 + (i == 1), s
        assert 0 < h.r.pttl(s) <= _reply_ttl_ms(b)
    assert h.r.type(KEYS.reply("bad")) == b"string" and h.r.pttl(KEYS.reply("bad")) == -1
    assert len(h.dlq()) == 3  # the unwritable reply and the two dead letters


@pytest.mark.timeout(120)
async def test_a_batch_larger_than_one_ack_slice_is_acked_whole(hb: HB) -> None:
    # unpack() spreads at most ~8000 values, so the script acks in slices of 4000 ids.
    h, b = hb
    pipe = h.r.pipeline(transaction=False)
    for i in range(9001):
        pipe.xadd(KEYS.requests, req(f"big{i}"))
    ids = [x.decode() for x in pipe.execute()]
    read = 0
    while read < len(ids):
        read += len(await b.read(10_000, 10))
    half = [Reply(e, f"big{i}", KEYS.reply("c"), result_fields(f"big{i}")) for i, e in enumerate(ids[:4500])]
    acks = [Ack(e) for e in ids[4500:]]
    assert await b.commit([*half, *acks]) == [WRITTEN] * 4500 + [DUPLICATE] * 4501
    assert h.r.xpending(KEYS.requests, KEYS.group)["pending"] == 0
    assert h.r.xlen(KEYS.reply("c")) == 4500 and 0 < h.r.pttl(KEYS.reply("c")) <= _reply_ttl_ms(b)


@pytest.mark.timeout(60)
async def test_a_batch_refused_half_way_keeps_what_it_did_acked_and_expiring(hb: HB) -> None:
    # Only a caller out of step with the script sends an unknown op; what the script did
    # before it must still be whole: answered entries acked, their reply stream expiring.
    h, b = hb
    first, second = h.add(req("h1")), h.add(req("h2"))
    await b.read(10, 10)
    keys, args = b._commit_args([Reply(first, "h1", KEYS.reply("c"), result_fields("h1"))], 1_700_000_000_000)
    args += [b"Z", second]
    with pytest.raises(redis.ResponseError, match="unknown op"):
        h.r.eval(scripts.source("COMMIT"), len(keys), *keys, *args)
    assert list(h.pending()) == [second], "the answered entry is acked, the refused one still pending"
    assert len(h.replies(KEYS.reply("c"))) == 1 and 0 < h.r.pttl(KEYS.reply("c")) <= _reply_ttl_ms(b)
