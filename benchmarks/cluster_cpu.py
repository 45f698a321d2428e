"""Redis CPU per request, shard by shard, on a 3-master Redis Cluster: one request stream
against K partition streams, each on its own slot.

Two cores cannot show a 3-shard speed-up in wall-clock time, so this measures what scaling
rests on: the CPU each shard spends per request (``INFO CPU`` before/after, idle rate
removed; :mod:`benchmarks.lib.shard_cpu`). Near-linear scaling means: with K partitions
the shards' CPU per request adds up to about the single-partition figure (within 10 %),
and the busiest shard carries about 1/K of it, so the implied ceiling
(``1e6 / busiest shard's us per request``) grows about K-fold.

The workload is the bare data plane of a request, in rounds: a pipelined ``XADD`` of
``--round`` request entries (headrace's own request bytes) spread round-robin over the
partitions, then per partition ``XREADGROUP`` + one reply ``XADD`` per entry (into a reply
stream in the partition's slot) + ``XACK``, and an ``XREAD`` of each reply stream.
headrace's own K-partition streams (issue 14, phase 2) are measured the same way with
:class:`~benchmarks.lib.shard_cpu.ShardCpu` around a run of the SDK and workers.

    .venv/bin/python -m benchmarks.cluster_cpu [--requests 60000] [--partitions 1,3] [--json runs/cluster_cpu.json]
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from typing import Any

from redis.cluster import RedisCluster
from rich.console import Console
from rich.table import Table

from benchmarks.lib.ceiling import request_pool
from benchmarks.lib.output import write_json
from benchmarks.lib.shard_cpu import ShardCpu, implied_ceiling
from headrace.cluster.bench.run import host_info
from tests.support.redis_cluster import RedisClusterProcs


def partition_tags(rc: RedisCluster, k: int) -> list[str]:
    """``k`` hash tags ``m-<i>``, the first ``min(k, masters)`` on distinct masters."""
    masters = len(rc.get_primaries())
    tags: list[str] = []
    seen: set[int] = set()
    i = 0
    while len(tags) < k:
        tag = f"m-{i}"
        port = rc.get_node_from_key(f"{{{tag}}}").port
        if port not in seen or len(seen) >= masters:
            tags.append(tag)
            seen.add(port)
        i += 1
    return tags


def run_partitions(rc: Any, k: int, requests: int, per_round: int) -> None:
    tags = partition_tags(rc, k)
    streams = [f"cpu:{{{t}}}:requests" for t in tags]
    replies = [f"cpu:{{{t}}}:reply:c" for t in tags]
    for s in streams:
        rc.xgroup_create(s, "workers", id="0", mkstream=True)
    pool = request_pool(1, replies[0])
    last = ["0-0"] * k
    done = 0
    while done < requests:
        n = min(per_round, requests - done)
        pipe = rc.pipeline()
        for i in range(n):
            pipe.xadd(streams[(done + i) % k], pool[i % len(pool)])
        pipe.execute()
        for p, s in enumerate(streams):
            got = rc.xreadgroup("workers", "w", {s: ">"}, count=n)
            entries = got[0][1] if got else []
            if not entries:
                continue
            pipe = rc.pipeline()
            for _eid, fields in entries:
                pipe.xadd(replies[p], {b"id": fields[b"id"], b"status": b"ok", b"body": fields[b"body"]})
            pipe.xack(s, "workers", *[e[0] for e in entries])
            pipe.execute()
            back = rc.xread({replies[p]: last[p]}, count=n)
            if back:
                last[p] = back[0][1][-1][0]
        done += n


def measure(rc: RedisCluster, urls: list[str], k: int, args: argparse.Namespace) -> dict[str, Any]:
    meter = ShardCpu(urls)
    meter.idle(1.0)
    meter.start()
    run_partitions(rc, k, args.requests, args.round)
    per = meter.stop().per_request_us(args.requests)
    return {"partitions": k, "per_shard_us": per, "sum_us": sum(per.values()), "busiest_us": max(per.values()),
            "implied_ceiling_rps": implied_ceiling(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60_000)
    ap.add_argument("--round", type=int, default=256, help="requests per producer round")
    ap.add_argument("--partitions", default="1,3", help="comma list of partition counts")
    ap.add_argument("--json", default="runs/cluster_cpu.json")
    args = ap.parse_args()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    with RedisClusterProcs(3) as cluster:
        rc = RedisCluster.from_url(cluster.url)
        try:
            for k in (int(x) for x in args.partitions.split(",")):
                cluster.flush()
                results.append(measure(rc, cluster.urls, k, args))
        finally:
            rc.close()
    base = results[0]["sum_us"]
    t = Table(title=f"Redis CPU per request by shard (3 masters, bare data plane, {args.requests} requests, "
                    f"load average {os.getloadavg()[0]:.1f})")
    for c in ("partitions", "per shard us/request", "sum us/request", f"sum vs {results[0]['partitions']} "
              "partition(s)", "busiest shard us/request", "implied ceiling req/s"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(str(r["partitions"]), " / ".join(f"{v:.1f}" for v in r["per_shard_us"].values()),
                  f"{r['sum_us']:.1f}", f"{100 * r['sum_us'] / base:.0f}%", f"{r['busiest_us']:.1f}",
                  f"{r['implied_ceiling_rps']:.0f}")
    Console().print(t)
    doc = {"benchmark": "cluster_cpu", "started_at": started, "host": host_info(), "load_average": os.getloadavg(),
           "args": vars(args), "results": results}
    write_json(args.json, doc)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
