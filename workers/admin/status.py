"""Read-side status of served models: what ``headrace status`` shows.

Workers write one line per committed batch to ``<ns>:{<model>}:stats`` (a stream capped at
about 2000 lines; see :class:`headrace.workers.pipeline.stats.BatchStats`) and heartbeat into the ``<ns>:models`` hash.
This module turns those, plus ``XINFO`` on the request stream, into typed snapshots. It
takes a synchronous ``redis.Redis`` created with ``decode_responses=False`` (the default):
the latency field is msgpack, which a decoding client cannot read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from headrace.client import errors as E
from headrace.client.config import DEFAULT_GROUP
from headrace.client.keys import ModelKeys, partition_keys
from headrace.client.registry import ModelRecord, read_registry
from headrace.workers.broker.backlog import group_backlog, last_entry_id, samples_per_entry
from headrace.workers.broker.replies import text


def _field(fields: Any, name: str) -> Any:
    v = fields.get(name.encode())
    return fields.get(name) if v is None else v


@dataclass(frozen=True)
class ConsumerInfo:
    """One consumer of the group: entries it owns (``pending``) and ms since it last acted."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True)
class ModelStatus:
    """A model's queue and recent performance.

    Attributes:
        stream_length: entries in the request stream (acked ones until trimmed).
        lag: entries not yet delivered to the group, the requests still in the model's
            inbox (strict submit mode) included.
        pending: delivered but not yet acknowledged.
        consumers: the group's consumers.
        dead_letters: entries in the dead-letter stream.
        throughput_rps: requests answered per second over the last ``window_s``.
        p50_ms / p99_ms: submit-to-result latency over the window (None without data).
        workers: names of workers whose heartbeat is recent.
        answered / failed: requests answered (any status) / not ok within the window.
        samples_per_entry: samples an entry carried lately, as the workers publish it (1.0
            until a worker has): ``lag`` and ``pending`` times this is the backlog in samples.
    """

    model: str
    stream_length: int
    lag: int
    pending: int
    consumers: tuple[ConsumerInfo, ...]
    dead_letters: int
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    workers: tuple[str, ...]
    window_s: float
    answered: int = 0
    failed: int = 0
    version: str = ""
    samples_per_entry: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_models(redis: Any, namespace: str) -> list[ModelRecord]:
    """Models registered by workers in ``<ns>:models``, sorted by name.

    Raises:
        BrokerError: Redis unreachable.
    """
    records, _now = read_registry(redis, namespace)
    return [records[name] for name in sorted(records)]


def served_keys(redis: Any, namespace: str, model: str, group: str = DEFAULT_GROUP) -> list[ModelKeys]:
    """The key sets of ``model``: one per partition its workers report in the registry
    (``partitions``, the largest any worker reports), else the unpartitioned one.

    Raises:
        BrokerError: the registry cannot be read. ConfigError: invalid names.
    """
    ModelKeys(namespace, model, group)  # checks the names
    record = read_registry(redis, namespace)[0].get(model)
    return _keys_of(record, namespace, model, group)


def _keys_of(record: ModelRecord | None, namespace: str, model: str, group: str) -> list[ModelKeys]:
    partitions = max((w.partitions for w in record.workers.values()), default=1) if record else 1
    return partition_keys(namespace, model, partitions, group)


def _queue(redis: Any, keys: ModelKeys, group: str) -> tuple[int, int, int, list[ConsumerInfo]]:
    """``(stream length, lag, pending, consumers)`` of one request stream (zeros when it
    or its group does not exist yet)."""
    import redis as redis_mod

    length = int(redis.xlen(keys.requests))
    try:
        backlog = group_backlog(redis.xinfo_groups(keys.requests), group, length,
                                last_entry_id(redis.xrevrange(keys.requests, "+", "-", count=1)))
    except redis_mod.ResponseError:
        return length, 0, 0, []  # no stream yet: nothing queued
    try:
        consumers = [ConsumerInfo(text(c["name"]), int(c.get("pending") or 0), int(c.get("idle") or 0))
                     for c in redis.xinfo_consumers(keys.requests, group)]
    except redis_mod.ResponseError:
        consumers = []  # no group yet (no worker created it): every entry is unread
    return length, backlog.lag, backlog.pending, consumers


def _merged(consumers: list[ConsumerInfo]) -> tuple[ConsumerInfo, ...]:
    """One row per consumer over a model's partitions: entries owned added up, the least idle."""
    out: dict[str, ConsumerInfo] = {}
    for c in consumers:
        seen = out.get(c.name)
        out[c.name] = c if seen is None else ConsumerInfo(c.name, seen.pending + c.pending, min(seen.idle_ms, c.idle_ms))
    return tuple(out.values())


def model_status(redis: Any, namespace: str, model: str, window_s: float = 60.0,
                 group: str = DEFAULT_GROUP) -> ModelStatus:
    """Snapshot of one model's queue and its last ``window_s`` seconds of work. A model whose
    workers report ``partitions`` > 1 is read partition by partition and added up.

    Raises:
        BrokerError: Redis unreachable.
        ConfigError: invalid namespace or model name.
    """
    import redis as redis_mod

    ModelKeys(namespace, model, group)  # checks the names
    try:
        records, now = read_registry(redis, namespace)
        record = records.get(model)
        parts = _keys_of(record, namespace, model, group)
        stream_length = lag = pending = dead = 0
        consumers: list[ConsumerInfo] = []
        for keys in parts:
            length, p_lag, p_pending, p_consumers = _queue(redis, keys, group)
            # requests waiting in the inbox are queued too: the relay moves them in a moment later
            p_lag += int(redis.llen(keys.inbox))
            stream_length, lag, pending = stream_length + length, lag + p_lag, pending + p_pending
            consumers += p_consumers
            dead += int(redis.xlen(keys.dlq))
        # batch statistics: a partitioned model's workers write them to partition 0's stream
        lines = redis.xrange(parts[0].stats, min=f"{max(0, now - int(window_s * 1000))}-0", max="+")
        per_entry = samples_per_entry(redis.hget(parts[0].limits, "samples_per_entry"))
    except redis_mod.RedisError as e:
        raise E.BrokerError(f"cannot read the status of {model!r}: {e}") from e
    answered = failed = 0
    lat: list[float] = []
    for _id, f in lines:
        answered += int(_field(f, "ok") or 0) + int(_field(f, "failed") or 0)
        failed += int(_field(f, "failed") or 0)
        raw = _field(f, "lat_ms")
        if raw:
            try:
                lat += [float(x) for x in msgpack.unpackb(raw if isinstance(raw, bytes) else raw.encode("latin-1"))]
            except (ValueError, TypeError, msgpack.UnpackException):
                pass
    live = record.live_workers(now) if record else ()
    p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat else (None, None)
    return ModelStatus(model=model, stream_length=stream_length, lag=lag, pending=pending,
                       consumers=_merged(consumers), dead_letters=dead, throughput_rps=answered / window_s if window_s > 0 else 0.0,
                       p50_ms=p50, p99_ms=p99, workers=tuple(w.consumer for w in live),
                       window_s=window_s, answered=answered, failed=failed,
                       version=", ".join(record.versions(now)) if record else "", samples_per_entry=per_entry)


