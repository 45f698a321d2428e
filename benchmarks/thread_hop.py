"""What one call on the worker's model thread costs the event loop, beyond the call: the
``DaemonExecutor`` hop (an ``asyncio.Future`` resolved by one ``call_soon_threadsafe``)
against the ``concurrent.futures.Future`` + ``asyncio.wrap_future`` chain it replaced, and
against the floor of any hop: two threads passing a token through two ``SimpleQueue``\\ s,
no event loop. Side by side, in one run, the ways alternating round by round.

The worker makes one hop per model call (and one per admission of large entries), so on a
zero-cost model or a device that is fast next to Python, this is per-batch CPU and latency.

Prints wall and process-CPU microseconds per call (median of ``--rounds`` rounds of
``--calls`` sequential calls of a function that returns at once). Asserts nothing.

    .venv/bin/python -m benchmarks.thread_hop [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from headrace.workers.engine.daemon import DaemonExecutor


class ChainedExecutor:
    """The hop as it was: a ``concurrent.futures.Future`` set by the thread and chained to
    the loop by ``asyncio.wrap_future``."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._main, daemon=True).start()

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn = job
            if fut.set_running_or_notify_cancel():
                fut.set_result(fn())

    async def run(self, fn: Callable[[], Any]) -> Any:
        fut: Future[Any] = Future()
        self._jobs.put((fut, fn))
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self._jobs.put(None)


async def _time(call: Callable[[], Awaitable[Any]], n: int) -> tuple[float, float]:
    """(wall us, CPU us) per call over ``n`` sequential calls."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def _pingpong(n: int) -> tuple[float, float]:
    """(wall us, CPU us) per round trip of a token between two threads: the hop's floor."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (x := there.get()) is not None:
            back.put(x)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        there.put(i)
        back.get()
    out = (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6
    there.put(None)
    t.join()
    return out


async def measure(calls: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    daemon, chained = DaemonExecutor("hop-daemon"), ChainedExecutor()

    def noop() -> int:
        return 1

    ways: dict[str, Callable[[], Awaitable[Any]]] = {
        "chained (concurrent Future + wrap_future), before": lambda: chained.run(noop),
        "direct (asyncio Future + call_soon_threadsafe), now": lambda: daemon.run(noop),
    }
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in [*ways, "floor: two-thread ping-pong"]}
    try:
        for call in ways.values():
            await _time(call, calls // 10)  # warm-up
        for _ in range(rounds):
            for name, call in ways.items():
                out[name].append(await _time(call, calls))
            out["floor: two-thread ping-pong"].append(_pingpong(calls))
    finally:
        daemon.shutdown()
        chained.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--calls", type=int, default=3000, help="sequential calls per round and way")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the ways alternate within each")
    args = ap.parse_args()
    got = asyncio.run(measure(args.calls, args.rounds))
    print(f"{'hop':<54} {'wall us':>9} {'CPU us':>8}   (median of {args.rounds} rounds x {args.calls} calls)")
    for name, rows in got.items():
        wall, cpu = (statistics.median(r[i] for r in rows) for i in (0, 1))
        print(f"{name:<54} {wall:>9.1f} {cpu:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
