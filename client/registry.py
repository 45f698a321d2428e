"""The model registry: which workers serve which model, which versions, with what signature.

Workers heartbeat into one Redis hash, ``<ns>:models`` (:func:`headrace.client.keys.registry_key`),
one field per model; the value is JSON written only by the worker's ``REGISTER`` script:

.. code-block:: json

    {
      "model": "minilm",
      "updated_ms": 1764530000000,
      "workers": {
        "host-123-ab12": {"seen_ms": 1764530000000, "version": "2", "backend": "onnx",
                          "max_batch": 32, "preferred_batch": 0, "max_wait_ms": 5.0,
                          "host": "host", "pid": 123, "lag": 0, "pending": 3,
                          "p50_ms": 12.5, "p99_ms": 40.1}
      },
      "signatures": {"2": {"seen_ms": 1764530000000, "describe": "<servable description, JSON text>"}}
    }

Times are Redis server milliseconds (``TIME`` inside the script), so liveness never depends
on the clocks of the machines that run workers or readers: compare with :func:`server_ms`.
A model field exists once any worker has registered it, and stays when its workers leave
(``workers`` then empty): "never registered" and "no live worker now" are told apart.

This module is the one reader of that format (sans-IO decoding plus thin sync/async reads);
producers in other languages read it with ``HGET <ns>:models <model>`` (docs/protocol.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from headrace.client.failures import broker_error
from headrace.client.keys import registry_key
from headrace.client.sharding import is_cluster

ALIVE_MS = 30_000
"""A worker whose last heartbeat is older than this (ms, server time) is not serving."""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _int(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _float(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


@dataclass(frozen=True)
class WorkerRecord:
    """One worker of a model, as of its last heartbeat.

    Attributes:
        consumer: the worker's consumer name in the model's group.
        seen_ms: its last heartbeat, Redis server time (Unix ms).
        version: the repository version it really serves.
        backend: servable backend (``onnx``, ``torch``, ``fake``, ...).
        max_batch / preferred_batch / max_wait_ms: its live batching limits.
        lag / pending: the model's backlog as this worker last read it (entries not yet
            delivered to the group / delivered and not acknowledged).
        p50_ms / p99_ms: submit-to-result latency of the requests it answered lately
            (milliseconds; 0 when it answered none).
        partitions: the request streams it reads (``WorkerSettings.partitions``; 1 when it
            does not say).
    """

    consumer: str
    seen_ms: int
    version: str = ""
    backend: str = ""
    max_batch: int = 0
    preferred_batch: int = 0
    max_wait_ms: float = 0.0
    host: str = ""
    pid: int = 0
    lag: int = 0
    pending: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    partitions: int = 1

    @classmethod
    def decode(cls, consumer: str, raw: Any) -> WorkerRecord | None:
        if not isinstance(raw, Mapping):
            return None
        return cls(consumer=consumer, seen_ms=_int(raw.get("seen_ms")), version=str(raw.get("version") or ""),
                   backend=str(raw.get("backend") or ""), max_batch=_int(raw.get("max_batch")),
                   preferred_batch=_int(raw.get("preferred_batch")), max_wait_ms=_float(raw.get("max_wait_ms")),
                   host=str(raw.get("host") or ""), pid=_int(raw.get("pid")), lag=_int(raw.get("lag")),
                   pending=_int(raw.get("pending")), p50_ms=_float(raw.get("p50_ms")),
                   p99_ms=_float(raw.get("p99_ms")), partitions=max(1, _int(raw.get("partitions"))))

    def alive(self, now_ms: int, alive_ms: int = ALIVE_MS) -> bool:
        return now_ms - self.seen_ms <= alive_ms


@dataclass(frozen=True)
class ModelRecord:
    """A model's registry entry: its workers and the signature of each version they served.

    Attributes:
        model: model name.
        updated_ms: last write, Redis server time (Unix ms).
        workers: consumer name -> :class:`WorkerRecord` (stale ones pruned at each write).
        signatures: version -> servable description (``Servable.describe()``: inputs,
            outputs, text or tensors, batching), for the versions workers served lately.
    """

    model: str
    updated_ms: int = 0
    workers: Mapping[str, WorkerRecord] = field(default_factory=dict)
    signatures: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def live_workers(self, now_ms: int, alive_ms: int = ALIVE_MS) -> tuple[WorkerRecord, ...]:
        """Workers whose heartbeat is at most ``alive_ms`` old at ``now_ms`` (server ms)."""
        return tuple(sorted((w for w in self.workers.values() if w.alive(now_ms, alive_ms)),
                            key=lambda w: w.consumer))

    def versions(self, now_ms: int, alive_ms: int = ALIVE_MS) -> tuple[str, ...]:
        """Versions served by live workers, newest first when numeric."""
        return _sorted_versions({w.version for w in self.live_workers(now_ms, alive_ms) if w.version})

    def signature(self, version: str | None = None) -> Mapping[str, Any] | None:
        """The description of ``version`` (default: the newest version known)."""
        if version is not None:
            return self.signatures.get(version)
        known = _sorted_versions(set(self.signatures))
        return self.signatures[known[0]] if known else None


def _sorted_versions(versions: set[str]) -> tuple[str, ...]:
    return tuple(sorted(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v), reverse=True))


def decode_record(model: str, raw: Any) -> ModelRecord | None:
    """A :class:`ModelRecord` from one registry hash value; None when absent or unreadable."""
    if raw is None:
        return None
    try:
        info = json.loads(_text(raw))
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    workers_raw = info.get("workers")
    workers_raw = workers_raw if isinstance(workers_raw, dict) else {}
    workers = {str(k): w for k, v in workers_raw.items() if (w := WorkerRecord.decode(str(k), v)) is not None}
    signatures: dict[str, Mapping[str, Any]] = {}
    sig_raw = info.get("signatures")
    sig_raw = sig_raw if isinstance(sig_raw, dict) else {}
    for version, entry in sig_raw.items():
        try:
            described = json.loads(entry["describe"]) if isinstance(entry, dict) else None
        except (KeyError, TypeError, ValueError):
            described = None
        if isinstance(described, dict):
            signatures[str(version)] = described
    return ModelRecord(model=model, updated_ms=_int(info.get("updated_ms")), workers=workers, signatures=signatures)


def decode_registry(raw: Mapping[Any, Any]) -> dict[str, ModelRecord]:
    """Every readable model of a ``HGETALL <ns>:models`` reply, by name."""
    out = {}
    for k, v in raw.items():
        rec = decode_record(_text(k), v)
        if rec is not None:
            out[rec.model] = rec
    return out


def server_ms(time_reply: Any) -> int:
    """Redis ``TIME`` reply ``(seconds, microseconds)`` as Unix milliseconds."""
    sec, usec = time_reply
    return int(sec) * 1000 + int(usec) // 1000


def read_model(redis: Any, namespace: str, model: str) -> tuple[ModelRecord | None, int]:
    """``(record or None, Redis server time in ms)`` with a synchronous redis-py client.

    Raises:
        BrokerError: Redis unreachable or refused the read.
    """
    try:
        if is_cluster(redis):  # a cluster pipeline refuses TIME: ask the registry's node
            key = registry_key(namespace)
            raw, now = redis.hget(key, model), redis.time(target_nodes=redis.get_node_from_key(key))
        else:
            pipe = redis.pipeline(transaction=False)
            pipe.hget(registry_key(namespace), model)
            pipe.time()
            raw, now = pipe.execute()
    except Exception as e:  # noqa: BLE001 - redis-py raises several connection error types
        raise broker_error(e, "reading the model registry") from e
    return decode_record(model, raw), server_ms(now)


async def aread_model(redis: Any, namespace: str, model: str) -> tuple[ModelRecord | None, int]:
    """:func:`read_model` with a ``redis.asyncio`` client.

    Raises:
        BrokerError: Redis unreachable or refused the read.
    """
    try:
        if is_cluster(redis):  # a cluster pipeline refuses TIME: ask the registry's node
            key = registry_key(namespace)
            raw = await redis.hget(key, model)
            now = await redis.time(target_nodes=redis.get_node_from_key(key))
        else:
            pipe = redis.pipeline(transaction=False)
            pipe.hget(registry_key(namespace), model)
            pipe.time()
            raw, now = await pipe.execute()
    except Exception as e:  # noqa: BLE001 - redis-py raises several connection error types
        raise broker_error(e, "reading the model registry") from e
    return decode_record(model, raw), server_ms(now)


def read_registry(redis: Any, namespace: str) -> tuple[dict[str, ModelRecord], int]:
    """``(every model by name, Redis server time in ms)`` with a synchronous client.

    Raises:
        BrokerError: Redis unreachable or refused the read.
    """
    try:
        if is_cluster(redis):  # a cluster pipeline refuses TIME: ask the registry's node
            key = registry_key(namespace)
            raw, now = redis.hgetall(key), redis.time(target_nodes=redis.get_node_from_key(key))
        else:
            pipe = redis.pipeline(transaction=False)
            pipe.hgetall(registry_key(namespace))
            pipe.time()
            raw, now = pipe.execute()
    except Exception as e:  # noqa: BLE001 - redis-py raises several connection error types
        raise broker_error(e, "reading the model registry") from e
    return decode_registry(raw), server_ms(now)
