"""Containment (issue #10, item 1): one entry fails alone, whatever step it breaks.

Each test first reproduces an attack seen against a real worker and Redis, then checks the
worker answers (or dead-letters) the attacking entry, answers every batch-mate, and keeps
serving normal requests afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.admin.dlq import dlq_list
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, pending_count, produce, wait_until, worker_procs

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
        assert nines.code == E.DECODE_ERROR  # the protocol takes 1-18 ASCII digits; the entry alone fails
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


@pytest.mark.timeout(90)
def test_a_standalone_worker_whose_task_dies_exits_non_zero_and_its_entries_are_rescued(
        redis_url: str, tmp_path: Path) -> None:
    # The writer task dies (an exception where a bug would raise it): the process must not
    # stay up heartbeating while answering nothing; it exits 2 for its supervisor, and its
    # pending entries go to another worker once their lease lapses.
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(6)])
    code = ("import sys\n"
            "from headrace.workers.broker.redis_broker import RedisBroker\n"
            "async def boom(self, *args, **kw):\n"
            "    raise RuntimeError('injected into the writer')\n"
            "RedisBroker.commit = boom\n"
            "from headrace.workers.__main__ import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
    proc = subprocess.run([sys.executable, "-c", code, "--fake", "affine", "--redis-url", redis_url,
                           "--lease-s", "1", "--block-ms", "50", "--consumer", "victim"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "worker task 'write' died" in proc.stderr
    assert {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(keys.requests, keys.group)} == {"victim": 6}
    with worker_procs(redis_url, tmp_path) as spawn:
        spawn("--lease-s", "1", "--block-ms", "50")
        collector = Collector(r, reply)
        collector.wait_for(6, timeout_s=30)
        got = collector.by_id()
        assert sorted(got) == [f"r{i}" for i in range(6)] and all(len(v) == 1 and v[0].ok for v in got.values())
        wait_until(lambda: pending_count(r, keys) == 0)
