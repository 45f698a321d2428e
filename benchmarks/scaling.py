"""How throughput grows with workers, replicas and nodes, measured on one machine with a
model of fixed cost.

The model is the ``affine`` fake with ``HEADRACE_FAKE_DELAY_MS`` per batch: it sleeps
instead of computing, like a batch that runs on an accelerator, so adding workers adds
model capacity without adding CPU load and the data plane's own limits show:

* ``--part processes``: 1, 2, 4, 8 standalone worker processes on one Redis;
* ``--part ray``: headrace's Ray Serve app on a ``ray.cluster_utils.Cluster`` of three
  simulated nodes (head + 2, same machine), 1, 2, 4 and 6 replicas spread over the nodes.

Ideal throughput = workers x max_batch / delay. The load generator is a closed loop with
``2 x max_batch`` requests outstanding per worker. Prints a table, writes JSON.

    .venv/bin/python -m benchmarks.scaling --part processes,ray [--delay-ms 40 --max-batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.lib.output import write_json
from benchmarks.lib.systems import WorkerProcesses, wait_for_workers
from headrace.cluster.bench.run import BenchSettings, host_info, run_bench_async
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="processes,ray")
    ap.add_argument("--workers", default="1,2,4,8", help="worker process counts")
    ap.add_argument("--replicas", default="1,2,4,6", help="Ray replica counts")
    ap.add_argument("--nodes", type=int, default=3, help="simulated Ray nodes (head included)")
    ap.add_argument("--delay-ms", type=float, default=40.0, help="fixed model time per batch")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--duration-s", type=float, default=8.0)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--json", default="runs/scaling.json")
    return ap.parse_args()


def measure(url: str, ns: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    # At most 96 outstanding: the asyncio SDK's redis pool refuses more than 100 connections at once.
    settings = BenchSettings(model="affine", redis_url=url, namespace=ns, concurrency=(min(96, 2 * args.max_batch * n),),
                             duration_s=args.duration_s, warmup_s=args.warmup_s, timeout_s=30.0)
    rep = asyncio.run(run_bench_async(settings, progress=False))
    p = rep.points[0]
    ideal = n * args.max_batch * 1000.0 / args.delay_ms
    return {"n": n, "throughput_rps": p.throughput_rps, "ideal_rps": ideal, "efficiency": p.throughput_rps / ideal,
            "p50_ms": p.e2e.p50, "p99_ms": p.e2e.p99, "mean_batch": p.mean_batch, "errors": p.errors}


def processes(args: argparse.Namespace, redis: EmbeddedRedis) -> list[dict[str, Any]]:
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        ns = f"scale-{uuid.uuid4().hex[:6]}"
        with WorkerProcesses(redis.url, ns, "affine", fake="affine", n=n, threads=1,
                             settings={"max_batch": args.max_batch, "max_wait_ms": 2.0},
                             env={"HEADRACE_FAKE_DELAY_MS": str(args.delay_ms)}):
            rows.append(measure(redis.url, ns, n, args))
    return rows


def ray_cluster(args: argparse.Namespace, redis: EmbeddedRedis) -> list[dict[str, Any]]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from headrace.cluster.serve.app import build_app

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=2)
    rows = []
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        for n in (int(x) for x in args.replicas.split(",")):
            ns = f"scale-{uuid.uuid4().hex[:6]}"
            app = build_app({"model": "affine", "fake": "affine", "fake_delay_ms": args.delay_ms,
                             "redis_url": redis.url, "namespace": ns, "num_replicas": n, "num_cpus": 0.1,
                             "max_batch": args.max_batch, "max_wait_ms": 2.0,
                             "max_replicas_per_node": math.ceil(n / args.nodes)})
            handle = serve.run(app, name=ns, route_prefix=None)
            try:
                wait_for_workers(redis.url, ns, "affine", n, 300.0)
                # Ask the replicas where they run (calls are spread over the replicas).
                seen = {s["replica"]: s["node_id"] for s in (handle.stats.remote().result() for _ in range(8 * n))}
                nodes = Counter(seen.values())
                row = measure(redis.url, ns, n, args)
                row["replicas_per_node"] = sorted(nodes.values(), reverse=True)
                rows.append(row)
            finally:
                serve.delete(ns)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    return rows


def table(title: str, rows: list[dict[str, Any]], what: str) -> Table:
    t = Table(title=title)
    for c in (what, "throughput/s", "ideal/s", "efficiency", "p50 ms", "p99 ms", "mean batch", "placement"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["n"]), f"{r['throughput_rps']:.0f}", f"{r['ideal_rps']:.0f}", f"{100 * r['efficiency']:.0f}%",
                  f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.1f}",
                  "/".join(map(str, r.get("replicas_per_node", []))) or "-")
    return t


def main() -> None:
    args = parse_args()
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    console = Console()
    with EmbeddedRedis() as redis:
        if "processes" in parts:
            out["processes"] = processes(args, redis)
            console.print(table(f"standalone worker processes (model: {args.delay_ms:g} ms per batch of "
                                f"{args.max_batch})", out["processes"], "workers"))
        if "ray" in parts:
            out["ray"] = ray_cluster(args, redis)
            console.print(table(f"Ray Serve replicas on a {args.nodes}-node ray.cluster_utils.Cluster "
                                f"(one machine)", out["ray"], "replicas"))
    doc = {"benchmark": "scaling", "started_at": started, "wall_s": round(time.monotonic() - t0, 1),
           "host": host_info(), "args": vars(args), **out}
    write_json(args.json, doc)
    console.print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
