"""Containment (issue #10, item 1): one entry fails alone, whatever step it breaks.

Each test first reproduces an attack seen against a real worker and Redis, then checks the
worker answers (or dead-letters) the attacking entry, answers every batch-mate, and keeps
serving normal requests afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.admin.dlq import dlq_list
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, pending_count, produce

NINES = b"9" * 400


def _settings(url: str, **kw: object) -> WorkerSettings:
    base: dict[str, object] = dict(model="affine", redis_url=url, consumer="w", max_batch=8, max_wait_ms=30,
                                   block_ms=20, lease_s=0.5, max_deliveries=3)
    base.update(kw)
    return WorkerSettings(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_ts_ms_of_400_nines_with_a_bad_body_does_not_kill_the_writer(redis_url: str) -> None:
    # Seen: the writer task died in Unit.stats_line (float(at_ms - ts_ms) overflowed), the
    # process kept heartbeating and refreshing leases, and nothing was answered any more.
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    wt = WorkerThread(_settings(redis_url), AffineServable()).start()
    try:
        attack = {b"v": b"1", b"id": b"x", b"reply_to": reply.encode(), b"ts_ms": NINES, b"body": b"\xc1"}
        produce(r, keys, [attack])
        produce(r, keys, [affine_request(f"after{i}", float(i), reply) for i in range(10)])
        collector = Collector(r, reply)
        collector.wait_for(11, timeout_s=20)
        got = collector.by_id()
        assert got["x"][0].code == E.DECODE_ERROR and len(got["x"]) == 1
        for i in range(10):
            (res,) = got[f"after{i}"]
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(np.full(4, float(i))))
        assert wt.healthy()
        assert pending_count(r, keys) == 0
    finally:
        wt.stop()


@pytest.mark.timeout(60)
def test_ts_ms_of_400_nines_with_a_valid_body_leaves_its_batch_mates_alone(redis_url: str) -> None:
    # Seen: an OverflowError in the batch run released the whole batch for redelivery three
    # times; six innocent batch-mates ended up max_deliveries_exceeded.
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    sv = AffineServable()
    wt = WorkerThread(_settings(redis_url, max_wait_ms=200), sv).start()
    try:
        entries = [affine_request(f"mate{i}", float(i), reply) for i in range(6)]
        entries.insert(3, {**affine_request("nines", 5.0, reply), b"ts_ms": NINES})
        produce(r, keys, entries)
        collector = Collector(r, reply)
        collector.wait_for(7, timeout_s=20)
        got = collector.by_id()
        for i in range(6):
            (res,) = got[f"mate{i}"]
            assert res.ok, res
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(np.full(4, float(i))))
        (nines,) = got["nines"]
        assert nines.ok and nines.timings.queue_ms == 0.0  # a submit time in the future is unknown
        assert all(n == 1 for rid, n in sv.invocations.items() if rid.startswith("mate"))
        assert dlq_list(r, "headrace", "affine") == []
    finally:
        wt.stop()


@pytest.mark.timeout(60)
def test_4000_fields_and_a_foreign_reply_to_are_dead_lettered_not_retried_forever(redis_url: str) -> None:
    # Seen: the dead letter copied every field into one XADD; Lua's unpack() failed with
    # "too many results to unpack", the commit failed, and it was retried forever.
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    wt = WorkerThread(_settings(redis_url), AffineServable()).start()
    try:
        attack = {**affine_request("wide", 1.0, "elsewhere"), **{f"f{i}".encode(): b"x" for i in range(4000)}}
        produce(r, keys, [attack, affine_request("after", 2.0, reply)])
        collector = Collector(r, reply)
        collector.wait_for(1, timeout_s=20)
        assert collector.by_id()["after"][0].ok
        (dl,) = dlq_list(r, "headrace", "affine")
        assert dl.request_id == "wide" and dl.code == E.DECODE_ERROR
        assert len(dl.fields) <= 64, "the dead letter keeps 64 fields at most, and records the rest by count"
        assert dl.entry_fields == 4006 and dl.entry_bytes > 4000 * 5 and not dl.complete
        assert pending_count(r, keys) == 0 and not r.exists("elsewhere")
    finally:
        wt.stop()
