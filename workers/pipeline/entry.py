"""A request entry as a worker receives it, and safe readings of its fields.

Producers control every byte of an entry: any number of fields of any size, numeric fields
of any length or format. The helpers here never raise on such input, and never build
anything larger than the entry's routing fields from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from headrace.client import errors as E
from headrace.client.protocol import Envelope, decode_envelope

#: the entry fields of wire protocol v1 other than ``body``: what routes an answer.
ROUTING_FIELDS: Final = (b"v", b"id", b"reply_to", b"deadline_ms", b"ts_ms", b"model")
#: the entry fields of wire protocol v1.
PROTOCOL_FIELDS: Final = (*ROUTING_FIELDS, b"body")
#: longest routing field kept from an oversize entry (bytes); longer ones are dropped.
ROUTING_FIELD_MAX_BYTES: Final = 1024
#: entries may exceed ``max_payload_bytes`` by this much (their routing fields) before
#: they count as oversize.
ENVELOPE_ALLOWANCE_BYTES: Final = 64 * 1024
#: Unix ms timestamps above this (year ~2255) are not a plausible submit time.
MAX_PLAUSIBLE_MS: Final = 9_000_000_000_000


def fields_bytes(fields: Mapping[bytes, bytes]) -> int:
    """Bytes of all names and values of an entry (what it costs to hold it)."""
    return sum(len(k) + len(v) for k, v in fields.items())


@dataclass(frozen=True)
class Entry:
    """One request entry as delivered to this consumer.

    Attributes:
        entry_id: the stream id.
        fields: raw entry fields (bytes to bytes); only the routing fields (at most
            :data:`ROUTING_FIELD_MAX_BYTES` each) when ``truncated``.
        deliveries: how many times the group delivered it (1 for a first read).
        size_bytes: bytes of all its fields as stored in Redis (-1: compute from ``fields``).
        field_count: how many fields it has in Redis (-1: ``len(fields)``).
        truncated: the entry was larger than the worker accepts; its other fields were left
            in Redis and never copied (it is dead-lettered by its sizes).
    """

    entry_id: str
    fields: Mapping[bytes, bytes]
    deliveries: int = 1
    size_bytes: int = field(default=-1)
    field_count: int = field(default=-1)
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            object.__setattr__(self, "size_bytes", fields_bytes(self.fields))
        if self.field_count < 0:
            object.__setattr__(self, "field_count", len(self.fields))


def routing_fields(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The routing fields of ``fields`` that are short enough to keep."""
    return {k: fields[k] for k in ROUTING_FIELDS if k in fields and len(fields[k]) <= ROUTING_FIELD_MAX_BYTES}


def truncated_entry(entry_id: str, fields: Mapping[bytes, bytes], deliveries: int, size_bytes: int,
                    field_count: int) -> Entry:
    """An oversize entry reduced to its routing fields and its sizes."""
    return Entry(entry_id, routing_fields(fields), deliveries, size_bytes, field_count, truncated=True)


def plausible_ms(value: int) -> int:
    """``value`` when it is a plausible Unix time in ms, else 0 (unknown)."""
    return value if 0 < value <= MAX_PLAUSIBLE_MS else 0


def elapsed_ms(at_ms: int, since_ms: int) -> float:
    """Milliseconds from ``since_ms`` (a producer's clock) to ``at_ms``: 0.0 when
    ``since_ms`` is unknown, implausible or in the future. Never raises (a float of the
    difference of two arbitrary ints can overflow)."""
    since = plausible_ms(since_ms)
    return float(at_ms - since) if 0 < since <= at_ms else 0.0


def route_of(fields: Mapping[Any, Any]) -> tuple[str, str] | None:
    """(request_id, reply_to) of an entry whose envelope failed to decode, when both are
    still usable (so the producer can be told what was wrong), else None."""
    try:
        env = decode_envelope({**fields, b"v": b"1", b"deadline_ms": b"0", b"ts_ms": b"0"})
    except E.HeadraceError:
        return None
    except Exception:  # noqa: BLE001 - a route is optional; any failure means "no route"
        return None
    return env.request_id, env.reply_to


def envelope_of(entry: Entry) -> Envelope:
    """The decoded envelope of ``entry``.

    Raises:
        ProtocolError: the routing fields do not decode (its ``code`` says why).
    """
    try:
        return decode_envelope(entry.fields)
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an int() of a 5000-digit field: the entry's fault
        raise E.DecodeError(f"entry fields do not decode: {type(e).__name__}: {e}") from e
