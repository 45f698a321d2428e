"""Thousands of requests through two real worker processes: each answered exactly once,
with the right output; the status view agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.admin.status import list_models, model_status
from headrace.workers.backends.fake import affine_reference
from tests.support.worker import Collector, affine_request, pending_count, produce, wait_until, worker_procs


@pytest.mark.timeout(120)
def test_3000_requests_two_workers_exactly_once(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    replies = [keys.reply("c1"), keys.reply("c2")]
    n = 3000
    # Half are queued before any worker exists (the group is created at id 0, so they count).
    entries = [affine_request(f"r{i}", float(i % 1000), replies[i % 2]) for i in range(n)]
    produce(r, keys, entries[: n // 2])
    with worker_procs(redis_url, tmp_path) as spawn:
        workers = [spawn("--consumer", f"w{i}", "--max-batch", "32", "--block-ms", "50", "--lease-s", "5",
                         "--max-wait-ms", "2") for i in range(2)]
        produce(r, keys, entries[n // 2:])
        collectors = [Collector(r, reply) for reply in replies]
        for c in collectors:
            c.wait_for(n // 2, timeout_s=90)
        for c in collectors:
            c.poll(block_ms=300)  # anything extra (a duplicate) would show up here
        got: dict[str, list] = {}
        for c in collectors:
            for rid, results in c.by_id().items():
                got.setdefault(rid, []).extend(results)
        assert len(got) == n
        assert all(len(v) == 1 for v in got.values()), "a request was answered more than once"
        for rid, (res,) in got.items():
            i = int(rid[1:])
            assert res.ok, (rid, res.code, res.message)
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(np.full(4, float(i % 1000))))
            assert res.model == "affine" and res.version == "1" and res.timings.worker in {"w0", "w1"}
        # both workers took part, and they batched
        assert {res.timings.worker for (res,) in got.values()} == {"w0", "w1"}
        assert max(res.timings.batch_size for (res,) in got.values()) > 1
        assert pending_count(r, keys) == 0
        status = wait_until(lambda: (s := model_status(r, "headrace", "affine")).answered >= n and s)
        assert status.pending == 0 and status.lag == 0 and status.dead_letters == 0
        assert status.answered == n and status.failed == 0
        assert status.p50_ms is not None and status.p99_ms is not None and status.p99_ms >= status.p50_ms
        assert set(status.workers) == {"w0", "w1"} and {c.name for c in status.consumers} == {"w0", "w1"}
        assert [m.model for m in list_models(r, "headrace")] == ["affine"]
        for w in workers:
            w.signal(15)
        assert [w.wait(30) for w in workers] == [0, 0]
    # a clean exit leaves the group and the registry
    assert model_status(r, "headrace", "affine").consumers == ()
    assert list_models(r, "headrace")[0].workers == {}
