"""How much Redis work one request costs with headrace's access pattern, and where one
Redis would become the bottleneck.

Runs the real data plane with a zero-cost model so nothing but the queue is measured:
``--workers`` standalone workers (``python -m headrace.workers --fake affine``) and
``--clients`` load generators (``headrace bench``, closed loop) on a private Redis. Between
two ``INFO`` snapshots it reads:

* Redis' own CPU time (``used_cpu_user + used_cpu_sys``) per answered request: the cost
  that bounds a single-threaded Redis. ``1e6 / (CPU us per request)`` is the ceiling of
  requests/s one Redis core could carry with this pattern (an estimate: it assumes the
  cost per request stays flat up to saturation);
* the command mix (``INFO commandstats``): calls and microseconds per request. Commands
  run inside the Lua scripts are listed too (Redis counts them inside the script's time
  as well, so the per-command microseconds overlap; the CPU figure above does not).

On this 2-core machine the Python processes saturate the cores long before Redis does, so
the measured requests/s is a floor of what the pattern sustains and the ceiling is the
interesting figure. Prints a table, writes JSON. Asserts nothing about speed.

    .venv/bin/python -m benchmarks.redis_ops [--workers 2 --clients 2 --concurrency 64 --max-batch 32 --duration-s 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from benchmarks.lib.output import write_json
from benchmarks.lib.systems import WorkerProcesses, process_cpu_s
from headrace.cluster.bench.run import host_info
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (fake affine model)")
    ap.add_argument("--clients", type=int, default=2, help="load generator processes")
    ap.add_argument("--concurrency", type=int, default=64, help="outstanding requests per client")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--json", default="runs/redis_ops.json")
    return ap.parse_args()


def snapshot(r: redis.Redis) -> dict[str, Any]:
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    return {"t": time.monotonic(), "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "cmds": {k.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"])) for k, v in stats.items()}}


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[int, float]]:
    out = {}
    for name, (calls, usec) in b["cmds"].items():
        c0, u0 = a["cmds"].get(name, (0, 0.0))
        if calls - c0 > 0:
            out[name] = (calls - c0, usec - u0)
    return out


def run_load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], dict[str, float],
                                                 list[dict[str, Any]]]:
    """Workers and ``headrace bench`` load generators on a private Redis: the Redis snapshots
    and the workers' and clients' CPU seconds at both ends of the window, and the generators'
    reports.

    Raises:
        SystemExit: a load generator failed.
    """
    ns = f"ops-{uuid.uuid4().hex[:6]}"
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="headrace-ops-") as tmp:
        r = redis.Redis.from_url(server.url)
        with WorkerProcesses(server.url, ns, "affine", fake="affine", n=args.workers, threads=1,
                             settings={"max_batch": args.max_batch, "max_wait_ms": 2.0}) as workers:
            cmd = [sys.executable, "-m", "headrace.cluster.cli.main", "--redis-url", server.url, "--namespace", ns,
                   "bench", "affine", "--concurrency", str(args.concurrency), "--duration-s", str(args.duration_s),
                   "--warmup-s", "2", "--no-progress"]
            outs = [str(Path(tmp) / f"c{i}.json") for i in range(args.clients)]
            procs = [subprocess.Popen([*cmd, "--json", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for out in outs]
            time.sleep(2.5)  # past the clients' warm-up
            a = snapshot(r)
            cpu_a = {"workers": sum(map(process_cpu_s, workers.pids)),
                     "clients": sum(process_cpu_s(p.pid) for p in procs)}
            time.sleep(args.duration_s - 1.0)
            b = snapshot(r)
            cpu_b = {"workers": sum(map(process_cpu_s, workers.pids)),
                     "clients": sum(process_cpu_s(p.pid) for p in procs)}
            for p in procs:
                _, err = p.communicate(timeout=args.duration_s + 120)
                if p.returncode != 0:
                    raise SystemExit(f"a load generator failed: {err.decode(errors='replace')[-2000:]}")
        reports = [json.loads(Path(o).read_text()) for o in outs]
        r.close()
    return a, b, cpu_a, cpu_b, reports


def main() -> None:
    args = parse_args()
    console = Console()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    a, b, cpu_a, cpu_b, reports = run_load(args)
    rps = sum(rep["points"][0]["throughput_rps"] for rep in reports)
    mean_batch = [rep["points"][0]["mean_batch"] for rep in reports]
    secs = b["t"] - a["t"]
    answered = rps * secs
    cpu_s = b["cpu_s"] - a["cpu_s"]
    cpu_us_per_req = cpu_s * 1e6 / answered
    cmds = diff(a, b)
    python_us = {k: (cpu_b[k] - cpu_a[k]) * 1e6 / answered for k in cpu_a}
    ops_s = sum(c for c, _ in cmds.values()) / secs
    t = Table(title=f"Redis work per request ({args.workers} workers, {args.clients} clients x c={args.concurrency}, "
                    f"max_batch {args.max_batch}; {rps:.0f} req/s answered)")
    for c in ("command", "calls/s", "calls per request", "us per call", "us per request"):
        t.add_column(c, justify="right")
    for name, (calls, usec) in sorted(cmds.items(), key=lambda kv: -kv[1][1]):
        t.add_row(name, f"{calls / secs:.0f}", f"{calls / answered:.3f}", f"{usec / calls:.1f}",
                  f"{usec / answered:.2f}")
    console.print(t)
    ceiling = 1e6 / cpu_us_per_req
    console.print(f"Redis CPU: {100 * cpu_s / secs:.0f}% of one core for {rps:.0f} req/s = {cpu_us_per_req:.1f} us "
                  f"per request; {ops_s:.0f} commands/s (script-internal included).")
    console.print(f"Python around it: workers {python_us['workers']:.0f} us and load generators (asyncio SDK) "
                  f"{python_us['clients']:.0f} us of CPU per request.")
    console.print(f"Estimated ceiling of one Redis core with this pattern: {ceiling:.0f} req/s "
                  f"(mean batch {', '.join(f'{m:.1f}' for m in mean_batch if m)}).")
    doc = {"benchmark": "redis_ops", "started_at": started, "host": host_info(), "args": vars(args),
           "answered_rps": rps, "window_s": secs, "redis_cpu_fraction": cpu_s / secs,
           "redis_cpu_us_per_request": cpu_us_per_req, "ceiling_rps_estimate": ceiling, "commands_per_s": ops_s,
           "mean_batch": mean_batch, "python_cpu_us_per_request": python_us, "redis_version": os.popen("redis-server --version").read().strip(),
           "commands": {k: {"calls_per_request": c / answered, "usec_per_call": u / c, "usec_per_request": u / answered}
                        for k, (c, u) in cmds.items()}}
    write_json(args.json, doc)
    console.print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
