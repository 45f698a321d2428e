"""Dead-letter stream operations: list, replay, purge (``headrace dlq ...``).

A dead letter is the original request entry (its protocol fields and at most 64 fields in
all) plus the ``dlq_*`` fields named in :mod:`headrace.workers.pipeline.ops`: reason, code,
its id in the request stream, deliveries, when, and the entry's size in Redis (bytes and
fields; an oversize entry is recorded by its sizes, its payload never copied). These
functions take a synchronous ``redis.Redis``.

A partitioned model (docs/scaling.md section 4; the count comes from its workers' registry
records) has one dead-letter stream per partition: these functions cover all of them, and
a dead letter's ``dlq_id`` then names its partition, ``<p>/<stream id>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.workers.admin.status import served_keys
from headrace.workers.broker import scripts
from headrace.workers.pipeline import ops

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
        entry_bytes / entry_fields: the entry's size in Redis (-1 when not recorded).
        fields: the original request fields kept (without the ``dlq_*`` ones).
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
    entry_bytes: int = -1
    entry_fields: int = -1

    @property
    def complete(self) -> bool:
        """Whether the dead letter kept every field of the entry (only then can it be
        replayed: an oversize entry was recorded by its sizes, its payload never read)."""
        return self.entry_fields < 0 or len(self.fields) >= self.entry_fields

    @classmethod
    def from_entry(cls, dlq_id: Any, raw: Mapping[Any, Any]) -> DeadLetter:
        f = {_b(k): _b(v) for k, v in raw.items()}

        def get(name: bytes) -> str:
            return _s(f.get(name, b""))

        def num(name: bytes, default: int = 0) -> int:
            try:
                return int(get(name)) if len(get(name)) <= 20 else default
            except ValueError:
                return default

        return cls(dlq_id=_s(dlq_id), request_id=get(b"id"), reply_to=get(b"reply_to"), reason=get(ops.DLQ_REASON),
                   code=get(ops.DLQ_CODE), entry_id=get(ops.DLQ_ENTRY_ID), deliveries=num(ops.DLQ_DELIVERIES),
                   ts_ms=num(ops.DLQ_TS_MS), fields={k: v for k, v in f.items() if not k.startswith(ops.DLQ_PREFIX)},
                   entry_bytes=num(ops.DLQ_ENTRY_BYTES, -1), entry_fields=num(ops.DLQ_ENTRY_FIELDS, -1))


def _wrap(what: str, e: Exception) -> E.BrokerError:
    return E.BrokerError(f"{what} failed: {e}")


def dlq_list(redis: Any, namespace: str, model: str, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``model``.

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names.
    """
    out: list[DeadLetter] = []
    try:
        parts = served_keys(redis, namespace, model)
        for p, keys in enumerate(parts):
            entries = redis.xrange(keys.dlq, min="-", max="+", count=max(1, count - len(out)))
            out += [DeadLetter.from_entry(_named(p, len(parts), i), f) for i, f in entries]
            if len(out) >= count:
                break
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001 - redis-py connection errors have several types
        raise _wrap("reading the DLQ", e) from e
    return out


def _named(partition: int, partitions: int, dlq_id: Any) -> str:
    """A dead letter's id as listed: ``<p>/<stream id>`` when the model has partitions."""
    return f"{partition}/{_s(dlq_id)}" if partitions > 1 else _s(dlq_id)


_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _split(dlq_id: str, partitions: int) -> tuple[int, str]:
    """``(partition, stream id)`` of a dead letter's id as :func:`dlq_list` names it.

    Raises:
        ConfigError: not such an id (checked here: Redis would answer a bare "Invalid stream ID").
    """
    head, sep, rest = dlq_id.partition("/")
    p, sid = (int(head), rest) if partitions > 1 and sep and head.isdigit() and int(head) < partitions else (0, dlq_id)
    if not _STREAM_ID.fullmatch(sid):
        form = "<partition>/<ms>-<seq>, e.g. 0/1700000000000-0" if partitions > 1 else "<ms>-<seq>, e.g. 1700000000000-0"
        raise E.ConfigError(f"{dlq_id!r} is not a dead letter id: ids look like {form}, as `headrace dlq list` "
                            f"shows them", field="id")
    return p, sid


def dlq_replay(redis: Any, namespace: str, model: str, ids: Iterable[str] | None = None) -> int:
    """Re-queue dead letters (all, or the given ``dlq_id``s) as new request entries.

    Each one is re-added with its original fields, its request's dedupe marker removed (so
    it can be answered again) and deleted from the DLQ, atomically per entry. Dead letters
    that did not keep every field of their entry (oversize entries, recorded by their sizes)
    are left in the DLQ: they cannot be replayed. A replayed
    request whose ``deadline_ms`` has passed is answered ``expired``. Returns how many were
    re-queued (ids that are gone, e.g. replayed concurrently, are skipped).

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names, or an id that is not a
            dead letter id (nothing is replayed then).
    """
    script = redis.register_script(scripts.source("DLQ_REPLAY"))
    replayed = 0
    try:
        parts = served_keys(redis, namespace, model)
        if ids is None:
            for keys in parts:
                replayed += _replay_all(redis, script, keys)
        else:
            # every id checked before the first replay: a typo in the third leaves none done
            for p, dlq_id in [_split(named, len(parts)) for named in ids]:
                page = redis.xrange(parts[p].dlq, min=dlq_id, max=dlq_id)
                if page:
                    replayed += _replay_one(script, parts[p], DeadLetter.from_entry(page[0][0], page[0][1]))
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _wrap("replaying the DLQ", e) from e
    return replayed


def _replay_all(redis: Any, script: Any, keys: ModelKeys) -> int:
    replayed, cursor = 0, "-"
    while True:
        page = redis.xrange(keys.dlq, min=cursor, max="+", count=_PAGE)
        for dlq_id, raw in page:
            replayed += _replay_one(script, keys, DeadLetter.from_entry(dlq_id, raw))
        if len(page) < _PAGE:
            return replayed
        cursor = f"({_s(page[-1][0])}"


def _replay_one(script: Any, keys: ModelKeys, dl: DeadLetter) -> int:
    if not dl.complete:
        return 0  # its payload was never copied: replaying would send an entry without it
    ks = [keys.dlq, keys.requests]
    if dl.request_id:
        ks.append(keys.done(dl.request_id))
    new_id = script(keys=ks, args=[dl.dlq_id, dl.request_id, ops.DLQ_PREFIX])
    return 1 if new_id else 0


def dlq_purge(redis: Any, namespace: str, model: str) -> int:
    """Delete every dead letter of ``model``; returns how many there were.

    Raises:
        BrokerError: Redis unreachable. ConfigError: invalid names.
    """
    try:
        purge = redis.register_script(scripts.source("DLQ_PURGE"))
        return sum(int(purge(keys=[keys.dlq], args=[])) for keys in served_keys(redis, namespace, model))
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _wrap("purging the DLQ", e) from e
