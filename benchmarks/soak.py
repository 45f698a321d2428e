"""Soak run: hundreds of thousands of requests through real worker processes, with faults,
and an exactly-once ledger at the end (sent / answered / lost / duplicated) plus memory.

Bounded in time and count: it stops sending after ``--duration-s`` or ``--requests``,
whichever comes first, then waits (at most ``--drain-s``) for the answers. It only talks to
the Redis it starts itself (a private ``redis-server`` with AOF ``appendfsync everysec``) or
to the one given with ``--redis-url`` (which it FLUSHes only with ``--flush``).

Faults (optional): ``--kill-every-s`` SIGKILLs a random worker (one that owns entries, when
there is one) and starts a replacement; ``--restart-redis-every-s`` crashes and restarts the
private Redis from its AOF. Every ``--garbage-every``-th entry is undecodable.

    .venv/bin/python -m benchmarks.soak --duration-s 120 --requests 300000 --rate 3000 \\
        --workers 3 --kill-every-s 10 [--restart-redis-every-s 40] [--json runs/soak.json] [--plot runs/soak.png]

Prints the ledger and memory table; exits 1 when anything was lost, duplicated or wrong.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from tests.support.chaos import (
    Fleet,
    Ledger,
    Report,
    Sampler,
    SteadyProducer,
    default_check,
    group_state,
    registered_workers,
    wait_until,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=60.0, help="stop sending after this long")
    p.add_argument("--requests", type=int, default=200_000, help="stop sending after this many")
    p.add_argument("--rate", type=float, default=2500.0, help="target requests per second")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=2.0, help="fake model time per batch")
    p.add_argument("--lease-s", type=float, default=2.0)
    p.add_argument("--dedupe-ttl-s", type=int, default=60)
    p.add_argument("--trim-interval-s", type=float, default=1.0)
    p.add_argument("--kill-every-s", type=float, default=0.0, help="SIGKILL a worker this often (0 = never)")
    p.add_argument("--restart-redis-every-s", type=float, default=0.0,
                   help="crash + restart the private Redis this often (0 = never)")
    p.add_argument("--garbage-every", type=int, default=0, help="every n-th entry undecodable (0 = none)")
    p.add_argument("--pipeline", type=int, default=20, help="producer XADDs per round trip")
    p.add_argument("--drain-s", type=float, default=120.0, help="longest wait for the last answers")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.add_argument("--flush", action="store_true", help="FLUSHALL the given --redis-url first")
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    p.add_argument("--plot", default=None, help="PNG of stream length, dedupe keys and memory over time")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def _redis(args: argparse.Namespace, work: Path) -> tuple[str, EmbeddedRedis | None]:
    """The Redis of the run: ``--redis-url``, or a private one with AOF."""
    if args.redis_url:
        if args.flush:
            redis.Redis.from_url(args.redis_url).flushall()
        if args.restart_redis_every_s:
            raise SystemExit("--restart-redis-every-s needs the private Redis (no --redis-url)")
        return args.redis_url, None
    (work / "redis").mkdir()
    server = EmbeddedRedis(data_dir=work / "redis", appendonly=True, appendfsync="everysec").start()
    return server.url, server


class _Faults:
    """The fault schedule: SIGKILL a worker every ``kill_every_s``, crash and restart Redis
    every ``restart_redis_every_s`` (0 = never)."""

    def __init__(self, args: argparse.Namespace, fleet: Fleet, server: EmbeddedRedis | None, t0: float) -> None:
        self.args, self.fleet, self.server = args, fleet, server
        self.rng = random.Random(args.seed)
        self.next_kill = t0 + args.kill_every_s if args.kill_every_s else float("inf")
        self.next_restart = t0 + args.restart_redis_every_s if args.restart_redis_every_s else float("inf")
        self.restarts = 0

    def tick(self, r: redis.Redis, now: float) -> None:
        if now >= self.next_kill:
            self.next_kill = now + self.args.kill_every_s
            try:
                owners = [p for p in self.fleet.alive() if group_state(r).get("consumers", {}).get(p.name, 0) > 0]
            except redis.RedisError:
                owners = []
            live = owners or self.fleet.alive()
            if live:
                self.fleet.sigkill(self.rng.choice(live))
            self.fleet.spawn()
        if now >= self.next_restart and self.server is not None:
            self.next_restart = now + self.args.restart_redis_every_s
            self.server.restart(crash=True, down_s=0.5)
            self.restarts += 1


def _drive(args: argparse.Namespace, prod: SteadyProducer, ledger: Ledger, faults: _Faults, r: redis.Redis,
           total: int, t0: float) -> float:
    """Send everything while injecting faults, then wait for the answers; returns the send time (s)."""
    with tqdm(total=total, unit="req", desc="answered", smoothing=0.1, mininterval=5) as bar:
        while not prod.done.is_set():
            time.sleep(0.5)
            bar.update(ledger.answered() - bar.n)
            faults.tick(r, time.monotonic())
        send_s = time.monotonic() - t0
        acked = {rid for rid, s in prod.sent.items() if s.acked}
        give_up = time.monotonic() + args.drain_s
        while time.monotonic() < give_up and not acked <= ledger.counts.keys():
            time.sleep(0.5)
            bar.update(ledger.answered() - bar.n)
        bar.update(ledger.answered() - bar.n)
    return send_s


def _figures(report: Report, sampler: Sampler, baseline: dict[str, Any], end_trim: dict[str, Any]) -> dict[str, Any]:
    """Ledger and memory figures of the run."""
    return {
        "requests_sent": report.sent, "answered": report.answered, "lost": len(report.lost),
        "duplicated": len(report.duplicated), "wrong": len(report.wrong), "unexpected": len(report.unexpected),
        "results": report.results, "codes": dict(report.codes),
        "peak_stream_len": int(sampler.peak("xlen")), "peak_backlog": int(sampler.peak("backlog")),
        "xinfo_lag_at_end": int(end_trim["xinfo_backlog"]),
        "peak_acked_untrimmed": int(max((x["xlen"] - x["backlog"] for x in sampler.samples), default=0)),
        "end_stream_len": int(end_trim["xlen"]),
        "peak_dedupe_keys": int(sampler.peak("done_keys")), "dedupe_keys_at_end": int(end_trim["done_keys"]),
        "baseline_used_memory_mb": round(baseline["used_memory"] / 2**20, 2),
        "peak_used_memory_mb": round(sampler.peak("used_memory") / 2**20, 2),
        "end_used_memory_mb": round(end_trim["used_memory"] / 2**20, 2),
        "lost_examples": report.lost[:10], "duplicated_examples": list(report.duplicated)[:10],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="headrace-soak-"))
    url, server = _redis(args, work)
    r = redis.Redis.from_url(url)
    keys = ModelKeys("headrace", "affine")
    total = min(args.requests, int(args.rate * args.duration_s) + args.pipeline)
    prod = SteadyProducer(url, total=total, rate_per_s=args.rate, pipeline=args.pipeline,
                          garbage_every=args.garbage_every, deadline_s=args.duration_s, reply_streams=4)
    ledger = Ledger(url, prod.replies, delete=True, keep=False, check=default_check(prod))
    sampler = Sampler(url, interval_s=1.0)
    wargs = ["--max-batch", str(args.max_batch), "--block-ms", "100", "--lease-s", str(args.lease_s),
             "--max-wait-ms", "5", "--trim-interval-s", str(args.trim_interval_s), "--dedupe-ttl-s",
             str(args.dedupe_ttl_s), "--max-deliveries", "20"]
    fleet = Fleet(url, work, wargs, env={"HEADRACE_FAKE_DELAY_MS": str(args.delay_ms)})
    fleet.env.pop("HEADRACE_FAKE_RECORD")  # the run record would grow with every request
    t0 = time.monotonic()
    faults = _Faults(args, fleet, server, t0)
    try:
        for _ in range(args.workers):
            fleet.spawn()
        wait_until(lambda: len(registered_workers(r)) >= args.workers, 30, what="workers up")
        baseline = sampler.sample(r)
        for t in (sampler, ledger, prod):
            t.start()
        send_s = _drive(args, prod, ledger, faults, r, total, t0)
        answered_s = time.monotonic() - t0
        time.sleep(args.lease_s + 1.0)  # late duplicates would land now
        report: Report = ledger.report(prod)
        # Memory after the run: the stream trims back; markers expire after dedupe_ttl_s.
        end_trim = sampler.sample(r)
        stats_len, dlq_len = int(r.xlen(keys.stats)), int(r.xlen(keys.dlq))
        exit_codes = fleet.stop_all()
    finally:
        sampler.stop()
        ledger.stop()
        prod.stop()
        fleet.close()
        if server is not None:
            server.close()
    return {
        **_figures(report, sampler, baseline, end_trim), "send_s": round(send_s, 1),
        "all_answered_s": round(answered_s, 1), "throughput_rps": round(report.answered / answered_s, 1),
        "workers": args.workers, "worker_kills": fleet.kills, "redis_restarts": faults.restarts,
        "producer_xadd_errors": prod.errors, "ledger_reconnects": ledger.reconnects,
        "worker_exit_codes": exit_codes, "stats_stream_len": stats_len, "dlq_len": dlq_len,
        "samples": sampler.samples, "args": vars(args),
    }


def show(out: dict[str, Any]) -> None:
    t = Table(title="headrace soak: exactly-once ledger and memory")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in out.items():
        if k in {"samples", "args"}:
            continue
        t.add_row(k, str(v))
    Console().print(t)


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = out["samples"]
    if not s:
        return
    t0 = s[0]["t"]
    ts = [x["t"] - t0 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, key, label in zip(axes, ("xlen", "done_keys", "used_memory"),
                              ("request stream (entries)", "dedupe markers", "Redis used_memory (MiB)"), strict=True):
        ys = [x[key] / (2**20 if key == "used_memory" else 1) for x in s]
        ax.plot(ts, ys, label="stream length" if key == "xlen" else None)
        if key == "xlen":
            # The stream holds the backlog (unread + pending) plus acked entries not trimmed yet.
            ax.plot(ts, [x.get("backlog", 0.0) for x in s], "--", label="backlog (lag + pending, <= length)")
            ax.plot(ts, [x.get("xinfo_backlog", 0.0) for x in s], ":", label="lag + pending as XINFO GROUPS says")
            ax.legend(loc="upper left")
        ax.set_ylabel(label)
    axes[-1].set_xlabel("seconds")
    fig.suptitle(f"soak: {out['requests_sent']} requests, {out['worker_kills']} worker kills, "
                 f"{out['redis_restarts']} Redis restarts")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    show(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if args.plot:
        plot(out, args.plot)
    bad = out["lost"] or out["duplicated"] or out["wrong"] or out["unexpected"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
