"""Scale-down while consumers own pending entries: their work is reclaimed, not dropped.

Under steady load two of three workers are stopped while they hold entries, with a drain
timeout far shorter than their batches, so they exit owning unacknowledged work (a replica
scaled down or evicted mid-batch). Consumer cleanup (the path a worker and ``headrace``
use to remove consumers) must refuse to delete a consumer that still owns entries: with
Redis, ``XGROUP DELCONSUMER`` drops a consumer's pending entries for good, which is how
work vanished in other queue systems. The remaining worker reclaims everything after the
lease; then the emptied consumers can be removed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
from tests.support.chaos import Ledger, SteadyProducer, fleet, group_state, wait_nothing_pending, wait_until

LEASE_S = 1.0


def cleanup(url: str) -> list[str]:
    """Run the consumer-cleanup script as a worker does, with no idle threshold at all."""
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=url, consumer="janitor"))

    async def go() -> list[str]:
        try:
            return await broker.delete_idle_consumers(0)
        finally:
            await broker.close()

    return asyncio.run(go())


@pytest.mark.timeout(120)
def test_scaled_down_consumers_with_pending_work_are_reclaimed_not_dropped(redis_url: str, tmp_path: Path,
                                                                         chaos_report: Callable[..., None]) -> None:
    r = redis.Redis.from_url(redis_url)
    prod = SteadyProducer(redis_url, total=900, rate_per_s=120.0)
    ledger = Ledger(redis_url, prod.replies)
    args = ["--max-batch", "16", "--block-ms", "50", "--lease-s", str(LEASE_S), "--max-wait-ms", "5",
            "--trim-interval-s", "0.5"]
    with fleet(redis_url, tmp_path, args, env={"HEADRACE_FAKE_DELAY_MS": "300"}) as f:
        keeper = f.spawn(name="keeper")
        doomed = [f.spawn("--drain-timeout-s", "0.1", name=f"doomed{i}") for i in range(2)]
        ledger.start()
        prod.start()
        wait_until(lambda: all(group_state(r).get("consumers", {}).get(p.name, 0) > 0 for p in doomed), 20,
                   what="both doomed workers own entries")
        codes = [f.stop(p, timeout_s=20) for p in doomed]
        left_behind = {p.name: group_state(r)["consumers"].get(p.name, 0) for p in doomed}
        # Removing consumers now (as scale-down cleanup would) must keep those that own work.
        removed_early = cleanup(redis_url)
        still_there = group_state(r)["consumers"]
        prod.join(30)
        ledger.wait_for(prod.acked_ids(), timeout_s=60)
        time.sleep(LEASE_S + 0.5)
        wait_nothing_pending(r, 10)
        removed_late = cleanup(redis_url)
        report = ledger.report(prod)
        keeper_code = f.stop(keeper)
    ledger.stop()
    chaos_report("2 of 3 workers scaled down mid-batch (drain timeout < batch)", report,
                 left_pending=sum(left_behind.values()))

    assert codes == [0, 0] and keeper_code == 0
    assert sum(left_behind.values()) > 0, "the scaled-down workers should have left entries behind"
    for name, n in left_behind.items():
        if n:
            assert name not in removed_early and name in still_there, "a consumer owning work was deleted"
    assert report.ok, report.line()
    assert report.answered == 900
    assert {p.name for p in doomed if left_behind[p.name]} <= set(removed_late)  # emptied, then removed
    assert set(group_state(r)["consumers"]) <= {"keeper"}
