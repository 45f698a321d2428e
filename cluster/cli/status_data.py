"""Gathering per-model status for ``headrace status`` and the demo."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from headrace.client.keys import model_keys

log = logging.getLogger(__name__)


def known_models(r: redis.Redis, namespace: str) -> list[str]:
    """Models registered by workers (``<ns>:models``) plus models whose request stream or
    inbox exists without a worker yet (found with SCAN, so a backlog nobody serves still
    shows)."""
    from headrace.client.keys import PARTITION_SEP
    from headrace.workers.admin.status import list_models

    names: set[str] = set()
    names.update(m.model for m in list_models(r, namespace))
    prefix = f"{namespace}:{{"
    for suffix in ("requests", "inbox"):
        for key in r.scan_iter(match=f"{namespace}:{{*}}:{suffix}", count=500):
            k = key.decode() if isinstance(key, bytes) else str(key)
            if k.startswith(prefix) and k.endswith(f"}}:{suffix}"):
                tag = k[len(prefix):-len(f"}}:{suffix}")]
                model, sep, part = tag.rpartition(PARTITION_SEP)
                names.add(model if sep and part.isdigit() else tag)  # a partition's key: its model
    return sorted(names)


def collect_status(r: redis.Redis, namespace: str, models: Sequence[str], window_s: float) -> list[tuple[str, Any]]:
    """``(model, ModelStatus)`` for ``models`` (all known models when empty).

    Raises:
        BrokerError: Redis is unreachable.
        ConfigError: an invalid model name.
    """
    from headrace.client import errors as E
    from headrace.workers.admin.status import model_status

    try:
        names = list(models) or known_models(r, namespace)
        out = []
        for m in names:
            model_keys(m, namespace)  # validates the name before it becomes a key
            out.append((m, model_status(r, namespace, m, window_s=window_s)))
        return out
    except redis.RedisError as e:
        raise E.BrokerError(f"reading status from Redis failed: {e}") from e


def served_versions(r: redis.Redis, namespace: str) -> dict[tuple[str, int], str]:
    """``{(model, pid): version}`` of every live worker in the registry: what each Ray
    replica (one worker per replica process) really serves. Empty if Redis cannot be read."""
    from headrace.client import errors as E
    from headrace.client.registry import read_registry

    try:
        records, now = read_registry(r, namespace)
    except E.BrokerError as e:
        log.warning("registry unreadable: %s", e)
        return {}
    return {(name, w.pid): w.version for name, rec in records.items() for w in rec.live_workers(now) if w.pid}
