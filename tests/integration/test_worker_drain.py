"""Graceful drain: SIGTERM mid-batch finishes and acks in-flight work, leaves nothing
pending for the stopped consumer, and leaves unread work for others."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.admin.status import list_models
from tests.support.worker import (
    Collector,
    affine_request,
    consumers,
    pending_count,
    produce,
    records,
    wait_until,
    worker_procs,
)


@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_and_leaves_no_pending(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    record = tmp_path / "runs.txt"
    n = 200
    produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(n)])
    collector = Collector(r, reply)
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--consumer", "drainer", "--max-batch", "8", "--block-ms", "50", "--lease-s", "30",
                  env={"HEADRACE_FAKE_DELAY_MS": "300", "HEADRACE_FAKE_RECORD": str(record)})
        wait_until(lambda: records(record), timeout_s=20)  # a batch is inside the model now
        held = int(consumers(r, keys)["drainer"]["pending"])
        assert held > 0  # the running batch, plus the one prefetched behind it
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
        log = w.log()
    assert "draining" in log and "stopped" in log
    collector.poll(block_ms=200)
    got = collector.by_id()
    ran = set(records(record))
    assert set(got) == ran and len(got) >= held  # whatever it took in, it answered
    assert all(len(v) == 1 and v[0].ok for v in got.values())
    assert pending_count(r, keys) == 0
    assert "drainer" not in consumers(r, keys)  # left the group: it owned nothing any more
    assert list_models(r, "headrace")[0].workers == {}
    # the rest is still queued for the next worker, not lost
    lag = r.xinfo_groups(keys.requests)[0]["lag"]
    assert lag == n - len(got)
