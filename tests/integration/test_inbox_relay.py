"""The inbox relay against a real Redis: a worker that dies between its wake-up (the BLMOVE
rotation of the inbox) and its relay call, a worker SIGKILLed while it relays under load,
and relays racing each other. Every request reaches the stream once: nothing lost, nothing
duplicated."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest
import redis

from headrace.client.functions import RELAY_FUNCTION, ensure_library
from headrace.client.keys import ModelKeys
from headrace.workers.pipeline.ops import DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, DLQ_SCRIPT_NAMES
from tests.support.worker import Collector, affine_request, wait_until, worker_procs

KEYS = ModelKeys("headrace", "affine")
REPLY = KEYS.reply("c")

# A worker's own wait (RedisBroker.wait_inbox), then death by SIGKILL before it relays.
DIE_AFTER_WAKE = """
import asyncio, os, signal, sys
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
broker = RedisBroker(WorkerSettings(model="affine", redis_url=sys.argv[1], consumer="doomed"))
print("waiting", flush=True)
woke = asyncio.run(broker.wait_inbox(20_000))
print("woke" if woke else "timeout", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def push(r: redis.Redis, rids: list[str]) -> None:
    """What the submit function appends, one element per request, pipelined."""
    pipe = r.pipeline(transaction=False)
    for rid in rids:
        fields = affine_request(rid, 1.0, REPLY)
        pipe.rpush(KEYS.inbox, msgpack.packb([x for kv in fields.items() for x in kv], use_bin_type=False))
    pipe.execute()


def stream_ids(r: redis.Redis) -> list[str]:
    return [f[b"id"].decode() for _, f in r.xrange(KEYS.requests)]


@pytest.mark.timeout(60)
def test_a_worker_killed_between_its_wake_up_and_its_relay_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    ensure_library(r)
    doomed = subprocess.Popen([sys.executable, "-c", DIE_AFTER_WAKE, redis_url], stdout=subprocess.PIPE, text=True)
    assert doomed.stdout is not None and doomed.stdout.readline().strip() == "waiting"
    wait_until(lambda: int(r.info("clients")["blocked_clients"]) >= 1)
    rids = [f"k{i}" for i in range(50)]
    push(r, rids)
    assert doomed.stdout.readline().strip() == "woke"
    assert doomed.wait(10) == -signal.SIGKILL
    assert r.llen(KEYS.inbox) == 50 and r.xlen(KEYS.requests) == 0, "the wake-up took nothing"
    collector = Collector(r, REPLY)
    with worker_procs(redis_url, tmp_path) as spawn:
        rescuer = spawn("--consumer", "rescuer", "--block-ms", "50")
        collector.wait_for(50, timeout_s=30)
        collector.poll(block_ms=500)  # a late duplicate would arrive now
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(30) == 0
    got = collector.by_id()
    assert sorted(got) == sorted(rids) and all(len(v) == 1 for v in got.values())
    assert r.llen(KEYS.inbox) == 0


@pytest.mark.timeout(90)
def test_a_worker_sigkilled_while_relaying_under_load_loses_and_duplicates_nothing(
        redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    collector = Collector(r, REPLY)
    n = 3000
    with worker_procs(redis_url, tmp_path) as spawn:
        victim = spawn("--consumer", "victim", "--block-ms", "50", "--lease-s", "1", "--relay-batch", "7")
        wait_until(lambda: r.exists(KEYS.limits), 30)
        sent = 0
        while sent < n // 2:  # the victim relays these as they come
            push(r, [f"s{i}" for i in range(sent, sent + 100)])
            sent += 100
        wait_until(lambda: collector.poll(0) >= 100, 30)
        victim.signal(signal.SIGKILL)  # mid-relay: 7 elements a step, 1500 queued
        victim.wait(10)
        assert r.llen(KEYS.inbox) > 0, "the victim should die with requests left to relay"
        push(r, [f"s{i}" for i in range(sent, n)])
        rescuer = spawn("--consumer", "rescuer", "--block-ms", "50", "--lease-s", "1")
        collector.wait_for(n, timeout_s=60)
        collector.poll(block_ms=1500)
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(30) == 0
    got = collector.by_id()
    lost = n - len(got)
    duplicated = sum(len(v) - 1 for v in got.values())
    assert (lost, duplicated) == (0, 0), f"sent {n}: lost {lost}, duplicated {duplicated}"
    assert r.llen(KEYS.inbox) == 0 and r.xlen(KEYS.dlq) == 0


@pytest.mark.timeout(60)
def test_relays_racing_each_other_move_every_element_exactly_once(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    ensure_library(r)
    n, racers = 4000, 4
    args = [KEYS.requests, KEYS.limits, KEYS.inbox, KEYS.dlq]
    moved = [0] * racers
    done = threading.Event()

    def relay(k: int) -> None:
        own = redis.Redis.from_url(redis_url)
        while True:
            added, _, left = own.execute_command("FCALL", RELAY_FUNCTION, 4, *args, 13, *DLQ_SCRIPT_NAMES,
                                                 DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, 0)
            moved[k] += int(added)
            if done.is_set() and int(left) == 0:
                return

    threads = [threading.Thread(target=relay, args=(k,)) for k in range(racers)]
    for t in threads:
        t.start()
    for i in range(0, n, 200):
        push(r, [f"q{j}" for j in range(i, i + 200)])
    done.set()
    for t in threads:
        t.join(30)
    ids = stream_ids(r)
    assert sum(moved) == n == len(ids) == len(set(ids)), (sum(moved), len(ids), len(set(ids)))
    assert sorted(ids) == sorted(f"q{j}" for j in range(n))
