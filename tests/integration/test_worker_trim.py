"""Trimming only removes what every consumer group acknowledged, also under load; dedupe
markers and reply streams carry TTLs."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.broker import scripts
from tests.support.worker import Collector, affine_request, pending_count, produce, wait_until, worker_procs


def _trim(r: redis.Redis, keys: ModelKeys) -> int:
    return int(r.register_script(scripts.TRIM)(keys=[keys.requests]))


def test_trim_keeps_everything_some_group_has_not_acknowledged(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    assert _trim(r, keys) == 0  # no stream, no group: nothing to do
    ids = produce(r, keys, [affine_request(f"r{i}", 1.0, keys.reply("c")) for i in range(10)])
    assert _trim(r, keys) == 0  # no group has read anything
    r.xgroup_create(keys.requests, "workers", id="0")
    r.xgroup_create(keys.requests, "audit", id="0")
    r.xreadgroup("workers", "w", {keys.requests: ">"}, count=10)
    r.xack(keys.requests, "workers", *ids[:7])  # workers: 7 acked, 3 pending
    r.xreadgroup("audit", "a", {keys.requests: ">"}, count=5)
    r.xack(keys.requests, "audit", *ids[:2], ids[3])  # audit: ids[2] and ids[4] pending, 5..9 unread
    assert _trim(r, keys) == 2  # only ids[0], ids[1]: acked by both groups
    assert [e[0].decode() for e in r.xrange(keys.requests)] == ids[2:]
    r.xack(keys.requests, "audit", ids[2], ids[4])
    assert _trim(r, keys) == 2  # audit's floor is now its last-delivered id (ids[4]), kept
    r.xreadgroup("audit", "a", {keys.requests: ">"}, count=10)
    r.xack(keys.requests, "audit", *ids[5:])
    assert _trim(r, keys) == 3  # now the workers' oldest pending (ids[7]) is the floor
    assert [e[0].decode() for e in r.xrange(keys.requests)] == ids[7:]


@pytest.mark.timeout(90)
def test_trimming_under_load_never_removes_an_unacknowledged_entry(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    r.xgroup_create(keys.requests, "workers", id="0", mkstream=True)
    r.xgroup_create(keys.requests, "audit", id="0")
    n = 1500
    produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(200)])
    # A slow second consumer group holds 100 entries unacknowledged the whole time.
    audit = r.xreadgroup("audit", "auditor", {keys.requests: ">"}, count=100)
    held = [eid.decode() for eid, _ in audit[0][1]]
    collector = Collector(r, reply)
    violations: list[str] = []
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--consumer", "w", "--max-batch", "16", "--block-ms", "20", "--trim-interval-s", "0.02",
                  "--dedupe-ttl-s", "600", "--reply-ttl-s", "300", env={"HEADRACE_FAKE_DELAY_MS": "2"})
        for start in range(200, n, 100):
            produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(start, start + 100)])
            for _ in range(5):
                _check_pending_entries_exist(r, keys, held, violations)
                time.sleep(0.01)
        collector.wait_for(n, timeout_s=60)
        assert not violations, violations[:5]
        # audit still holds its 100: nothing from them on may have been trimmed
        assert [e[0].decode() for e in r.xrange(keys.requests, count=100)] == held
        r.xack(keys.requests, "audit", *held)
        r.xgroup_setid(keys.requests, "audit", "$")  # the audit group catches up
        wait_until(lambda: r.xlen(keys.requests) <= 1, timeout_s=20)  # now the worker trims it all
        w.signal(signal.SIGTERM)
        assert w.wait(20) == 0
    got = collector.by_id()
    assert len(got) == n and all(len(v) == 1 and v[0].ok for v in got.values())
    assert pending_count(r, keys) == 0
    # dedupe markers and reply streams expire
    for rid in ("r0", "r700", f"r{n - 1}"):
        assert 0 < r.ttl(keys.done(rid)) <= 600
    assert 0 < r.pttl(reply) <= 300_000


def _check_pending_entries_exist(r: redis.Redis, keys: ModelKeys, held: list[str], violations: list[str]) -> None:
    for eid in (held[0], held[-1]):
        if not r.xrange(keys.requests, eid, eid):
            violations.append(f"audit-held {eid} trimmed")
    p = r.xpending(keys.requests, "workers")
    if p["pending"]:
        oldest = p["min"].decode()
        if not r.xrange(keys.requests, oldest, oldest):
            # still pending after we saw it gone -> trimmed while unacknowledged
            if r.xpending_range(keys.requests, "workers", min=oldest, max=oldest, count=1):
                violations.append(f"workers-pending {oldest} trimmed")
