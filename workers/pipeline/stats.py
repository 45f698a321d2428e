"""One line of a model's stats stream (``<ns>:{<model>}:stats``), per committed batch; read
by ``headrace status`` (``workers/admin/status.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack


@dataclass(frozen=True)
class BatchStats:
    """A committed batch: ``batch`` requests run (``ok`` + ``failed`` answered),
    ``infer_ms`` of model time, and the submit-to-commit latency of each answered request
    whose submit time is known (``lat_ms``, milliseconds)."""

    worker: str
    batch: int
    ok: int
    failed: int
    infer_ms: float
    lat_ms: Sequence[float] = field(default_factory=tuple)

    def to_fields(self, at_ms: int) -> dict[bytes, bytes]:
        lat = [round(x, 3) for x in self.lat_ms if math.isfinite(x)]
        return {b"ts_ms": str(at_ms).encode(), b"worker": self.worker.encode(), b"batch": str(self.batch).encode(),
                b"ok": str(self.ok).encode(), b"failed": str(self.failed).encode(),
                b"infer_ms": f"{self.infer_ms:.3f}".encode(), b"lat_ms": msgpack.packb(lat)}
