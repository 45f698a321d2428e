"""Closing clients: close() releases every caller waiting on an outstanding ticket, and an
AsyncClient is bound to one event loop (a clear error from another; close after its loop died)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest
import redis

from headrace.client import AsyncClient, BrokerError, Client, HeadraceError, RequestCancelled
from tests.support.client import affine_inputs, start_fake_worker

pytestmark = pytest.mark.timeout(60)


def test_close_releases_threads_blocked_on_tickets(redis_url: str) -> None:
    c = Client(redis_url, reply_block_ms=200, timeout_s=10, require_registered=False)
    ticket = c.submit("noworker", text="never answered")
    outcomes: dict[str, BaseException | None] = {}

    def wait(name: str, fn: Any) -> None:
        try:
            fn()
            outcomes[name] = None
        except BaseException as e:  # noqa: BLE001 - checked below
            outcomes[name] = e

    threads = [threading.Thread(target=wait, args=("result", lambda: ticket.result(10))),
               threading.Thread(target=wait, args=("map", lambda: c.map("noworker", ["a"] * 5, progress=False))),
               threading.Thread(target=wait, args=("infer", lambda: c.infer("noworker", text="b")))]
    for t in threads:
        t.start()
    assert _wait_for(lambda: len(c.outstanding()) >= 3)  # map: one multi-sample entry
    started = time.monotonic()
    c.close()
    for t in threads:
        t.join(5)
    assert time.monotonic() - started < 3  # not their 10 s timeouts
    assert set(outcomes) == {"result", "map", "infer"}
    for name, err in outcomes.items():
        assert isinstance(err, RequestCancelled), (name, err)
        assert "closed" in str(err)
    assert ticket.cancelled() and c.outstanding() == []


async def test_close_releases_tasks_awaiting_tickets(redis_url: str) -> None:
    c = AsyncClient(redis_url, reply_block_ms=200, timeout_s=10, require_registered=False)
    ticket = await c.submit("noworker", text="never answered")
    waiters = [asyncio.ensure_future(ticket.wait(10)), asyncio.ensure_future(c.infer("noworker", text="b")),
               asyncio.ensure_future(c.map("noworker", ["a"] * 3, progress=False))]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await c.close()
    done = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
    assert time.monotonic() - started < 3
    assert all(isinstance(e, RequestCancelled) for e in done), done


def test_async_client_from_a_second_loop_fails_clearly(redis_url: str,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    worker = start_fake_worker(redis_url, "affine", "affine")
    try:
        c = AsyncClient(redis_url, reply_block_ms=200, timeout_s=5)
        assert asyncio.run(c.infer("affine", affine_inputs(1))).ok
        r = redis.Redis.from_url(redis_url)
        sent = r.xlen(c.model_keys("affine").requests)

        async def again() -> None:
            await c.infer("affine", affine_inputs(2), request_id="second-loop")

        with pytest.raises(HeadraceError, match="bound to the event loop it first ran on") as info:
            asyncio.run(again())
        assert not isinstance(info.value, BrokerError)
        assert r.xlen(c.model_keys("affine").requests) == sent  # nothing was sent
        with pytest.raises(HeadraceError, match="create one per loop"):
            asyncio.run(c.ping())

        async def imap() -> None:
            async for _ in c.imap("affine", [affine_inputs(3)], progress=False):
                pass

        with pytest.raises(HeadraceError, match="create one per loop"):
            asyncio.run(imap())
        asyncio.run(c.close())  # its loop is closed: no error, no traceback
        gc.collect()
    finally:
        worker.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err


def test_async_client_closes_after_its_loop_died(redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    async def use() -> AsyncClient:
        c = AsyncClient(redis_url, reply_block_ms=200, require_registered=False)
        await c.submit("noworker", text="x")
        return c

    c = asyncio.run(use())  # never closed in its loop
    ticket = c.outstanding()[0]
    asyncio.run(c.close())
    assert ticket.cancelled()
    del c
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err


def _wait_for(cond: Any, timeout_s: float = 5.0) -> bool:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if cond():
            return True
        time.sleep(0.02)
    return False




def test_close_from_a_done_callback_closes_the_client(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # The callback runs in the reader thread, which close() used to join: RuntimeError
    # ("cannot join current thread"), and the connections were left open.
    worker = start_fake_worker(redis_url, "affine", "affine")
    try:
        c = Client(redis_url, reply_block_ms=200, timeout_s=10)
        closed = threading.Event()

        def close_on_result(_t: Any) -> None:
            c.close()
            closed.set()

        ticket = c.submit("affine", affine_inputs(1))
        ticket.add_done_callback(close_on_result)
        assert closed.wait(10), "close() did not return in the callback"
        assert ticket.result(1).ok
        reader = c._io._reader
        assert reader is not None
        reader.join(5)
        assert not reader.is_alive()
        assert not [r for r in caplog.records if "callback" in r.getMessage().lower()], caplog.records
    finally:
        worker.stop()
