"""Worker memory is bounded at the sink (issue #10, item 4), against a real Redis.

Seen before: 32 entries of 32 MB (padding in an unknown field) took a worker to 4 GB; the
read outlived the socket timeout, so the entries were redelivered until all of them went to
the DLQ, a normal request included, and the DLQ copied the 32 MB padding. Now reads are
sized to ``memory_budget_bytes`` and an entry above ``max_payload_bytes`` + 64 KiB is
dead-lettered by its sizes, its payload never read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.admin.dlq import dlq_list
from tests.support.worker import Collector, affine_request, consumers, pending_count, wait_until, worker_procs

MB = 1024 * 1024
BUDGET = 32 * MB


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


@pytest.mark.timeout(240)
def test_big_entries_leave_the_worker_small_and_nothing_innocent_is_dead_lettered(redis_url: str,
                                                                                   tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--block-ms", "50", "--lease-s", "5", "--memory-budget-bytes", str(BUDGET), "--consumer", "w")
        wait_until(lambda: "w" in str(r.hgetall(b"headrace:models")), timeout_s=30)
        base_kb = _status_kb(w.proc.pid, "VmRSS")

        padding = b"\0" * (32 * MB)  # 16 x 32 MB oversize entries, each followed by a normal request
        for i in range(16):
            r.xadd(keys.requests, {**affine_request(f"big{i}", 1.0, reply), b"pad": padding})
            r.xadd(keys.requests, affine_request(f"ok{i}", float(i), reply))
        within = b"\0" * (3 * MB)  # 24 x 3 MB: under the entry limit, 72 MB against a 32 MB budget
        for i in range(24):
            r.xadd(keys.requests, {**affine_request(f"mid{i}", float(i), reply), b"pad": within})

        collector = Collector(r, reply)
        collector.wait_for(16 + 16 + 24, timeout_s=120)
        peak_kb = _status_kb(w.proc.pid, "VmHWM")
        assert w.alive
        got = collector.by_id()
        for i in range(16):
            (big,) = got[f"big{i}"]
            assert big.code == E.PAYLOAD_TOO_LARGE, big
            (ok,) = got[f"ok{i}"]
            assert ok.ok, ok
        assert all(len(got[f"mid{i}"]) == 1 and got[f"mid{i}"][0].ok for i in range(24))

        dead = dlq_list(r, "headrace", "affine", count=100)
        assert sorted(d.request_id for d in dead) == sorted(f"big{i}" for i in range(16)), "only the oversize"
        for d in dead:
            assert d.code == E.PAYLOAD_TOO_LARGE and d.entry_bytes > 32 * MB and b"pad" not in d.fields
            assert b"body" not in d.fields and not d.complete
        growth_mb = (peak_kb - base_kb) / 1024
        print(f"worker RSS {base_kb / 1024:.0f} MB at start, peak {peak_kb / 1024:.0f} MB")
        # 512 MB of oversize entries and 72 MB of valid ones went through; the worker held at
        # most the budget plus one entry (a blocking read's) at a time, with its copies.
        assert growth_mb < 4 * BUDGET / MB + 64, f"worker grew by {growth_mb:.0f} MB"
        wait_until(lambda: pending_count(r, keys) == 0)
        assert consumers(r, keys)["w"]["pending"] == 0
