"""How long a request waits in the inbox (strict submit mode) before it is in the request
stream, with the relay's wait and relay step sent as two calls or as one pipeline, on a
single Redis and on a 3-master Redis Cluster, side by side in one run.

Per trial: a worker's ``wait_and_relay`` is already blocked on an empty inbox; after 4-8 ms a
producer ``RPUSH``es one element; the figure is the time from the push being sent to the
relay step returning with the element added. The two ways alternate in rounds on the same
broker and Redis:

* **two calls**: ``BLMOVE`` (the wait), its reply, then ``FCALL headrace_relay``
  (:meth:`headrace.workers.broker.base.Broker.wait_and_relay`);
* **one pipeline**: both sent together; Redis holds the ``FCALL`` until the ``BLMOVE``
  unblocks (:meth:`headrace.workers.broker.redis_inbox.RedisInbox.wait_and_relay`).

Prints p50 / p90 in ms and the difference; asserts nothing about speed.

    .venv/bin/python -m benchmarks.relay_wait [--trials 100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.cluster
from rich.console import Console
from rich.table import Table

from headrace.cluster.bench.stats import percentile
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.broker.base import Broker, RelayStep
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings
from tests.support.broker_harness import packed, req
from tests.support.redis_cluster import RedisClusterProcs

WaitAndRelay = Callable[[Any, int, int], Awaitable[RelayStep]]
WAYS: dict[str, WaitAndRelay] = {"two calls": Broker.wait_and_relay, "one pipeline": RedisBroker.wait_and_relay}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="pushes per way and round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; the ways alternate within each")
    return ap.parse_args()


async def trials(broker: RedisBroker, way: WaitAndRelay, push: Callable[[bytes], Any], n: int) -> list[float]:
    """ms from each push being sent to the relay step that added it returning."""
    out = []
    for i in range(n):
        step = asyncio.ensure_future(way(broker, 10, 2000))
        await asyncio.sleep(random.uniform(0.004, 0.008))  # the worker is blocked in its wait by now
        t0 = time.perf_counter()
        await asyncio.to_thread(push, packed(req(f"r{i}")))
        if (await step).added != 1:
            raise RuntimeError("the relay step did not add the element pushed")
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


async def measure(url: str, cluster: bool, args: argparse.Namespace) -> dict[str, list[float]]:
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=url, redis_cluster=cluster))
    await broker.ensure_group()
    sync: Any = redis.cluster.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    res: dict[str, list[float]] = {name: [] for name in WAYS}
    try:
        for _ in range(args.rounds):
            for name, way in WAYS.items():
                res[name] += await trials(broker, way, lambda b: sync.rpush(broker.keys.inbox, b), args.trials)
    finally:
        await broker.close()
        sync.close()
    return res


def main() -> None:
    args = parse_args()
    table = Table(title=f"inbox -> stream: push sent to relay step returned, ms ({args.rounds} x {args.trials} "
                        f"pushes per way)")
    for col in ("Redis", "two calls p50 / p90", "one pipeline p50 / p90", "p50 saved"):
        table.add_column(col, justify="right" if col != "Redis" else "left")
    with EmbeddedRedis() as single:
        results = {"single": asyncio.run(measure(single.url, False, args))}
    with RedisClusterProcs(3) as rc:
        results["cluster (3 masters)"] = asyncio.run(measure(rc.url, True, args))
    for where, res in results.items():
        (two50, two90), (one50, one90) = ((percentile(res[w], 50), percentile(res[w], 90)) for w in WAYS)
        table.add_row(where, f"{two50:.3f} / {two90:.3f}", f"{one50:.3f} / {one90:.3f}", f"{two50 - one50:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
