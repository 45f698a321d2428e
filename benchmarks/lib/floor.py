"""The floor under the queue overhead: a bare Redis Streams round trip on this machine.

Two plain redis-py asyncio processes and nothing else: the producer ``XADD``s a small
entry to a request stream (Poisson arrivals), an echo process blocked in ``XREADGROUP``
copies it to a reply stream with ``XADD`` (and ``XACK``s it), and the producer's reader,
blocked in ``XREAD``, notes when it is back. No protocol, no batching, no model: the same
two hops (producer -> consumer, consumer -> producer) every headrace request takes, with
the least code on them. Its latency is what the machine's scheduler, loopback and Redis
cost; headrace's *queue overhead* (see ``bench_probe.split_overhead``) can approach it but
not go below it.

    python -m benchmarks.lib.floor --echo REDIS_URL STREAM_PREFIX   # the echo side
    python -m benchmarks.lib.floor --produce REDIS_URL STREAM_PREFIX RATE DURATION_S WARMUP_S SEED

Both sides run as processes of their own, so neither shares an interpreter (or its GIL)
with whatever else the calling benchmark runs meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from headrace.cluster.bench.load import poisson_schedule
from headrace.cluster.bench.stats import LatencySummary

GROUP = "floor"


async def _echo(url: str, prefix: str) -> None:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    req, rep = f"{prefix}:req", f"{prefix}:rep"
    try:
        await r.xgroup_create(req, GROUP, id="0", mkstream=True)
    except Exception:  # noqa: BLE001, S110 - BUSYGROUP: created by the producer
        pass
    while True:
        resp: Any = await r.xreadgroup(GROUP, "echo", {req: ">"}, count=64, block=1000)
        for _stream, entries in resp or []:
            pipe = r.pipeline(transaction=False)
            for entry_id, fields in entries:
                if fields.get(b"stop"):
                    await r.aclose()
                    return
                pipe.xadd(rep, fields)
                pipe.xack(req, GROUP, entry_id)
            await pipe.execute()


async def _produce(url: str, prefix: str, rate_per_s: float, duration_s: float, warmup_s: float,
                   seed: int) -> list[float]:
    import redis.asyncio as aredis

    r, reader = aredis.Redis.from_url(url), aredis.Redis.from_url(url)
    req, rep = f"{prefix}:req", f"{prefix}:rep"
    sent: dict[bytes, float] = {}
    lat: list[float] = []
    schedule = poisson_schedule(rate_per_s, warmup_s + duration_s, seed=seed)
    done = asyncio.Event()

    async def read() -> None:
        last = "0-0"
        while not done.is_set() or sent:
            resp: Any = await reader.xread({rep: last}, count=256, block=200)
            now = time.perf_counter()
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    last = entry_id
                    t = sent.pop(fields[b"n"], None)
                    if t is not None and fields.get(b"m") == b"1":
                        lat.append((now - t) * 1000.0)
            if done.is_set() and not resp:
                break

    task = asyncio.get_running_loop().create_task(read())
    t0 = time.perf_counter()
    for i, at in enumerate(schedule):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = str(i).encode()
        sent[key] = time.perf_counter()
        await r.xadd(req, {b"n": key, b"m": b"1" if at >= warmup_s else b"0"})
    done.set()
    await asyncio.wait_for(task, 30)
    await r.xadd(req, {b"stop": b"1"})
    await r.aclose()
    await reader.aclose()
    return lat


def stream_round_trip_floor(url: str, rate_per_s: float, duration_s: float = 10.0, warmup_s: float = 2.0,
                            seed: int = 0) -> dict[str, Any]:
    """Measure the bare two-hop Streams round trip at ``rate_per_s`` (Poisson) on the Redis
    at ``url``; returns ``{"rate_rps", "round_trip_ms": LatencySummary as dict, "echo_exit":
    the echo process' exit code (0 = clean)}``."""
    from dataclasses import asdict

    prefix = f"floor-{uuid.uuid4().hex[:6]}"
    me = [sys.executable, "-m", "benchmarks.lib.floor"]
    echo = subprocess.Popen([*me, "--echo", url, prefix])
    try:
        out = subprocess.run([*me, "--produce", url, prefix, str(rate_per_s), str(duration_s), str(warmup_s),
                              str(seed)], capture_output=True, text=True, timeout=duration_s + warmup_s + 120,
                             check=True)
        lat = [float(x) for x in json.loads(out.stdout)]
    finally:
        try:
            echo.wait(10)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait(5)
        import redis

        # Only once the echo has stopped reading: it would fail on a deleted group.
        redis.Redis.from_url(url).delete(f"{prefix}:req", f"{prefix}:rep")
    return {"rate_rps": rate_per_s, "round_trip_ms": asdict(LatencySummary.of(lat)), "echo_exit": echo.returncode}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side = ap.add_mutually_exclusive_group(required=True)
    side.add_argument("--echo", nargs=2, metavar=("REDIS_URL", "PREFIX"))
    side.add_argument("--produce", nargs=6, metavar=("REDIS_URL", "PREFIX", "RATE", "DURATION_S", "WARMUP_S", "SEED"),
                      help="send, time the round trips, print them (ms) as a JSON list")
    args = ap.parse_args(argv)
    if args.echo:
        asyncio.run(_echo(*args.echo))
        return 0
    url, prefix, rate, duration, warmup, seed = args.produce
    lat = asyncio.run(_produce(url, prefix, float(rate), float(duration), float(warmup), int(seed)))
    print(json.dumps([round(x, 4) for x in lat]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
