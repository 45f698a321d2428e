"""The one reading of a consumer group's backlog from ``XINFO GROUPS`` (used by the broker,
``headrace status`` and the autoscaling policy; ``client/submit.lua`` applies the same rule).

Unread and pending entries are all still in the stream, so ``lag <= XLEN - pending``. Redis
reports ``lag`` as nil when it cannot know it (entries deleted between the group's last
delivered id and the tail), and Redis 7.0 keeps reporting a stale, too large ``lag`` for good
after an AOF rewrite and a restart; either way the stream length bounds it. That bound is
loose while acknowledged entries wait to be trimmed, so the stream's last entry id (when
given) settles the common case exactly: at or before the group's last delivered id,
nothing is unread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from headrace.workers.broker.replies import text


def samples_per_entry(raw: Any) -> float:
    """The ``samples_per_entry`` a model's workers publish in its limits hash, as a number
    >= 1 (absent, unreadable, non-finite or below 1: 1.0). Backlog in samples = entries x this."""
    try:
        value = float(raw) if raw is not None else 1.0
    except (TypeError, ValueError):
        return 1.0
    return value if math.isfinite(value) and value >= 1.0 else 1.0


@dataclass(frozen=True)
class Backlog:
    """Undelivered (``lag``) and delivered-but-unacknowledged (``pending``) entries."""

    lag: int
    pending: int

    @property
    def total(self) -> int:
        return self.lag + self.pending


def stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id (``"<ms>-<seq>"``, str or bytes) as a comparable pair."""
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)


def last_entry_id(xrevrange_reply: Any) -> str | None:
    """The id from an ``XREVRANGE <stream> + - COUNT 1`` reply (None: empty stream)."""
    return text(xrevrange_reply[0][0]) if xrevrange_reply else None


def _row(groups: Iterable[Mapping[Any, Any]], group: str) -> Mapping[Any, Any] | None:
    return next((g for g in groups if text(g.get("name", b"")) == group), None)


def _nothing_unread(row: Mapping[Any, Any], last_id: str | None) -> bool:
    """The stream's last entry is at or before the group's last delivered id."""
    delivered = row.get("last-delivered-id")
    return last_id is not None and delivered is not None and stream_id(last_id) <= stream_id(delivered)


def stale_lag(groups: Iterable[Mapping[Any, Any]], group: str, last_id: str | None) -> bool:
    """Whether ``group`` reports unread entries (or an unknown lag) although nothing in the
    stream comes after its last delivered id: the stale lag a worker repairs (scripts
    ``REPAIR_LAG``)."""
    row = _row(groups, group)
    if row is None or not _nothing_unread(row, last_id):
        return False
    lag = row.get("lag")
    return lag is None or int(lag) > 0


def group_backlog(groups: Iterable[Mapping[Any, Any]], group: str, stream_length: int,
                  last_id: str | None = None) -> Backlog:
    """``Backlog`` of ``group`` from the rows of ``XINFO GROUPS``, ``XLEN`` and, optionally,
    the stream's last entry id (``XREVRANGE <stream> + - COUNT 1``, see module doc).

    A group that does not exist yet has every entry unread: producers never create it, and
    the first worker creates it at id 0 and reads them all.
    """
    row = _row(groups, group)
    if row is None:
        return Backlog(max(0, int(stream_length)), 0)
    pending = int(row.get("pending") or 0)
    # Nothing after the group's last delivered id: no entry is unread, whatever lag says.
    bound = 0 if _nothing_unread(row, last_id) else max(0, int(stream_length) - pending)
    lag = row.get("lag")
    return Backlog(bound if lag is None else min(int(lag), bound), pending)
