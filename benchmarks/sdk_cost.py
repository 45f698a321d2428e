"""What the asyncio SDK costs the load generator: CPU microseconds per request.

A closed loop like ``headrace bench``'s ``HeadraceTarget.call``: ``--concurrency``
coroutines, each doing ``ticket = await client.submit(model, ...)`` then
``await ticket.wait(timeout)``, against one standalone worker (``python -m headrace.workers
--fake length|affine``, a zero-cost numpy model) on a private ``redis-server``. After
``--warmup`` requests it drives ``--requests`` more and prints

* the load generator's CPU time per request (``time.process_time()`` of this process,
  i.e. every thread of it, divided by the requests): what the SDK takes from the model on
  a shared machine;
* the worker's and Redis' CPU per request, and the throughput (requests/s, wall clock).

``--delay-ms`` makes the fake model sleep per batch, like a real model: replies then come
in bulk and many callers submit in the same event-loop turn (the case of a loaded model).
``--mode map`` / ``sync-map`` measure ``AsyncClient.map`` / ``Client.map`` instead (window
of ``--concurrency``).

On a 2-core machine the three processes share the cores, so throughput is bounded by
their sum; the CPU figures are the stable ones. Asserts nothing about speed.

    .venv/bin/python -m benchmarks.sdk_cost [--requests 5000 --concurrency 96 --kind length --delay-ms 0]

To compare with another version of the SDK, put a copy of it first on the path, e.g. a
folder ``/tmp/old/headrace/client`` and ``PYTHONPATH=/tmp/old`` (the worker process always
runs the working tree's code).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import sys
import time
import uuid
from typing import Any

import numpy as np
import redis

import headrace.client
from benchmarks.lib.systems import WorkerProcesses, process_cpu_s
from headrace.client import AsyncClient, Client
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("submit", "map", "sync-map"), default="submit",
                    help="closed loop of AsyncClient.submit + wait (default), AsyncClient.map, or Client.map")
    ap.add_argument("--requests", type=int, default=5000, help="measured requests")
    ap.add_argument("--warmup", type=int, default=500, help="requests before measuring")
    ap.add_argument("--concurrency", type=int, default=96,
                    help="outstanding requests (closed loop; max_in_flight for the map modes)")
    ap.add_argument("--chunk-size", type=int, default=1, help="map: items per multi-sample entry (1: per request)")
    ap.add_argument("--kind", choices=("length", "affine"), default="length",
                    help="fake model: text input (length) or a float32 tensor (affine)")
    ap.add_argument("--max-batch", type=int, default=64, help="the worker's max_batch")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="the fake model sleeps this long per batch (ms), standing in for a real model")
    ap.add_argument("--timeout-s", type=float, default=30.0)
    ap.add_argument("--profile", default="", help="write a cProfile of the measured part to this file")
    ap.add_argument("--json", default="", help="also write the figures to this file")
    return ap.parse_args()


def payload(kind: str, i: int) -> tuple[dict[str, Any] | None, str | None]:
    if kind == "length":
        return None, f"sentence number {i} of the SDK cost benchmark"
    return {"x": np.full(4, i % 100, np.float32)}, None


async def drive(client: AsyncClient, kind: str, n: int, concurrency: int,
                timeout_s: float) -> tuple[dict[str, int], list[float]]:
    """``n`` requests, ``concurrency`` outstanding; return the count per outcome and each
    request's latency (submit to result, seconds)."""
    counts: dict[str, int] = {}
    latencies: list[float] = []
    next_index = 0

    async def one_caller() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            inputs, text = payload(kind, i)
            t0 = time.perf_counter()
            ticket = await client.submit(kind, inputs, text)
            res = await ticket.wait(timeout_s)
            latencies.append(time.perf_counter() - t0)
            counts[res.status] = counts.get(res.status, 0) + 1

    await asyncio.gather(*(one_caller() for _ in range(concurrency)))
    return counts, latencies


def redis_cpu_s(url: str) -> float:
    r = redis.Redis.from_url(url)
    try:
        cpu = r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    finally:
        r.close()


def map_items(kind: str, n: int) -> list[Any]:
    """``map`` items: a str (text) or a mapping of inputs each."""
    out: list[Any] = []
    for i in range(n):
        inputs, text = payload(kind, i)
        out.append(text if text is not None else inputs)
    return out


