"""Where an idle worker's latency goes: one request at a time through a standalone worker
(the zero-cost ``affine`` fake, ``max_wait_ms`` 0, so no batching wait), stage by stage,
against the bare two-hop Redis Streams round trip (the floor, :mod:`benchmarks.lib.floor`)
measured in the same run; then the dedupe and cancel pre-check asked as two concurrent
calls and as one pipeline, side by side on one broker and Redis.

The stages come from :mod:`benchmarks.lib.stage_trace` (the ordinary worker with its stage
methods wrapped to note the time); each figure is a time from the request being sent (the
client's ``submit`` called), p50 over the requests.

    .venv/bin/python -m benchmarks.idle_path [--requests 400] [--submit-mode strict] [--rounds 4]

Prints two tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rich.console import Console
from rich.table import Table

from benchmarks.lib.floor import stream_round_trip_floor
from headrace.client import AsyncClient
from headrace.cluster.bench.stats import percentile
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.broker.base import Broker
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings

#: (label, start edge, end edge): an edge is a stage note ("read<") or "sent", "submitted",
#: "received" (the client's own times).
STEPS = [
    ("submit call returns (client)", "sent", "submitted"),
    ("way in: the entry in the worker's hands", "sent", "read<"),
    ("dedupe and cancel pre-check", "precheck>", "precheck<"),
    ("admission (decode, checks) to queued", "precheck<", "queued<"),
    ("queued to taken by the model loop", "queued<", "taken<"),
    ("hand-over to the inference thread", "model-await>", "model>"),
    ("model call (zero-cost fake)", "model>", "model<"),
    ("back on the event loop", "model<", "model-await<"),
    ("result encoded, commit sent", "model-await<", "commit>"),
    ("commit script round trip", "commit>", "commit<"),
    ("way out: commit sent to the result in the client", "commit>", "received"),
    ("end to end", "sent", "received"),
]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests sent one at a time")
    ap.add_argument("--submit-mode", choices=("strict", "direct"), default="strict")
    ap.add_argument("--rounds", type=int, default=4, help="pre-check rounds; the two ways alternate within each")
    return ap.parse_args()


async def _send(url: str, n: int) -> list[tuple[float, float, float]]:
    """(sent, submitted, received) perf_counter seconds of ``n`` requests, one at a time."""
    out = []
    x = {"x": np.ones(4, np.float32)}
    async with AsyncClient(url, timeout_s=30) as client:
        for i in range(50):  # warm-up
            await client.result(await client.submit("affine", x, request_id=f"warm{i}"), timeout_s=30)
        for i in range(n):
            await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            ticket = await client.submit("affine", x, request_id=f"r{i}")
            t1 = time.perf_counter()
            await client.result(ticket, timeout_s=30)
            out.append((t0, t1, time.perf_counter()))
    return out


def _edges(notes: list[list[Any]], t0: float, t1: float, t2: float) -> dict[str, float]:
    """The first note of each edge inside one request's window."""
    got: dict[str, float] = {"sent": t0, "submitted": t1, "received": t2}
    for stage, edge, t in notes:
        if t0 <= t <= t2:
            got.setdefault(f"{stage}{edge}", t)
    return got


def stage_table(url: str, n: int, submit_mode: str) -> dict[str, list[float]]:
    """ms per step of :data:`STEPS` over ``n`` sequential requests through a traced worker."""
    with tempfile.TemporaryDirectory() as tmp:
        notes_file = Path(tmp) / "notes.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
        env["HEADRACE_SUBMIT_MODE"] = submit_mode
        worker = subprocess.Popen([sys.executable, "-m", "benchmarks.lib.stage_trace", str(notes_file), "--fake", "affine",
                                   "--redis-url", url, "--max-wait-ms", "0", "--log-level", "WARNING"], env=env)
        try:
            r = redis.Redis.from_url(url)
            deadline = time.monotonic() + 60
            while not r.hget("headrace:models", "affine"):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError("the traced worker did not register")
                time.sleep(0.1)
            times = asyncio.run(_send(url, n))
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        notes = json.loads(notes_file.read_text())
    steps: dict[str, list[float]] = {label: [] for label, _, _ in STEPS}
    for t0, t1, t2 in times:
        edges = _edges(notes, t0, t1, t2)
        for label, a, b in STEPS:
            if a in edges and b in edges:
                steps[label].append((edges[b] - edges[a]) * 1000.0)
    return steps


async def _precheck_rounds(url: str, rounds: int, n: int) -> dict[str, list[float]]:
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=url))
    await broker.ensure_group()
    ways = {"two concurrent calls (EXISTS, MGET)": lambda ids: Broker.prechecks(broker, ids),
            "one pipeline": broker.prechecks}
    out: dict[str, list[float]] = {w: [] for w in ways}
    try:
        for _ in range(rounds):
            for name, way in ways.items():
                for i in range(n):
                    t = time.perf_counter()
                    await way([f"p{i}"])
                    out[name].append((time.perf_counter() - t) * 1000.0)
    finally:
        await broker.close()
    return out


def main() -> int:
    args = parse_args()
    console = Console()
    with EmbeddedRedis() as server:
        floor = stream_round_trip_floor(server.url, rate_per_s=100.0, duration_s=6.0, warmup_s=1.0)
        steps = stage_table(server.url, args.requests, args.submit_mode)
        prechecks = asyncio.run(_precheck_rounds(server.url, args.rounds, 200))
    fl = floor["round_trip_ms"]
    t = Table(title=f"One request at a time, {args.submit_mode} submit mode, zero-cost model, max_wait_ms 0 "
                    f"({len(steps['end to end'])} requests, 2 CPUs)")
    for col in ("step", "p50 ms", "p90 ms"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for label, values in steps.items():
        if values:
            t.add_row(label, f"{percentile(values, 50):.3f}", f"{percentile(values, 90):.3f}")
    t.add_row("floor: bare two-hop Streams round trip (100/s)", f"{fl['p50']:.3f}", f"{fl['p90']:.3f}")
    e2e = steps["end to end"]
    if e2e:
        t.add_row("end to end / floor", f"{percentile(e2e, 50) / fl['p50']:.2f}x", f"{percentile(e2e, 90) / fl['p90']:.2f}x")
    console.print(t)
    p = Table(title=f"Dedupe and cancel pre-check of one request id, {args.rounds} rounds x 200 calls per way")
    for col in ("way", "p50 ms", "p90 ms"):
        p.add_column(col, justify="left" if col == "way" else "right")
    for name, values in prechecks.items():
        p.add_row(name, f"{percentile(values, 50):.3f}", f"{percentile(values, 90):.3f}")
    console.print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
