"""A model call that never returns and cannot be interrupted: the worker gives up on it
after ``infer_timeout_s``, stops consuming and exits non-zero; its batch goes to other
workers after the lease (each redelivered request runs alone), what it never ran is handed
back at once, and the request that hangs a worker alone is dead-lettered by that worker with
an error result (not left to hang the next one); its innocent batch-mates are answered.
(A model that can be interrupted keeps its worker: ``test_worker_interrupt.py``.)"""

from __future__ import annotations

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, pending_count, produce, wait_until, worker_procs

HANG = 13.0


@pytest.mark.timeout(90)
def test_hung_model_call_stops_the_worker_and_nothing_is_lost(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    args = ("--infer-timeout-s", "1", "--lease-s", "1", "--max-deliveries", "2", "--block-ms", "20",
            "--max-wait-ms", "50")
    env = {"HEADRACE_FAKE_HANG": str(HANG)}
    produce(r, keys, [affine_request("hang", HANG, reply)] + [affine_request(f"r{i}", float(i), reply)
                                                                for i in range(5)])
    with worker_procs(redis_url, tmp_path) as spawn:
        # Two workers that hang on the bad request, one after the other: each gives up after
        # 1 s and exits with code 2 (at once: its model thread is still stuck).
        # The first ran all six in one call; the second runs redelivered requests one at a
        # time, hangs on the first, and hands the five it never ran back (delivery undone).
        for n in range(2):
            w = spawn("--consumer", f"hung{n}", *args, env=env)
            assert w.wait(30) == 2, w.log()
            assert "infer_timeout_s=1" in w.log()
        assert "handed back 5 entries never run" in w.log()
        # The second ran it alone, so it knew the culprit: dead-lettered before it exited.
        assert r.xlen(keys.dlq) == 1 and "ran alone and is dead-lettered" in w.log()
        # A third answers the five handed back.
        last = spawn("--consumer", "last", *args, env=env)
        results = Collector(r, reply).wait_for(6, timeout_s=30)
        wait_until(lambda: pending_count(r, keys) == 0, timeout_s=15)
        last.signal(15)
        assert last.wait(20) == 0
    by_id = {res.request_id: res for res in results}
    assert len(results) == 6 and set(by_id) == {"hang", *(f"r{i}" for i in range(5))}
    assert all(by_id[f"r{i}"].ok for i in range(5))
    assert by_id["hang"].status == "error" and by_id["hang"].code == "model_error"
    assert "infer_timeout_s=1" in by_id["hang"].message and "not retried" in by_id["hang"].message
    assert r.xlen(keys.dlq) == 1


@pytest.mark.timeout(30)
def test_stuck_worker_reports_unhealthy(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    sv = AffineServable(hang=HANG)
    wt = WorkerThread(WorkerSettings(model="affine", redis_url=redis_url, consumer="w", block_ms=20,
                                     infer_timeout_s=0.3, lease_s=5), sv).start()
    try:
        assert wt.healthy()
        produce(r, keys, [affine_request("hang", HANG, keys.reply("c"))])
        wait_until(lambda: not wt.healthy(), timeout_s=10)
        wait_until(lambda: not wt.alive, timeout_s=10)  # the loop ended; the model thread is still stuck
        assert wt.stats()["infer_timeouts"] == 1
        assert wt.worker.stuck is not None and "infer_timeout_s=0.3" in str(wt.worker.stuck)
        # It ran alone: dead-lettered by this worker rather than left to hang the next one.
        wait_until(lambda: r.xlen(keys.dlq) == 1 and pending_count(r, keys) == 0, timeout_s=10)
    finally:
        sv.unhang()
        wt.stop(timeout_s=10)
