"""A clock tests move by hand."""

from __future__ import annotations


class ManualClock:
    """A monotonic clock for tests: ``clock()`` returns the current time (seconds),
    ``advance(s)`` moves it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds
