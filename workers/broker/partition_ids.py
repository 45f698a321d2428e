"""A partitioned entry's id in the worker, ``<partition>/<stream id>``, and back."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from headrace.workers.pipeline.entry import Entry

SEP = "/"


def wrap(partition: int, entry_id: str) -> str:
    """The id a partitioned entry has in the worker: ``<partition>/<stream id>``."""
    return f"{partition}{SEP}{entry_id}"


def unwrap(entry_id: str) -> tuple[int, str]:
    """``(partition, stream id)`` of a wrapped id; an id without a partition is partition 0's."""
    head, sep, rest = entry_id.partition(SEP)
    return (int(head), rest) if sep and head.isdigit() else (0, entry_id)


def rewrap(partition: int, entry: Entry) -> Entry:
    """``entry`` of partition ``partition`` with its id wrapped."""
    return dataclasses.replace(entry, entry_id=wrap(partition, entry.entry_id))


def by_partition(ids: Sequence[str]) -> dict[int, list[str]]:
    """Wrapped ids as ``{partition: [stream ids]}``."""
    out: dict[int, list[str]] = {}
    for i in ids:
        p, sid = unwrap(i)
        out.setdefault(p, []).append(sid)
    return out
