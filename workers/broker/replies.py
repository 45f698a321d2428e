"""Redis replies as the worker sees them: stream entries in whichever shape redis-py
returns them, the READ/CLAIM scripts' (possibly truncated) entries, cancel marker values,
and which errors are passing server states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from headrace.workers.pipeline.entry import Entry, truncated_entry


def text(value: Any) -> str:
    """A reply value (bytes or str) as str."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def marker_ms(value: Any) -> int:
    """A cancel marker's value (Unix ms as text) as an int; 0 when absent or malformed."""
    try:
        return int(value) if value is not None and len(value) <= 20 else 0
    except (TypeError, ValueError):
        return 0


def pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def stream_entries(resp: Any) -> list[tuple[Any, Any]]:
    """(id, fields) pairs of a one-stream XREADGROUP reply, whichever shape redis-py gives:
    RESP2-style ``[[stream, entries]]``, or RESP3-style ``{stream: entries}`` /
    ``{stream: [entries]}``."""
    if not resp:
        return []
    groups = list(resp.values()) if isinstance(resp, dict) else [item[1] for item in resp]
    out: list[tuple[Any, Any]] = []
    for entries in groups:
        if entries and isinstance(entries[0], list):  # {stream: [entries]}
            entries = [e for sub in entries for e in sub]
        out.extend((e[0], e[1]) for e in entries)
    return out


def flat_fields(fields: Mapping[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = [str(len(fields)).encode()]
    for k, v in fields.items():
        out += [k, v]
    return out


def script_entry(item: Sequence[Any], deliveries: int = 1) -> Entry:
    """An entry as READ / CLAIM return it: ``[id, flat]`` whole, ``[id, flat, size, n]``
    truncated (see ``lua/read.lua``)."""
    entry_id, flat = text(item[0]), pairs(item[1])
    if len(item) >= 4:
        return truncated_entry(entry_id, flat, deliveries, int(item[2]), int(item[3]))
    return Entry(entry_id, flat, deliveries)


def is_transient(err: Exception) -> bool:
    """A server state that passes (out of memory, loading, a failover), not a refusal of
    the ops themselves."""
    return str(err).split(" ", 1)[0].upper() in {"OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN",
                                                  "CLUSTERDOWN", "NOREPLICAS"}


def sized(entry: Entry, max_entry_bytes: int) -> Entry:
    """``entry`` truncated when it is larger than ``max_entry_bytes``."""
    if entry.size_bytes <= max_entry_bytes:
        return entry
    return truncated_entry(entry.entry_id, entry.fields, entry.deliveries, entry.size_bytes, entry.field_count)


def raised_inside_redis_py(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is redis-py's (or asyncio's streams,
    which redis-py writes through) rather than this package's."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and ("/redis/" in last or "/asyncio/" in last)
