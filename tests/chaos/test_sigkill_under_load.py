"""Workers SIGKILLed in the middle of batches, again and again, under steady load.

Three worker processes serve a steady stream of requests (a few undecodable ones mixed in);
every second a random worker that owns pending entries is SIGKILLed and a fresh one takes its
place. Nothing may be lost, nothing answered twice, every answer must equal a direct run of
the model; the killed batches really ran again elsewhere (the fakes' run record shows it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.support.chaos import Ledger, SteadyProducer, WorkerProc, fleet, group_state, wait_nothing_pending

LEASE_S = 1.0


@pytest.mark.timeout(150)
def test_sigkill_workers_mid_batch_repeatedly_under_steady_load(redis_url: str, tmp_path: Path,
                                                                 chaos_report: Callable[..., None]) -> None:
    r = redis.Redis.from_url(redis_url)
    prod = SteadyProducer(redis_url, total=1500, rate_per_s=150.0, garbage_every=37)
    ledger = Ledger(redis_url, prod.replies)
    args = ["--max-batch", "16", "--block-ms", "50", "--lease-s", str(LEASE_S), "--max-wait-ms", "5",
            "--trim-interval-s", "0.5", "--max-deliveries", "10"]
    rng = random.Random(20240601)
    mid_batch_kills = 0
    with fleet(redis_url, tmp_path, args, env={"HEADRACE_FAKE_DELAY_MS": "50"}) as f:
        for _ in range(3):
            f.spawn()
        ledger.start()
        prod.start()
        while not prod.done.wait(1.0):
            # Kill a worker that owns unacknowledged entries right now: it is inside a batch
            # (read, running, or writing), the moment a crash can lose or double work.
            owners: list[WorkerProc] = []
            give_up = time.monotonic() + 1.0
            while not owners and time.monotonic() < give_up:
                pending = group_state(r).get("consumers", {})
                owners = [p for p in f.alive() if pending.get(p.name, 0) > 0]
                time.sleep(0.01)
            victim = rng.choice(owners or f.alive())
            mid_batch_kills += bool(owners)
            f.sigkill(victim)
            f.spawn()
        acked = prod.acked_ids()
        ledger.wait_for(acked, timeout_s=60)
        time.sleep(2 * LEASE_S + 0.5)  # a late duplicate (a reclaimed, re-run entry) would land now
        wait_nothing_pending(r, 10)
        exit_codes = f.stop_all()
        report = ledger.report(prod)
        runs = f.runs()
    ledger.stop()
    chaos_report("SIGKILL worker mid-batch, repeatedly", report, kills=f.kills, mid_batch_kills=mid_batch_kills,
                 reruns=sum(n - 1 for n in runs.values()))

    assert report.ok, report.line()
    assert report.sent == 1500 and report.answered == 1500
    assert report.codes["decode_error"] == len(prod.garbage) > 0  # bad input answered, once
    assert f.kills >= 5 and mid_batch_kills >= f.kills // 2, (f.kills, mid_batch_kills)
    assert all(code == -9 for code in f.exit_codes[: f.kills]), f.exit_codes
    assert exit_codes and all(code == 0 for code in exit_codes), (exit_codes, f.logs())
    # Work of killed workers really was done twice, and still answered once.
    assert sum(n - 1 for n in runs.values()) > 0
    assert set(runs) == {rid for rid in acked if rid not in prod.garbage}
