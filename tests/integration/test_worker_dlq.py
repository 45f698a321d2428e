"""Poison requests: isolated from their batch-mates, retried after the lease, dead-lettered
after max_deliveries with the producer told; then replayed (and purged) with the DLQ ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.admin.dlq import dlq_list, dlq_purge, dlq_replay
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, pending_count, produce, records, wait_until, worker_procs

POISON = -13.0


@pytest.mark.timeout(60)
def test_poison_reaches_dlq_mates_answered_then_replay(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    sv = AffineServable(poison=POISON)
    s = WorkerSettings(model="affine", redis_url=redis_url, consumer="w", max_batch=8, max_wait_ms=50,
                       block_ms=20, lease_s=0.3, max_deliveries=3)
    wt = WorkerThread(s, sv).start()
    try:
        entries = [affine_request(f"mate{i}", float(i), reply) for i in range(5)]
        entries.insert(2, affine_request("poison", POISON, reply))
        produce(r, keys, entries)
        collector = Collector(r, reply)
        collector.wait_for(6, timeout_s=20)
        got = {rid: v[0] for rid, v in collector.by_id().items()}
        for i in range(5):
            assert got[f"mate{i}"].ok
            np.testing.assert_array_equal(got[f"mate{i}"].outputs["y"], affine_reference(np.full(4, float(i))))
        bad = got["poison"]
        assert bad.status == "error" and bad.code == E.MAX_DELIVERIES and "ModelError" in bad.message
        # ran on each of its 3 deliveries (plus once inside the batch it spoiled, when batched)
        assert sv.invocations["poison"] in (3, 4)
        # a spoiled batch is re-run one by one: a mate runs at most twice, and is answered once
        assert all(sv.invocations[f"mate{i}"] in (1, 2) for i in range(5))
        assert all(len(v) == 1 for v in collector.by_id().values())
        (dl,) = dlq_list(r, "headrace", "affine")
        assert dl.request_id == "poison" and dl.reply_to == reply and dl.code == E.MODEL_ERROR
        assert dl.deliveries == 3 and dl.entry_id and dl.ts_ms > 0 and "poison input" in dl.reason
        assert dl.fields[b"id"] == b"poison" and b"body" in dl.fields
        assert pending_count(r, keys) == 0

        # The model gets fixed; the operator replays the DLQ: it is answered again, ok this time.
        sv.poison = None
        assert dlq_replay(r, "headrace", "affine") == 1
        assert dlq_list(r, "headrace", "affine") == []
        assert dlq_replay(r, "headrace", "affine", ids=[dl.dlq_id]) == 0  # already replayed
        collector.wait_for(7, timeout_s=20)
        replayed = collector.by_id()["poison"][-1]
        assert replayed.ok
        np.testing.assert_array_equal(replayed.outputs["y"], affine_reference(np.full(4, POISON)))
    finally:
        wt.stop(timeout_s=20)


@pytest.mark.timeout(60)
def test_poison_in_a_worker_process_and_dlq_purge(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    record = tmp_path / "runs.txt"
    produce(r, keys, [affine_request("p1", POISON, reply), affine_request("ok1", 1.0, reply),
                      affine_request("p2", POISON, reply)])
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--consumer", "w", "--lease-s", "0.3", "--max-deliveries", "2", "--block-ms", "20",
                  "--max-wait-ms", "50", env={"HEADRACE_FAKE_POISON": str(POISON), "HEADRACE_FAKE_RECORD": str(record)})
        results = Collector(r, reply).wait_for(3, timeout_s=30)
        w.signal(15)
        assert w.wait(20) == 0
    codes = {res.request_id: res.code for res in results}
    assert codes == {"p1": E.MAX_DELIVERIES, "ok1": "", "p2": E.MAX_DELIVERIES}
    assert records(record).count("ok1") in (1, 2)
    assert sorted(d.request_id for d in dlq_list(r, "headrace", "affine")) == ["p1", "p2"]
    assert dlq_list(r, "headrace", "affine", count=1)[0].request_id in {"p1", "p2"}
    assert dlq_purge(r, "headrace", "affine") == 2
    assert dlq_list(r, "headrace", "affine") == [] and dlq_purge(r, "headrace", "affine") == 0
    wait_until(lambda: pending_count(r, keys) == 0)
