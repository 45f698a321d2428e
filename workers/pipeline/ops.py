"""What one commit applies, per entry, and what it reports back.

An op answers (or only acknowledges) one request entry; :meth:`Broker.commit` applies a
list of them atomically and returns one outcome code per op. The dead-letter field names
are defined here and nowhere else: the commit script, the memory broker and
``headrace dlq`` all take them from this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from headrace.workers.pipeline.entry import PROTOCOL_FIELDS

# Outcome codes returned by Broker.commit, one per op.
WRITTEN: Final = 1
DUPLICATE: Final = 0
UNWRITABLE: Final = -1

# Dead-letter fields (added to the original entry's fields).
DLQ_PREFIX: Final = b"dlq_"
DLQ_REASON: Final = b"dlq_reason"
DLQ_CODE: Final = b"dlq_code"
DLQ_ENTRY_ID: Final = b"dlq_entry_id"
DLQ_DELIVERIES: Final = b"dlq_deliveries"
DLQ_TS_MS: Final = b"dlq_ts_ms"
DLQ_ENTRY_BYTES: Final = b"dlq_entry_bytes"
DLQ_ENTRY_FIELDS: Final = b"dlq_entry_fields"
DLQ_DROPPED_FIELDS: Final = b"dlq_dropped_fields"
#: the fields the commit script writes for an unwritable reply, in its ARGV order.
DLQ_SCRIPT_NAMES: Final = (DLQ_REASON, DLQ_CODE, DLQ_ENTRY_ID, DLQ_DELIVERIES, DLQ_TS_MS)
#: most fields of the original entry a dead letter copies (protocol fields first).
DLQ_MAX_FIELDS: Final = 64
REASON_MAX_CHARS: Final = 1000


@dataclass(frozen=True)
class Ack:
    """Acknowledge without answering (the request was answered before)."""

    entry_id: str


@dataclass(frozen=True)
class Reply:
    """Write ``fields`` (an encoded result) to ``reply_to`` unless ``request_id`` was
    answered already, then acknowledge."""

    entry_id: str
    request_id: str
    reply_to: str
    fields: Mapping[bytes, bytes]


@dataclass(frozen=True)
class DeadLetterOp:
    """Move an entry to the dead-letter stream, tell the producer when it can be told
    (``reply_fields``), and acknowledge.

    ``fields`` are the entry's fields as the worker holds them; ``entry_bytes`` and
    ``entry_fields`` its size in Redis (-1: from ``fields``), recorded in the dead letter
    so that an oversize entry is described, not copied.
    """

    entry_id: str
    fields: Mapping[bytes, bytes]
    reason: str
    code: str
    deliveries: int
    request_id: str | None = None
    reply_to: str | None = None
    reply_fields: Mapping[bytes, bytes] | None = None
    entry_bytes: int = -1
    entry_fields: int = -1

    def dlq_fields(self, at_ms: int) -> dict[bytes, bytes]:
        """The dead letter: protocol fields first, at most :data:`DLQ_MAX_FIELDS` fields
        of the original entry, then the ``dlq_*`` fields."""
        kept = dead_letter_copy(self.fields)
        dropped = (self.entry_fields if self.entry_fields >= 0 else len(self.fields)) - len(kept)
        n_bytes = self.entry_bytes if self.entry_bytes >= 0 else sum(len(k) + len(v) for k, v in self.fields.items())
        n_fields = self.entry_fields if self.entry_fields >= 0 else len(self.fields)
        kept.update({DLQ_REASON: self.reason[:REASON_MAX_CHARS].encode(), DLQ_CODE: self.code.encode(),
                     DLQ_ENTRY_ID: self.entry_id.encode(), DLQ_DELIVERIES: str(self.deliveries).encode(),
                     DLQ_TS_MS: str(at_ms).encode(), DLQ_ENTRY_BYTES: str(n_bytes).encode(),
                     DLQ_ENTRY_FIELDS: str(n_fields).encode()})
        if dropped > 0:
            kept[DLQ_DROPPED_FIELDS] = str(dropped).encode()
        return kept


def dead_letter_copy(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The fields of an entry a dead letter keeps (bounded: the commit script passes them
    to one ``XADD``, and Lua cannot unpack more than ~8000 values)."""
    out = {k: fields[k] for k in PROTOCOL_FIELDS if k in fields}
    for k, v in fields.items():
        if len(out) >= DLQ_MAX_FIELDS:
            break
        if not k.startswith(DLQ_PREFIX):
            out.setdefault(k, v)
    return out


Op = Ack | Reply | DeadLetterOp
