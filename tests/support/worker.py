"""Helpers for the worker integration tests: produce requests, collect results, run real
worker processes (``python -m headrace.workers --fake ...``)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from headrace.client.keys import ModelKeys
from headrace.client.protocol import Envelope, Request, Result, decode_result, encode_request
from headrace.workers.engine.worker import StreamWorker
from tests.support.polling import poll_until
from tests.support.procs import WorkerProc


def wait_until(cond: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.02) -> Any:
    """Poll ``cond`` until truthy; raise AssertionError after ``timeout_s``."""
    return poll_until(cond, timeout_s, interval_s)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Await until ``cond()`` (polled every 5 ms on the event loop); AssertionError after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < give_up, "condition not met in time"
        await asyncio.sleep(0.005)


async def serve_until(worker: StreamWorker, cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Run ``worker`` (in-process, e.g. on a memory broker) until ``cond()``, then stop it."""
    task = asyncio.ensure_future(worker.run())
    try:
        await wait_for(cond, timeout_s)
    finally:
        await worker.stop()
        await task


def affine_request(rid: str, value: float, reply_to: str, **env: Any) -> dict[bytes, bytes]:
    return encode_request(Request(Envelope(rid, reply_to, **env), inputs={"x": np.full(4, value, np.float32)}))


def produce(r: redis.Redis, keys: ModelKeys, entries: Sequence[dict[bytes, bytes]]) -> list[str]:
    """XADD entries (pipelined, in order); returns their ids."""
    ids: list[str] = []
    for i in range(0, len(entries), 500):
        pipe = r.pipeline(transaction=False)
        for fields in entries[i:i + 500]:
            pipe.xadd(keys.requests, fields)  # type: ignore[arg-type]
        ids += [x.decode() for x in pipe.execute()]
    return ids


class Collector:
    """Reads a reply stream incrementally; keeps every result (duplicates included)."""

    def __init__(self, r: redis.Redis, reply_to: str) -> None:
        self.r, self.reply_to, self.last = r, reply_to, "0-0"
        self.results: list[Result] = []

    def poll(self, block_ms: int = 50) -> int:
        """Read what arrived (waiting up to ``block_ms``; 0 = do not wait); returns the total."""
        resp: Any = self.r.xread({self.reply_to: self.last}, count=5000, block=block_ms if block_ms > 0 else None)
        for _stream, entries in resp or []:
            for eid, fields in entries:
                self.last = eid.decode()
                self.results.append(decode_result(fields))
        return len(self.results)

    def wait_for(self, n: int, timeout_s: float = 30.0) -> list[Result]:
        give_up = time.monotonic() + timeout_s
        while self.poll() < n:
            if time.monotonic() > give_up:
                raise AssertionError(f"{len(self.results)} of {n} results within {timeout_s}s")
        return self.results

    def by_id(self) -> dict[str, list[Result]]:
        out: dict[str, list[Result]] = {}
        for res in self.results:
            out.setdefault(res.request_id, []).append(res)
        return out


@contextmanager
def worker_procs(url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """Yield a factory of worker processes; every one still alive is killed afterwards."""
    procs: list[WorkerProc] = []

    def spawn(*args: str, **kw: Any) -> WorkerProc:
        p = WorkerProc(url, tmp_path / f"worker-{len(procs)}.log", *args, **kw)
        procs.append(p)
        return p

    try:
        yield spawn
    finally:
        for p in procs:
            p.kill()


def consumers(r: redis.Redis, keys: ModelKeys) -> dict[str, dict[str, Any]]:
    try:
        return {c["name"].decode(): c for c in r.xinfo_consumers(keys.requests, keys.group)}
    except redis.ResponseError:
        return {}


def pending_count(r: redis.Redis, keys: ModelKeys) -> int:
    return int(r.xpending(keys.requests, keys.group)["pending"])


def records(path: Path) -> list[str]:
    """Request ids the fake servables ran (HEADRACE_FAKE_RECORD), one per run."""
    return path.read_text().split() if path.exists() else []


__all__ = ["Collector", "WorkerProc", "affine_request", "consumers", "pending_count", "produce", "records",
           "signal", "wait_until", "worker_procs"]


def queued_requests(r: redis.Redis, keys: ModelKeys) -> list[dict[bytes, bytes]]:
    """The fields of every request of ``keys.model`` not yet read by a worker: those in the
    request stream, then those still waiting in the inbox (strict submit mode)."""
    out: list[dict[bytes, bytes]] = [dict(f) for _, f in r.xrange(keys.requests)]  # type: ignore[union-attr]
    for raw in r.lrange(keys.inbox, 0, -1):  # type: ignore[union-attr]
        flat = msgpack.unpackb(raw, raw=True)
        out.append(dict(zip(flat[0::2], flat[1::2], strict=True)))
    return out


def queued(r: redis.Redis, keys: ModelKeys) -> int:
    """How many requests of ``keys.model`` wait in its stream and its inbox together."""
    return int(r.xlen(keys.requests)) + int(r.llen(keys.inbox))  # type: ignore[arg-type]
