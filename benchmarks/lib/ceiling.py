"""The bare Redis Streams ceiling for a zero-cost model: what Redis and the least Python allow.

Three processes and nothing else, on the Redis the compared system uses:

* **producer**: pipelined ``XADD`` of request entries (chunks of ``pipeline`` entries per
  round trip), keeping at most ``in_flight`` samples outstanding (sent, not yet read back);
* **consumer**: ``XREADGROUP COUNT <count>`` in a consumer group, per entry the zero-cost
  work of the ``affine`` fake (unpack the msgpack body, ``y = 2x + 1`` with numpy, pack a
  result body), then one pipeline: an ``XADD`` of each result to the reply stream and one
  ``XACK`` for all entries of the read;
* **reader**: ``XREAD`` on the reply stream, unpacking each result and counting its samples.

The payloads are headrace's own bytes: request fields from
:func:`headrace.client.protocol.encode_request` (``x`` float32 ``[4]`` for one sample per
entry, ``[N, 4]`` for N samples, the leading batch dimension of multi-sample entries) and
result bodies of the same layout as :func:`~headrace.client.protocol.encode_result`.

Samples/s are counted by the reader over a window after a warm-up; each process' CPU
(and Redis' ``used_cpu_*``) over the window gives CPU microseconds per sample.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from benchmarks.lib.systems import process_cpu_s

GROUP = "ceiling"


@dataclass(frozen=True)
class CeilingConfig:
    """One ceiling run.

    Attributes:
        samples_per_entry: samples in each request entry (1 = today's protocol).
        in_flight: most samples outstanding (producer back-pressure).
        pipeline: entries per producer round trip.
        count: entries per ``XREADGROUP`` / ``XREAD``.
        warmup_s / duration_s: load before the window, and the window.
    """

    samples_per_entry: int = 1
    in_flight: int = 4096
    pipeline: int = 64
    count: int = 256
    warmup_s: float = 2.0
    duration_s: float = 8.0


def request_pool(samples_per_entry: int, reply_to: str, n: int = 64, seed: int = 0) -> list[dict[bytes, bytes]]:
    """``n`` request entries as headrace encodes them (``affine`` inputs, float32)."""
    from headrace.client.protocol import Envelope, Request, encode_request

    rng = np.random.default_rng(seed)
    shape = (4,) if samples_per_entry == 1 else (samples_per_entry, 4)
    return [encode_request(Request(Envelope(os.urandom(16).hex(), reply_to, model="affine"),
                                   inputs={"x": rng.standard_normal(shape).astype(np.float32)}))
            for _ in range(n)]


def result_fields(request_id: bytes, y: np.ndarray[Any, Any]) -> dict[bytes, bytes]:
    """A result entry of :func:`~headrace.client.protocol.encode_result`'s layout."""
    body = {"outputs": {"y": {"dtype": "float32", "shape": list(y.shape), "data": y.tobytes()}},
            "timings": {"queue_ms": 0.0, "infer_ms": 0.0, "batch_size": 1, "worker": "ceiling"},
            "model": "affine", "version": "1"}
    return {b"v": b"1", b"id": request_id, b"status": b"ok", b"code": b"", b"message": b"",
            b"body": msgpack.packb(body, use_bin_type=True)}


def _consume(url: str, req: str, rep: str, count: int, stop: Any) -> None:
    import redis

    r: Any = redis.Redis.from_url(url)  # untyped use: redis-py's stream reply types are unions
    while not stop.is_set():
        resp = r.xreadgroup(GROUP, "c", {req: ">"}, count=count, block=100)
        if not resp:
            continue
        entries = resp[0][1]
        pipe = r.pipeline(transaction=False)
        for _entry_id, fields in entries:
            t = msgpack.unpackb(fields[b"body"], raw=False)["inputs"]["x"]
            x = np.frombuffer(t["data"], dtype="<f4").reshape(t["shape"])
            pipe.xadd(rep, result_fields(fields[b"id"], x * np.float32(2) + np.float32(1)))
        pipe.xack(req, GROUP, *[e[0] for e in entries])
        pipe.execute()
    r.close()


def _read(url: str, rep: str, count: int, received: Any, stop: Any) -> None:
    import redis

    r: Any = redis.Redis.from_url(url)  # untyped use: redis-py's stream reply types are unions
    last = b"0-0"
    while not stop.is_set():
        resp = r.xread({rep: last}, count=count, block=100)
        if not resp:
            continue
        n = 0
        for entry_id, fields in resp[0][1]:
            last = entry_id
            shape = msgpack.unpackb(fields[b"body"], raw=False)["outputs"]["y"]["shape"]
            n += shape[0] if len(shape) > 1 else 1
        received.value += n
    r.close()


def _produce(url: str, req: str, pool: list[dict[bytes, bytes]], cfg: CeilingConfig, received: Any,
             sent: Any, stop: Any) -> None:
    import redis

    r: Any = redis.Redis.from_url(url)  # untyped use: redis-py's stream reply types are unions
    k = cfg.samples_per_entry
    i = 0
    while not stop.is_set():
        room = (cfg.in_flight - (sent.value - received.value)) // k
        if room <= 0:
            time.sleep(0.0002)
            continue
        pipe = r.pipeline(transaction=False)
        n = min(room, cfg.pipeline)
        for _ in range(n):
            pipe.xadd(req, pool[i % len(pool)])
            i += 1
        pipe.execute()
        sent.value += n * k
    r.close()


def _redis_cpu_s(r: Any) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def bare_ceiling(url: str, cfg: CeilingConfig) -> dict[str, Any]:
    """Run the three processes (see module doc) and measure; returns ``{"samples_per_entry",
    "samples_per_s", "entries_per_s", "cpu_us_per_sample": {producer, consumer, reader,
    redis, total}, "window_s"}``.

    Raises:
        RuntimeError: a process died, or nothing came back in the window.
    """
    import redis

    ctx = mp.get_context("spawn")
    prefix = f"ceiling-{uuid.uuid4().hex[:6]}"
    req, rep = f"{prefix}:{{m}}:requests", f"{prefix}:{{m}}:reply"
    r: Any = redis.Redis.from_url(url)  # untyped use: redis-py's stream reply types are unions
    r.xgroup_create(req, GROUP, id="0", mkstream=True)
    received, sent = ctx.RawValue("q", 0), ctx.RawValue("q", 0)
    stop = ctx.Event()
    pool = request_pool(cfg.samples_per_entry, rep)
    procs = {"consumer": ctx.Process(target=_consume, args=(url, req, rep, cfg.count, stop), daemon=True),
             "reader": ctx.Process(target=_read, args=(url, rep, 4 * cfg.count, received, stop), daemon=True),
             "producer": ctx.Process(target=_produce, args=(url, req, pool, cfg, received, sent, stop),
                                     daemon=True)}
    try:
        for p in procs.values():
            p.start()
        time.sleep(cfg.warmup_s)
        cpu0 = {name: process_cpu_s(p.pid or 0) for name, p in procs.items()}
        rc0, n0, t0 = _redis_cpu_s(r), received.value, time.perf_counter()
        time.sleep(cfg.duration_s)
        n1, t1, rc1 = received.value, time.perf_counter(), _redis_cpu_s(r)
        cpu = {name: process_cpu_s(p.pid or 0) - cpu0[name] for name, p in procs.items()}
        dead = [name for name, p in procs.items() if not p.is_alive()]
    finally:
        stop.set()
        for p in procs.values():
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        r.delete(req, rep)
        r.close()
    if dead:
        raise RuntimeError(f"bare ceiling: {dead} exited during the run")
    samples = n1 - n0
    if samples <= 0:
        raise RuntimeError("bare ceiling: no sample came back in the window")
    cpu["redis"] = rc1 - rc0
    per = {k: v * 1e6 / samples for k, v in cpu.items()}
    per["total"] = sum(per.values())
    return {"samples_per_entry": cfg.samples_per_entry, "samples_per_s": samples / (t1 - t0),
            "entries_per_s": samples / cfg.samples_per_entry / (t1 - t0), "cpu_us_per_sample": per,
            "window_s": t1 - t0}
