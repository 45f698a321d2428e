"""Before/after for the idle path: one request at a time (``AsyncClient``, the zero-cost
``affine`` fake) through a standalone worker run from source tree A or B, alternating in
rounds on a fresh private Redis each, so both see the same machine within a minute. The
client is this tree's; only the worker's code differs. A tree is a checkout (``git
worktree add /tmp/base <commit>``); it runs with ``PYTHONPATH=<tree>/src:<tree>``.

    .venv/bin/python -m benchmarks.ab_idle --a /tmp/base --b . [--rounds 10] [--requests 300] \\
        [-- worker flags, e.g. --max-wait-ms 0]

Prints each round's p50 / p90 ms and the paired differences; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis

from benchmarks.lib.trees import add_tree_args, paired, tree_env
from headrace.client import AsyncClient
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    worker = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_tree_args(ap)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=300, help="requests per tree and round")
    return ap.parse_args(own), worker


async def _sequential(url: str, n: int) -> list[float]:
    x = {"x": np.ones(4, np.float32)}
    async with AsyncClient(url, timeout_s=30) as client:
        for _ in range(50):  # warm-up
            await client.result(await client.submit("affine", x), timeout_s=30)
        out = []
        for _ in range(n):
            await asyncio.sleep(0.002)
            t = time.perf_counter()
            await client.result(await client.submit("affine", x), timeout_s=30)
            out.append((time.perf_counter() - t) * 1000.0)
    return out


def one_round(tree: Path, n: int, worker_flags: list[str]) -> list[float]:
    """End-to-end ms of ``n`` sequential requests through a worker run from ``tree``."""
    tree = tree.resolve()
    with EmbeddedRedis() as server:
        env = tree_env(tree)
        worker = subprocess.Popen([sys.executable, "-m", "headrace.workers", "--fake", "affine", "--redis-url",
                                   server.url, "--log-level", "WARNING", *worker_flags], cwd=tree, env=env)
        try:
            r = redis.Redis.from_url(server.url)
            deadline = time.monotonic() + 60
            while not r.hget("headrace:models", "affine"):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"the worker from {tree} did not register")
                time.sleep(0.1)
            return asyncio.run(_sequential(server.url, n))
        finally:
            worker.terminate()
            worker.wait(60)


def main() -> int:
    args, worker_flags = parse_args()
    p50s: dict[str, list[float]] = {"A": [], "B": []}
    for k in range(args.rounds):
        for name, tree in (("A", args.a), ("B", args.b)):
            lat = sorted(one_round(tree, args.requests, worker_flags))
            p50, p90 = statistics.median(lat), lat[int(0.9 * (len(lat) - 1))]
            p50s[name].append(p50)
            print(f"round {k} {name} p50 {p50:.3f} p90 {p90:.3f} ms", flush=True)
    median, mean, b_faster = paired(p50s["A"], p50s["B"])
    print(f"A p50s (ms): {' '.join(f'{v:.2f}' for v in p50s['A'])}")
    print(f"B p50s (ms): {' '.join(f'{v:.2f}' for v in p50s['B'])}")
    print(f"paired A - B: median {median:.3f} ms, mean {mean:.3f} ms, "
          f"B faster in {b_faster} of {args.rounds} rounds; "
          f"median p50 A {statistics.median(p50s['A']):.3f} / B {statistics.median(p50s['B']):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
