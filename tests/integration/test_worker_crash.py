"""A worker SIGKILLed mid-batch: another worker takes over its pending entries after the
lease. Nothing is lost, nothing is answered twice."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import affine_reference
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


@pytest.mark.timeout(90)
def test_sigkill_mid_batch_then_rescue_without_loss_or_duplicate(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    record = tmp_path / "runs.txt"
    n = 120
    produce(r, keys, [affine_request(f"r{i}", float(i), reply) for i in range(n)])
    collector = Collector(r, reply)
    with worker_procs(redis_url, tmp_path) as spawn:
        victim = spawn("--consumer", "victim", "--max-batch", "16", "--block-ms", "50", "--lease-s", "1",
                       env={"HEADRACE_FAKE_DELAY_MS": "400", "HEADRACE_FAKE_RECORD": str(record)})
        # Kill it while a batch is inside the model: a run was recorded, its results not written.
        wait_until(lambda: len(records(record)) >= 32 and collector.poll(0) >= 1, timeout_s=30)
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        orphaned = int(consumers(r, keys)["victim"]["pending"])
        assert orphaned > 0, "the victim should die owning entries"
        answered_before = collector.poll(0)
        assert answered_before < n

        rescuer = spawn("--consumer", "rescuer", "--max-batch", "16", "--block-ms", "50", "--lease-s", "1",
                        env={"HEADRACE_FAKE_RECORD": str(record)})
        collector.wait_for(n, timeout_s=60)
        collector.poll(block_ms=1500)  # a late duplicate would arrive now
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(30) == 0

    got = collector.by_id()
    assert sorted(got, key=lambda s: int(s[1:])) == [f"r{i}" for i in range(n)]
    dups = {rid: len(v) for rid, v in got.items() if len(v) != 1}
    assert not dups, f"answered more than once: {dups}"
    for rid, (res,) in got.items():
        assert res.ok
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(np.full(4, float(rid[1:]))))
    runs = records(record)
    # The killed batch really ran twice (once in the victim, once in the rescuer) and was still
    # answered once: the effectively-once guarantee, not luck.
    assert len(runs) > n and set(runs) == set(got)
    assert any(res.timings.worker == "rescuer" for (res,) in got.values())
    assert pending_count(r, keys) == 0
    assert int(consumers(r, keys).get("victim", {"pending": 0})["pending"]) == 0
