"""Redis CPU of the worker's commit script, two versions side by side: the
``workers/broker/lua/commit.lua`` of source tree A and of source tree B, loaded into one
private Redis and run alternately on the same kind of batch, so both see the same server and
machine. A tree is a checkout (``git worktree add /tmp/base <commit>``).

Each round reads ``--batch`` fresh single-sample requests with this tree's ``RedisBroker``
and commits them with the script of A, then the same again with B's (the ARGV both take is
this tree's ``_commit_args``: the script's calling convention must be the same in both).
Redis' own CPU (``used_cpu_user + used_cpu_sys``) around the commit calls only, per entry,
and ``INFO commandstats`` ``EVALSHA`` microseconds per entry.

    .venv/bin/python -m benchmarks.commit_cost --a /tmp/base --b . [--rounds 20] [--batch 256] [--clients 4]

``--clients`` reply streams share the batch (a batch's requests come from that many SDK
clients). Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from benchmarks.lib.trees import add_tree_args
from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline.ops import Reply
from headrace.workers.settings import WorkerSettings

KEYS = ModelKeys("headrace", "affine")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_tree_args(ap)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256, help="entries per commit")
    ap.add_argument("--commits", type=int, default=20, help="commits per tree and round")
    ap.add_argument("--clients", type=int, default=4, help="reply streams the batch's requests name")
    return ap.parse_args()


def _cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _request(i: int, reply_to: str) -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": f"q{i}".encode(), b"reply_to": reply_to.encode(), b"x": b"\x00" * 16}


def _result(i: int) -> dict[bytes, bytes]:
    return {b"v": b"1", b"id": f"q{i}".encode(), b"status": b"ok", b"t": b"\x01" * 40, b"y": b"\x02" * 16}


async def _one_tree(b: RedisBroker, r: redis.Redis, sha: str, args: argparse.Namespace, start: int) -> tuple[float, float]:
    """Redis CPU seconds and EVALSHA usec of ``--commits`` commits of ``--batch`` entries."""
    cpu = usec = 0.0
    for c in range(args.commits):
        base = start + c * args.batch
        pipe = r.pipeline(transaction=False)
        replies = [KEYS.reply(f"c{i % args.clients}") for i in range(base, base + args.batch)]
        for i, reply_to in zip(range(base, base + args.batch), replies, strict=True):
            pipe.xadd(KEYS.requests, _request(i, reply_to))  # type: ignore[arg-type]
        ids = [x.decode() for x in pipe.execute()]
        got = 0
        while got < len(ids):
            got += len(await b.read(args.batch, 10))
        ops = [Reply(e, f"q{i}", rt, _result(i)) for e, i, rt in zip(ids, range(base, base + args.batch), replies,
                                                                        strict=True)]
        keys, argv = b._commit_args(ops, 1_700_000_000_000)
        r.config_resetstat()
        c0 = _cpu_s(r)
        r.evalsha(sha, len(keys), *keys, *argv)  # type: ignore[no-untyped-call]
        cpu += _cpu_s(r) - c0
        usec += float(r.info("commandstats")["cmdstat_evalsha"]["usec"])
        r.xtrim(KEYS.requests, maxlen=0)
        for k in range(args.clients):
            r.delete(KEYS.reply(f"c{k}"))
    return cpu, usec


async def run(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    shas = {}
    out: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        for name, tree in (("A", args.a), ("B", args.b)):
            shas[name] = r.script_load((tree / "workers/broker/lua/commit.lua").read_text())
        b = RedisBroker(WorkerSettings(model="affine", redis_url=server.url, consumer="bench", block_ms=10))
        await b.ensure_group()
        n = 0
        for _ in range(args.rounds):
            for name in ("A", "B"):
                out[name].append(await _one_tree(b, r, shas[name], args, n))
                n += args.commits * args.batch
        await b.close()
    return out


def main() -> int:
    args = parse_args()
    res = asyncio.run(run(args))
    per = args.commits * args.batch
    table = Table(title=f"commit script, {args.batch} results per commit over {args.clients} reply streams, "
                        f"{args.rounds} rounds x {args.commits} commits per tree (medians of rounds)")
    for col in ("script", "Redis CPU us / entry", "EVALSHA us / entry (commandstats)"):
        table.add_column(col, justify="right" if col != "script" else "left")
    med: dict[str, Any] = {}
    for name, tree in (("A", args.a), ("B", args.b)):
        cpu = statistics.median(c * 1e6 / per for c, _ in res[name])
        usec = statistics.median(u / per for _, u in res[name])
        med[name] = (cpu, usec)
        table.add_row(f"{name}: {tree}", f"{cpu:.2f}", f"{usec:.2f}")
    Console().print(table)
    print(f"B / A: Redis CPU {med['B'][0] / med['A'][0]:.2f}, EVALSHA {med['B'][1] / med['A'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
