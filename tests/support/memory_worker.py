"""Shared pieces of the in-memory worker tests (tests/unit/test_worker_memory_*.py and
test_worker_relay.py): worker settings, affine request fields, an event-loop wait, running
workers for the length of a block, and results grouped by request id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryStore

REPLY = "headrace:{affine}:reply:t"


def settings(**kw: Any) -> WorkerSettings:
    base: dict[str, Any] = dict(model="affine", max_batch=8, max_wait_ms=1, block_ms=5, lease_s=0.3,
                                max_deliveries=3, drain_timeout_s=5, trim_interval_s=0.05)
    base.update(kw)
    return WorkerSettings(**base)


def affine_fields(rid: str, value: float = 1.0, **env: Any) -> dict[bytes, bytes]:
    x = np.full(4, value, dtype=np.float32)
    return encode_request(Request(Envelope(rid, env.pop("reply_to", REPLY), **env), inputs={"x": x}))


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(*workers: StreamWorker) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(w.run()) for w in workers]
    try:
        yield
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks)


def by_id(store: MemoryStore, reply: str = REPLY) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in store.results(reply):
        out.setdefault(r.request_id, []).append(r)
    return out
