"""Dead-letter stream operations: list, replay, purge (``headrace dlq ...``).

A dead letter is the original request entry plus ``dlq_reason``, ``dlq_code``,
``dlq_entry_id`` (its id in the request stream), ``dlq_deliveries`` and ``dlq_ts_ms``. These
functions take a synchronous ``redis.Redis``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.broker import scripts

_PAGE = 500


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


@dataclass(frozen=True)
class DeadLetter:
    """One entry of ``<ns>:{<model>}:dlq``.

    Attributes:
        dlq_id: its id in the dead-letter stream (pass to :func:`dlq_replay`).
        request_id / reply_to: from the original entry ("" when it had none).
        reason / code: why it was dead-lettered; ``code`` is a wire error code.
        entry_id: its id in the request stream when it was dead-lettered.
        deliveries: deliveries it had by then.
        ts_ms: when it was dead-lettered (Unix ms).
        fields: the original request fields (without the ``dlq_*`` ones).
    """

    dlq_id: str
    request_id: str
    reply_to: str
    reason: str
    code: str
    entry_id: str
    deliveries: int
    ts_ms: int
    fields: Mapping[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, dlq_id: Any, raw: Mapping[Any, Any]) -> DeadLetter:
        f = {_b(k): _b(v) for k, v in raw.items()}

        def get(name: str) -> str:
            return _s(f.get(name.encode(), b""))

        def num(name: str) -> int:
            try:
                return int(get(name) or 0)
            except ValueError:
                return 0

        return cls(dlq_id=_s(dlq_id), request_id=get("id"), reply_to=get("reply_to"), reason=get("dlq_reason"),
                   code=get("dlq_code"), entry_id=get("dlq_entry_id"), deliveries=num("dlq_deliveries"),
                   ts_ms=num("dlq_ts_ms"), fields={k: v for k, v in f.items() if not k.startswith(b"dlq_")})


def _wrap(what: str, e: Exception) -> E.BrokerError:
    return E.BrokerError(f"{what} failed: {e}")


def dlq_list(redis: Any, namespace: str, model: str, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``model``.

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names.
    """
    keys = ModelKeys(namespace, model)
    try:
        entries = redis.xrange(keys.dlq, min="-", max="+", count=max(1, count))
    except Exception as e:  # noqa: BLE001 - redis-py connection errors have several types
        raise _wrap("reading the DLQ", e) from e
    return [DeadLetter.from_entry(i, f) for i, f in entries]


def dlq_replay(redis: Any, namespace: str, model: str, ids: Iterable[str] | None = None) -> int:
    """Re-queue dead letters (all, or the given ``dlq_id``s) as new request entries.

    Each one is re-added with its original fields, its request's dedupe marker removed (so
    it can be answered again) and deleted from the DLQ, atomically per entry. A replayed
    request whose ``deadline_ms`` has passed is answered ``expired``. Returns how many were
    re-queued (ids that are gone, e.g. replayed concurrently, are skipped).

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names.
    """
    keys = ModelKeys(namespace, model)
    script = redis.register_script(scripts.DLQ_REPLAY)
    replayed = 0
    try:
        if ids is None:
            cursor = "-"
            while True:
                page = redis.xrange(keys.dlq, min=cursor, max="+", count=_PAGE)
                for dlq_id, raw in page:
                    replayed += _replay_one(script, keys, DeadLetter.from_entry(dlq_id, raw))
                if len(page) < _PAGE:
                    break
                cursor = f"({_s(page[-1][0])}"
        else:
            for dlq_id in ids:
                page = redis.xrange(keys.dlq, min=dlq_id, max=dlq_id)
                if page:
                    replayed += _replay_one(script, keys, DeadLetter.from_entry(page[0][0], page[0][1]))
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _wrap("replaying the DLQ", e) from e
    return replayed


def _replay_one(script: Any, keys: ModelKeys, dl: DeadLetter) -> int:
    ks = [keys.dlq, keys.requests]
    if dl.request_id:
        ks.append(keys.done(dl.request_id))
    new_id = script(keys=ks, args=[dl.dlq_id, dl.request_id])
    return 1 if new_id else 0


def dlq_purge(redis: Any, namespace: str, model: str) -> int:
    """Delete every dead letter of ``model``; returns how many there were.

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names.
    """
    keys = ModelKeys(namespace, model)
    try:
        return int(redis.register_script(scripts.DLQ_PURGE)(keys=[keys.dlq], args=[]))
    except Exception as e:  # noqa: BLE001
        raise _wrap("purging the DLQ", e) from e
