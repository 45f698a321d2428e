"""The worker's one-thread executor (model calls, admission): outcomes reach the awaiting
coroutine, a call given up on before it starts is skipped, one given up on while it runs
neither breaks the thread nor reaches anyone, and a closed loop leaves the thread serving."""

from __future__ import annotations

import asyncio
import threading

import pytest

from headrace.workers.engine.daemon import DaemonExecutor

pytestmark = pytest.mark.timeout(30)


async def test_result_and_error_reach_the_caller_in_order() -> None:
    ex = DaemonExecutor("t")
    try:
        seen: list[int] = []
        results = await asyncio.gather(*(ex.run(lambda i=i: seen.append(i) or i * 2) for i in range(50)))
        assert results == [i * 2 for i in range(50)] and seen == list(range(50))
        assert threading.current_thread().name != "t"
        with pytest.raises(ZeroDivisionError):
            await ex.run(lambda: 1 / 0)
        assert await ex.run(threading.current_thread) is not threading.current_thread()
    finally:
        ex.shutdown()


async def test_stop_iteration_fails_the_call_instead_of_hanging_it() -> None:
    ex = DaemonExecutor("t")
    try:
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(ex.run(next, iter(())), 5)
        assert await ex.run(lambda: "still serving") == "still serving"
    finally:
        ex.shutdown()


async def test_a_call_cancelled_before_it_starts_is_skipped() -> None:
    ex = DaemonExecutor("t")
    gate, ran = threading.Event(), []
    try:
        blocker = ex.start(gate.wait, 10)
        queued = ex.start(ran.append, "queued")
        queued.cancel()
        gate.set()
        assert await blocker is True
        assert await ex.run(lambda: "after") == "after"
        assert ran == [], "a call cancelled while queued must not run"
    finally:
        ex.shutdown()


async def test_a_call_timed_out_while_running_is_dropped_and_the_thread_goes_on() -> None:
    ex = DaemonExecutor("t")
    gate = threading.Event()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ex.start(lambda: gate.wait(10) and "late"), 0.05)
        gate.set()
        assert await ex.run(lambda: "next") == "next"
    finally:
        ex.shutdown()


def test_a_loop_closed_while_a_call_runs_leaves_the_thread_serving_the_next_loop() -> None:
    ex = DaemonExecutor("t")
    gate, done = threading.Event(), threading.Event()

    async def start_and_leave() -> None:
        ex.start(lambda: (gate.wait(10), done.set()))

    try:
        asyncio.run(start_and_leave())  # the loop closes with the call still running
        gate.set()
        assert done.wait(5)
        assert asyncio.run(asyncio.wait_for(ex.run(lambda: 42), 5)) == 42
    finally:
        ex.shutdown()