def tally(results: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for res in results:
        counts[res.status] = counts.get(res.status, 0) + 1
    return counts


class Meter:
    """CPU of this process, the workers and Redis, and wall time, between start and stop
    (plus an optional cProfile of this process)."""

    def __init__(self, url: str, worker_pids: list[int], profile: str) -> None:
        self.url, self.worker_pids, self.profile_path = url, worker_pids, profile
        self.prof = cProfile.Profile() if profile else None

    def _now(self) -> tuple[float, float, float, float]:
        return (time.process_time(), time.perf_counter(), sum(process_cpu_s(p) for p in self.worker_pids),
                redis_cpu_s(self.url))

    def start(self) -> None:
        self.before = self._now()
        if self.prof is not None:
            self.prof.enable()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.disable()
        self.after = self._now()
        if self.prof is not None:
            self.prof.dump_stats(self.profile_path)

    def figures(self, n: int) -> dict[str, float]:
        (c0, t0, w0, r0), (c1, t1, w1, r1) = self.before, self.after
        return {"wall_s": t1 - t0, "throughput_rps": n / (t1 - t0), "client_cpu_us_per_req": (c1 - c0) * 1e6 / n,
                "worker_cpu_us_per_req": (w1 - w0) * 1e6 / n, "redis_cpu_us_per_req": (r1 - r0) * 1e6 / n}


async def measure_async(url: str, ns: str, args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    async with AsyncClient(url, namespace=ns, timeout_s=args.timeout_s, max_backlog=0,
                           max_in_flight=args.concurrency) as client:

        async def run(n: int) -> tuple[dict[str, int], list[float]]:
            if args.mode == "submit":
                return await drive(client, args.kind, n, args.concurrency, args.timeout_s)
            return tally(await client.map(args.kind, map_items(args.kind, n), progress=False,
                                          chunk_size=args.chunk_size)), []

        await run(args.warmup)
        pipeline = getattr(client, "_pipeline", None)  # absent in SDKs without auto-pipelining
        flushes0 = pipeline.flushes if pipeline is not None else 0
        meter.start()
        counts, latencies = await run(args.requests)
        meter.stop()
        flushes = pipeline.flushes - flushes0 if pipeline is not None else args.requests
    out: dict[str, Any] = {"outcomes": counts, "submit_round_trips_per_req": flushes / args.requests}
    if latencies:
        lat_ms = np.asarray(latencies) * 1000
        out["latency_ms"] = {"p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99))}
    return out


def measure_sync(url: str, ns: str, args: argparse.Namespace, meter: Meter) -> dict[str, Any]:
    with Client(url, namespace=ns, timeout_s=args.timeout_s, max_backlog=0, max_in_flight=args.concurrency) as client:
        client.map(args.kind, map_items(args.kind, args.warmup), progress=False, chunk_size=args.chunk_size)
        meter.start()
        results = client.map(args.kind, map_items(args.kind, args.requests), progress=False,
                             chunk_size=args.chunk_size)
        meter.stop()
    return {"outcomes": tally(results)}


def main() -> int:
    args = parse_args()
    ns = f"sdkcost-{uuid.uuid4().hex[:6]}"
    with EmbeddedRedis() as server:
        # The worker runs the working tree's code whatever PYTHONPATH says (see the module doc).
        env = {"PYTHONPATH": ""} if os.environ.get("PYTHONPATH") else {}
        if args.delay_ms:
            env["HEADRACE_FAKE_DELAY_MS"] = str(args.delay_ms)
        with WorkerProcesses(server.url, ns, args.kind, fake=args.kind, settings={"max_batch": args.max_batch},
                             env=env) as workers:
            meter = Meter(server.url, workers.pids, args.profile)
            if args.mode == "sync-map":
                got = measure_sync(server.url, ns, args, meter)
            else:
                got = asyncio.run(measure_async(server.url, ns, args, meter))
    out = {"mode": args.mode, "requests": args.requests, "concurrency": args.concurrency, "kind": args.kind,
           "delay_ms": args.delay_ms, **got, **meter.figures(args.requests),
           "sdk": os.path.dirname(headrace.client.__file__)}
    latency = out.get("latency_ms")
    print(f"SDK {out['sdk']}")
    print(f"{args.mode}: {args.requests} requests, concurrency {args.concurrency}, model {args.kind} "
          f"(+{args.delay_ms:g} ms/batch): {out['throughput_rps']:.0f} req/s ({out['wall_s']:.2f} s), "
          + (f"latency p50 {latency['p50']:.2f} ms p99 {latency['p99']:.2f} ms, " if latency else "")
          + f"outcomes {out['outcomes']}")
    trips = out.get("submit_round_trips_per_req")
    print(f"CPU us/request: load generator {out['client_cpu_us_per_req']:.0f}, "
          f"worker {out['worker_cpu_us_per_req']:.0f}, redis {out['redis_cpu_us_per_req']:.0f}"
          + (f"; submit round trips/request {trips:.3f}" if trips is not None else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0 if set(out["outcomes"]) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
