"""Poison requests under load: dead-lettered after ``max_deliveries`` with their producers
told (once), batch-mates unharmed; after a fix, ``headrace dlq replay`` requeues them and
they are answered normally.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.client.protocol import Result
from headrace.workers.admin.dlq import dlq_list
from headrace.workers.backends.fake import affine_reference
from tests.support.chaos import MODEL, NS, Ledger, SteadyProducer, fleet, wait_nothing_pending, wait_until

LEASE_S = 1.0
MAX_DELIVERIES = 3
POISON = -1.0


def headrace_cli(url: str, *args: str) -> str:
    exe = Path(sys.executable).with_name("headrace")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "headrace.cluster.cli.main"]
    out = subprocess.run([*cmd, "--redis-url", url, *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


@pytest.mark.timeout(150)
def test_poison_requests_reach_the_dlq_producers_are_told_and_replay_answers_them(
        redis_url: str, tmp_path: Path, chaos_report: Callable[..., None]) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, MODEL)
    prod = SteadyProducer(redis_url, total=600, rate_per_s=100.0, poison_every=40, poison_value=POISON)
    ledger = Ledger(redis_url, prod.replies)
    args = ["--max-batch", "16", "--block-ms", "50", "--lease-s", str(LEASE_S), "--max-wait-ms", "5",
            "--max-deliveries", str(MAX_DELIVERIES), "--trim-interval-s", "0.5"]
    with fleet(redis_url, tmp_path, args, env={"HEADRACE_FAKE_DELAY_MS": "20"}) as f:
        for _ in range(2):
            f.spawn(env={"HEADRACE_FAKE_POISON": str(POISON)})
        ledger.start()
        prod.start()
        prod.join(30)
        ledger.wait_for(prod.acked_ids(), timeout_s=60)
        time.sleep(LEASE_S + 0.5)
        wait_nothing_pending(r, 10)

        def first_pass(rid: str, res: Result) -> bool:
            if rid in prod.poison:
                return res.code == "max_deliveries_exceeded"
            return res.ok and np.array_equal(res.outputs["y"], prod.expected(rid))

        report = ledger.report(prod, check=first_pass)
        dead = dlq_list(r, NS, MODEL, count=1000)
        runs = f.runs()
        assert f.stop_all() == [0, 0]

        # The fix: workers without the poison; replay the dead letters through the CLI.
        fixed = f.spawn()
        out = headrace_cli(redis_url, "dlq", "replay", MODEL)
        poison = set(prod.poison)
        wait_until(lambda: all(len(ledger.results.get(rid, [])) == 2 for rid in poison), 30,
                   what="replayed requests answered")
        time.sleep(LEASE_S + 0.5)
        after = {rid: list(ledger.results[rid]) for rid in poison}
        dlq_left = r.xlen(keys.dlq)
        assert f.stop(fixed) == 0
    ledger.stop()
    chaos_report(f"poison requests (max_deliveries={MAX_DELIVERIES}) + dlq replay", report,
                 poison=len(poison), dead_letters=len(dead), replayed=out.strip())

    assert report.ok, report.line()
    assert report.answered == 600 and len(poison) == 15
    assert report.codes["max_deliveries_exceeded"] == 15 and report.codes["ok"] == 585
    # Dead letters: exactly the poison requests, each after max_deliveries deliveries.
    assert sorted(d.request_id for d in dead) == sorted(poison)
    assert {d.code for d in dead} == {"model_error"} and {d.deliveries for d in dead} == {MAX_DELIVERIES}
    assert all(MAX_DELIVERIES <= runs[rid] <= 2 * MAX_DELIVERIES for rid in poison), {rid: runs[rid] for rid in poison}
    # Replay: every poison request answered a second time, now correctly; the DLQ is empty.
    assert out.strip() == f"replayed 15 dead letter(s) of {MODEL}"
    for rid, results in after.items():
        assert results[0].code == "max_deliveries_exceeded", rid
        assert results[1].ok, rid
        np.testing.assert_array_equal(results[1].outputs["y"], affine_reference(np.full(4, POISON, np.float32)))
    assert dlq_left == 0
