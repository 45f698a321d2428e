"""The model's inbox: what one relay step did, and the bounds an inbox element must meet.

In strict submit mode (``WorkerSettings.submit_mode``, the default) the submit function
appends each checked request to ``<ns>:{<model>}:inbox`` as one msgpack array
``[field, value, field, value, ...]`` instead of adding it to the request stream, and the
workers move it into the stream with the ``headrace_relay`` function (``client/submit.lua``).
Producers may append to the inbox by hand (``RPUSH``), so the relay checks every element
again: :func:`check_element` is the same check in Python, used by the in-memory broker and
held to the Lua one by the broker contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

#: field names per entry (the submit function's MAX_FIELDS).
MAX_FIELDS: Final = 16
#: bytes of one field name (the submit function's MAX_NAME_BYTES).
MAX_NAME_BYTES: Final = 64
#: msgpack framing an element may add to its fields' bytes before it counts as oversize
#: unread (a 5-byte header per string, at most 2 * MAX_FIELDS strings, and the array's).
FRAMING_ALLOWANCE: Final = 2 * MAX_FIELDS * 9


@dataclass(frozen=True)
class RelayStep:
    """What one ``headrace_relay`` call did.

    Attributes:
        added: elements added to the request stream.
        dead_lettered: elements refused (described in the DLQ, never copied).
        left: elements still in the inbox afterwards.
    """

    added: int
    dead_lettered: int
    left: int

    @property
    def moved(self) -> int:
        return self.added + self.dead_lettered


def check_element(raw: bytes, max_payload_bytes: int) -> tuple[list[bytes], None] | tuple[None, tuple[str, str]]:
    """The field list of an inbox element, or ``(None, (code, reason))`` when the relay
    refuses it: oversize (never decoded), not one msgpack array of string pairs, more than
    :data:`MAX_FIELDS` fields, a name of 0 or more than :data:`MAX_NAME_BYTES` bytes or given
    twice, or all fields together over ``max_payload_bytes``."""
    if len(raw) > max_payload_bytes + FRAMING_ALLOWANCE:
        return None, ("payload_too_large", f"inbox element of {len(raw)} bytes exceeds max_payload_bytes="
                                           f"{max_payload_bytes}; its payload was not read")
    try:
        flat, end = _walk(raw, 0, top=True)
    except (IndexError, ValueError):
        return None, ("decode_error", "inbox element is not one msgpack array of field, value pairs")
    if end != len(raw) or not isinstance(flat, list) or not flat:
        return None, ("decode_error", "inbox element is not a msgpack array of field, value pairs")
    return _check_fields(flat, max_payload_bytes)


# Fixed-size msgpack types: the lead byte and how many bytes follow it.
_FIXED: Final = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
                 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR: Final = {0xD9: 1, 0xDA: 2, 0xDB: 4}     # str8/16/32: bytes of the length
_ARRAY: Final = {0xDC: 2, 0xDD: 4}            # array16/32
_MAP: Final = {0xDE: 2, 0xDF: 4}              # map16/32


def _length(raw: bytes, pos: int, size: int) -> tuple[int, int]:
    if pos + size > len(raw):
        raise ValueError("truncated")
    return int.from_bytes(raw[pos:pos + size], "big"), pos + size


def _walk(raw: bytes, pos: int, top: bool = False) -> tuple[Any, int]:
    """One msgpack object at ``pos`` as Redis's Lua ``cmsgpack.unpack`` reads it: strings
    as bytes, the top-level array as a list, anything else as None; bin and ext types,
    which cmsgpack cannot decode, raise ValueError. Returns (object, next position)."""
    lead = raw[pos]
    pos += 1
    if lead <= 0x7F or lead >= 0xE0:
        return None, pos
    if lead in _FIXED:
        if pos + _FIXED[lead] > len(raw):
            raise ValueError("truncated")
        return None, pos + _FIXED[lead]
    if 0xA0 <= lead <= 0xBF or lead in _STR:
        n, pos = (lead & 0x1F, pos) if lead <= 0xBF else _length(raw, pos, _STR[lead])
        if pos + n > len(raw):
            raise ValueError("truncated")
        return raw[pos:pos + n], pos + n
    if 0x90 <= lead <= 0x9F or lead in _ARRAY:
        n, pos = (lead & 0x0F, pos) if lead <= 0x9F else _length(raw, pos, _ARRAY[lead])
        items = []
        for _ in range(n):
            item, pos = _walk(raw, pos)
            items.append(item)
        return (items if top else None), pos
    if 0x80 <= lead <= 0x8F or lead in _MAP:
        n, pos = (lead & 0x0F, pos) if lead <= 0x8F else _length(raw, pos, _MAP[lead])
        for _ in range(2 * n):
            _, pos = _walk(raw, pos)
        return None, pos
    raise ValueError(f"msgpack type 0x{lead:02x} (bin, ext or invalid) is not decoded by the relay")


def _check_fields(flat: list[Any], max_payload_bytes: int) -> tuple[list[bytes], None] | tuple[None, tuple[str, str]]:
    if len(flat) % 2:
        return None, ("decode_error", "inbox element refused: the entry must be field, value pairs")
    if len(flat) // 2 > MAX_FIELDS:
        return None, ("payload_too_large", f"inbox element refused: entry of {len(flat) // 2} fields exceeds "
                                           f"{MAX_FIELDS}")
    if not all(isinstance(x, bytes) for x in flat):
        return None, ("decode_error", "inbox element refused: field names and values must be strings")
    names = flat[0::2]
    if any(not 0 < len(n) <= MAX_NAME_BYTES for n in names) or len(set(names)) != len(names):
        return None, ("decode_error", "inbox element refused: field names must be 1-64 bytes, each given once")
    total = sum(len(x) for x in flat)
    if total > max_payload_bytes:
        return None, ("payload_too_large", f"inbox element refused: entry of {total} bytes (all fields) exceeds "
                                           f"max_payload_bytes={max_payload_bytes}")
    return flat, None
