"""Trimming under load never removes an unacknowledged request, and memory stays bounded.

Workers trim the request stream every 0.25 s to what the group has acknowledged while a
steady load runs; mid-run one worker is SIGKILLed holding pending entries, which must
survive every trim until another worker reclaims and answers them (a trim that cut them
would make them unclaimable: lost). Meanwhile a sampler watches the stream length, the
dedupe markers and Redis memory: after the run the stream is trimmed back to (almost)
nothing, the markers expire with ``dedupe_ttl_s``, consumed replies are gone, and Redis
memory returns close to where it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.broker.redis_broker import STATS_MAXLEN
from tests.support.chaos import (
    MODEL,
    NS,
    Ledger,
    Sampler,
    SteadyProducer,
    count_keys,
    fleet,
    group_state,
    registered_workers,
    wait_until,
)

LEASE_S = 1.0
DEDUPE_TTL_S = 4


@pytest.mark.timeout(150)
def test_trimming_under_load_keeps_unacked_entries_and_memory_bounded(redis_url: str, tmp_path: Path,
                                                                    chaos_report: Callable[..., None]) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, MODEL)
    total = 2400
    prod = SteadyProducer(redis_url, total=total, rate_per_s=300.0)
    ledger = Ledger(redis_url, prod.replies, delete=True)  # consume like the SDK: XDEL what was read
    sampler = Sampler(redis_url, interval_s=0.2)
    args = ["--max-batch", "32", "--block-ms", "50", "--lease-s", str(LEASE_S), "--max-wait-ms", "5",
            "--trim-interval-s", "0.25", "--dedupe-ttl-s", str(DEDUPE_TTL_S)]
    with fleet(redis_url, tmp_path, args, env={"HEADRACE_FAKE_DELAY_MS": "60"}) as f:
        for _ in range(3):
            f.spawn()
        wait_until(lambda: len(registered_workers(r)) == 3, 20, what="3 workers up")
        baseline = sampler.sample(r)
        sampler.start()
        ledger.start()
        prod.start()
        time.sleep(3.0)
        victim = max(f.alive(), key=lambda p: group_state(r)["consumers"].get(p.name, 0))
        orphaned = group_state(r)["consumers"].get(victim.name, 0)
        orphan_ids = [e["message_id"] for e in r.xpending_range(keys.requests, keys.group, "-", "+", 1000,
                                                                consumername=victim.name)]
        f.sigkill(victim)
        prod.join(60)
        load_end = time.monotonic()
        ledger.wait_for(prod.acked_ids(), timeout_s=60)
        # Trimmed back once everything is acknowledged (XTRIM MINID keeps the last delivered one).
        wait_until(lambda: r.xlen(keys.requests) <= 1, 15, what="request stream trimmed")
        wait_until(lambda: count_keys(r, keys.done_prefix + "*") == 0, DEDUPE_TTL_S + 10,
                   what="dedupe markers expired")
        wait_until(lambda: all(r.xlen(s) == 0 for s in prod.replies), 10, what="replies consumed")
        end = sampler.sample(r)
        sampler.stop()
        exit_codes = f.stop_all()
    ledger.stop()
    report = ledger.report(prod)
    during = [s for s in sampler.samples if s["t"] <= load_end]
    extra = {"orphaned_at_kill": orphaned, "peak_xlen": int(sampler.peak("xlen")),
             "peak_done_keys": int(sampler.peak("done_keys")),
             "peak_used_memory_mb": round(sampler.peak("used_memory") / 2**20, 2),
             "baseline_used_memory_mb": round(baseline["used_memory"] / 2**20, 2),
             "end_used_memory_mb": round(end["used_memory"] / 2**20, 2), "end_xlen": int(end["xlen"]),
             "stats_len": int(r.xlen(keys.stats))}
    chaos_report("trim every 0.25 s under load + SIGKILL holding entries", report, **extra)

    assert report.ok, report.line()
    assert report.answered == total and orphaned > 0 and orphan_ids
    # The orphaned entries were not trimmed while pending: they were reclaimed and answered.
    assert exit_codes == [0, 0]
    # Trimming happened while the load was still running, not only at the end.
    assert any(s["xlen"] < s["added"] for s in during), during[-3:]
    # Bounded: everything this run created is gone or capped again.
    assert end["xlen"] <= 1 and end["done_keys"] == 0
    assert r.xlen(keys.stats) <= STATS_MAXLEN + 200  # approximate MAXLEN trimming
    assert r.xlen(keys.dlq) == 0
    assert end["used_memory"] <= baseline["used_memory"] + 4 * 2**20, extra
