"""The one reading of a consumer group's backlog from ``XINFO GROUPS`` (used by the broker,
``headrace status`` and the autoscaling policy; ``client/submit.lua`` applies the same rule).

Unread and pending entries are all still in the stream, so ``lag <= XLEN - pending``. Redis
reports ``lag`` as nil when it cannot know it (entries deleted between the group's last
delivered id and the tail), and Redis 7.0 keeps reporting a stale, too large ``lag`` for good
after an AOF rewrite and a restart; either way the stream length bounds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backlog:
    """Undelivered (``lag``) and delivered-but-unacknowledged (``pending``) entries."""

    lag: int
    pending: int

    @property
    def total(self) -> int:
        return self.lag + self.pending


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def group_backlog(groups: Iterable[Mapping[Any, Any]], group: str, stream_length: int) -> Backlog:
    """``Backlog`` of ``group`` from the rows of ``XINFO GROUPS`` and ``XLEN``.

    A group that does not exist (yet) has no backlog.
    """
    for g in groups:
        if _s(g.get("name", b"")) != group:
            continue
        pending = int(g.get("pending") or 0)
        bound = max(0, int(stream_length) - pending)
        lag = g.get("lag")
        return Backlog(bound if lag is None else min(int(lag), bound), pending)
    return Backlog(0, 0)
