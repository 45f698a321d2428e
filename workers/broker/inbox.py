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

import msgpack

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
        flat: Any = msgpack.unpackb(raw, raw=True, strict_map_key=False)
    except Exception:  # noqa: BLE001 - anything a producer pushed that is not one msgpack object
        return None, ("decode_error", "inbox element is not one msgpack array of field, value pairs")
    if not isinstance(flat, list) or not flat:
        return None, ("decode_error", "inbox element is not a msgpack array of field, value pairs")
    return _check_fields(flat, max_payload_bytes)


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
