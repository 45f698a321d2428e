"""headrace's own Redis CPU per request, shard by shard, on a 3-master Redis Cluster: one
model on one request stream against the same model split into K partitions (docs/scaling.md
section 4), each on its own slot.

Two cores cannot show a 3-shard speed-up in wall-clock time, so this measures what scaling
rests on: the CPU each shard spends per request (``INFO CPU`` before/after, idle rate
removed; :mod:`benchmarks.lib.shard_cpu`), with the real data plane: the SDK
(``Client.map``, ``redis_cluster=True``, ``partitions=K``: the submit function, one reply
stream per partition read slot by slot) and one worker process (``--fake affine``, a
zero-cost model; ``--partitions K --redis-cluster``: sized ``READ`` scripts, the commit
script, stats, lease refreshes, trims). Every configuration runs in this one invocation,
on the same cluster, one after the other.

Where a model's partition tags hash to is luck (``{affine~0..5}`` falls 1 / 1 / 4 on three
equal slot ranges), so by default the partitions' (empty) slots are first placed
round-robin over the masters, what an operator does once (docs/scaling.md); ``K:hashed``
measures them where they hash to.

What it implies: the busiest shard saturates at one core, so the model's ceiling is
``1e6 / busiest shard's us per request``; near-linear scaling means the shards' CPU per
request adds up to about the single-partition figure (target: within 10 %), the busiest
shard carrying about 1/min(K, shards) of it.

    .venv/bin/python -m benchmarks.partitions [--requests 20000] [--partitions 1,3:hashed,3,6] [--json runs/partitions.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster
from rich.console import Console
from rich.table import Table

from benchmarks.lib.output import write_json
from benchmarks.lib.shard_cpu import ShardCpu, implied_ceiling
from headrace.client import Client
from headrace.client.keys import partition_keys, registry_key
from headrace.cluster.bench.run import host_info
from tests.support.polling import poll_until
from tests.support.procs import WorkerProc
from tests.support.redis_cluster import RedisClusterProcs

MODEL = "affine"


def _items(n: int) -> list[dict[str, Any]]:
    return [{"x": np.full(4, i % 1000, np.float32)} for i in range(n)]


def _start_worker(cluster: RedisClusterProcs, k: int, args: argparse.Namespace, log: Path) -> WorkerProc:
    proc = WorkerProc(cluster.url, log, "--partitions", str(k), "--redis-cluster", "--max-batch", str(args.max_batch),
                      "--max-wait-ms", "2", "--block-ms", "200", "--log-level", "WARNING")
    rc = RedisCluster.from_url(cluster.url)
    try:
        poll_until(lambda: rc.hget(registry_key("headrace"), MODEL) or not proc.alive, 60, 0.1)
    finally:
        rc.close()
    if not proc.alive:
        raise RuntimeError(f"worker exited: {proc.log()[-2000:]}")
    return proc


def _shards_of(cluster: RedisClusterProcs, k: int) -> int:
    rc = RedisCluster.from_url(cluster.url)
    try:
        return len({rc.get_node_from_key(keys.requests).port for keys in partition_keys("headrace", MODEL, k)})
    finally:
        rc.close()


def _reset_commandstats(urls: list[str]) -> None:
    for u in urls:
        r = redis.Redis.from_url(u)
        try:
            r.config_resetstat()
        finally:
            r.close()


def _commandstats(urls: list[str], requests: int) -> dict[str, dict[str, float]]:
    """``INFO COMMANDSTATS`` summed over the nodes, per request: calls and us."""
    total: dict[str, list[float]] = {}
    for u in urls:
        r = redis.Redis.from_url(u)
        try:
            for name, row in r.info("commandstats").items():
                acc = total.setdefault(name.removeprefix("cmdstat_"), [0.0, 0.0])
                acc[0] += row["calls"]
                acc[1] += row["usec"]
        finally:
            r.close()
    return {name: {"calls_per_request": c / requests, "us_per_request": us / requests}
            for name, (c, us) in sorted(total.items(), key=lambda kv: -kv[1][1])}


def measure(cluster: RedisClusterProcs, k: int, placed: bool, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One configuration: ``k`` partitions (``placed``: their slots spread round-robin over
    the masters first), a fresh worker, warm-up, idle rate, then ``args.requests`` requests
    through ``Client.map`` under the meter."""
    cluster.flush()
    if placed and k > 1:
        cluster.place([keys.requests for keys in partition_keys("headrace", MODEL, k)])
    proc = _start_worker(cluster, k, args, tmp / f"worker-{k}.log")
    try:
        with Client(cluster.url, redis_cluster=True, partitions=k, max_in_flight=args.in_flight,
                    timeout_s=120) as client:
            list(client.map(MODEL, _items(args.warmup)))
            meter = ShardCpu(cluster.urls)
            meter.idle(args.idle_s)  # the worker and the SDK reader idle, as they do between bursts
            _reset_commandstats(cluster.urls)
            meter.start()
            results = list(client.map(MODEL, _items(args.requests)))
            meter.stop()
            stats = _commandstats(cluster.urls, args.requests)
        if not all(r.ok for r in results) or len(results) != args.requests:
            raise RuntimeError("not every request was answered ok")
        wall = meter._t1 - meter._t0
    finally:
        proc.kill()
    per = meter.per_request_us(args.requests)
    return {"partitions": k, "placed": placed and k > 1, "shards_used": _shards_of(cluster, k), "per_shard_us": per, "sum_us": sum(per.values()),
            "busiest_us": max(per.values()), "implied_ceiling_rps": implied_ceiling(per),
            "wall_s": wall, "measured_rps": args.requests / wall, "commandstats": stats}


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    base = results[0]
    t = Table(title=f"headrace Redis CPU per request by shard (3 masters, SDK + worker, {args.requests} requests, "
                    f"load average {os.getloadavg()[0]:.1f})")
    for c in ("partitions", "per shard us/request", "sum us/request", f"sum vs {base['partitions']} partition(s)",
              "busiest shard us/request", "implied ceiling req/s", "ceiling vs 1 partition", "measured req/s"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(f"{r['partitions']}{' placed' if r['placed'] else ''}", " / ".join(f"{v:.1f}" for v in r["per_shard_us"].values()),
                  f"{r['sum_us']:.1f}", f"{100 * r['sum_us'] / base['sum_us']:.0f}%", f"{r['busiest_us']:.1f}",
                  f"{r['implied_ceiling_rps']:.0f}", f"{r['implied_ceiling_rps'] / base['implied_ceiling_rps']:.2f}x",
                  f"{r['measured_rps']:.0f}")
    return t


def commands_table(results: list[dict[str, Any]], top: int = 8) -> Table:
    """The commands costing most (``INFO COMMANDSTATS``, all shards) per configuration:
    where the extra CPU of more partitions goes."""
    names = list(results[0]["commandstats"])[:top]
    t = Table(title="Redis commands per request, all shards (calls / us)")
    t.add_column("command")
    for r in results:
        t.add_column(f"{r['partitions']}{' placed' if r['placed'] else ''}", justify="right")
    for name in names:
        cells = []
        for r in results:
            row = r["commandstats"].get(name, {"calls_per_request": 0.0, "us_per_request": 0.0})
            cells.append(f"{row['calls_per_request']:.3f} / {row['us_per_request']:.1f}")
        t.add_row(name, *cells)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=1_000)
    ap.add_argument("--partitions", default="1,3:hashed,3,6",
                    help="comma list of partition counts, the first is the base; K = slots placed round-robin over "
                         "the masters (CLUSTER SETSLOT), K:hashed = where the tags {model~p} hash to")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--in-flight", type=int, default=512, help="Client.map window")
    ap.add_argument("--idle-s", type=float, default=1.0)
    ap.add_argument("--json", default="runs/partitions.json")
    args = ap.parse_args()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    with RedisClusterProcs(3) as cluster, tempfile.TemporaryDirectory(prefix="headrace-partitions-") as tmp:
        for spec in args.partitions.split(","):
            k, _, how = spec.partition(":")
            results.append(measure(cluster, int(k), how != "hashed", args, Path(tmp)))
    Console().print(table(results, args))
    Console().print(commands_table(results))
    doc = {"benchmark": "partitions", "started_at": started, "host": host_info(), "load_average": os.getloadavg(),
           "args": vars(args), "results": results}
    write_json(args.json, doc)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
