"""Metrics that keep every observation, for tests."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class InMemoryMetrics:
    """Keeps every observation, for tests (thread-safe)."""

    batch_sizes: list[int] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    queue_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    lag: int = 0
    pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_batch(self, size: int, infer_s: float) -> None:
        with self._lock:
            self.batch_sizes.append(size)
            self.infer_s.append(infer_s)

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        with self._lock:
            self.requests[(status, code)] += 1
            self.queue_s.append(queue_s)
            self.total_s.append(total_s)

    def set_backlog(self, lag: int, pending: int) -> None:
        with self._lock:
            self.lag, self.pending = lag, pending

    def count(self, status: str | None = None, code: str | None = None) -> int:
        with self._lock:
            return sum(n for (s, c), n in self.requests.items()
                       if (status is None or s == status) and (code is None or c == code))
