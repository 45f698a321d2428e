"""Batches that run longer than the lease: the running worker keeps renewing its lease, so
the other workers, which reclaim anything idle longer than ``lease_s``, never steal the
entries and never run them a second time (the failure mode of visibility-timeout queues,
where a task longer than the timeout is delivered again and runs twice).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.support.chaos import Ledger, SteadyProducer, fleet, wait_nothing_pending

LEASE_S = 1.2
BATCH_S = 3.0  # each model run takes 2.5 leases


@pytest.mark.timeout(120)
def test_batches_longer_than_the_lease_are_neither_stolen_nor_run_twice(redis_url: str, tmp_path: Path,
                                                                       chaos_report: Callable[..., None]) -> None:
    r = redis.Redis.from_url(redis_url)
    prod = SteadyProducer(redis_url, total=60, rate_per_s=15.0)
    ledger = Ledger(redis_url, prod.replies)
    args = ["--max-batch", "8", "--block-ms", "50", "--lease-s", str(LEASE_S), "--max-wait-ms", "200",
            "--trim-interval-s", "0.5"]
    with fleet(redis_url, tmp_path, args, env={"HEADRACE_FAKE_DELAY_MS": str(BATCH_S * 1000),
                                                          "HEADRACE_LOG_LEVEL": "INFO"}) as f:
        for _ in range(3):
            f.spawn()
        ledger.start()
        prod.start()
        prod.join(30)
        ledger.wait_for(prod.acked_ids(), timeout_s=90)
        time.sleep(LEASE_S + 1.0)
        wait_nothing_pending(r, 10)
        exit_codes = f.stop_all()
        runs = f.runs()
        logs = f.logs()
    ledger.stop()
    report = ledger.report(prod)
    chaos_report(f"batch of {BATCH_S:.0f} s with lease_s={LEASE_S}", report,
                 runs=sum(runs.values()), run_twice=sum(1 for n in runs.values() if n > 1))

    assert report.ok, report.line()
    assert report.answered == 60
    # Every request went through the model exactly once: no steal, no second run.
    assert set(runs) == set(prod.sent) and set(runs.values()) == {1}, runs.most_common(3)
    # (INFO logs: a reclaim would log "claimed N abandoned entries", a steal "lease lost".)
    assert "serving affine" in logs and "lease lost" not in logs and "abandoned" not in logs, logs
    assert exit_codes == [0, 0, 0]
