"""The one backoff policy: exponential, capped, with jitter.

Every retry loop of headrace (the SDK's reply readers and retries, the worker's loops) takes
its delays from :class:`BackoffPolicy`, so that clients and workers that lost Redis together
do not come back in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from headrace.client import errors as E


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before retry number ``attempt``: ``base_s * factor**(attempt-1)``, capped at
    ``cap_s``, of which a random share up to ``jitter`` is taken away.

    Args:
        base_s: delay before the first retry (s).
        cap_s: longest delay (s).
        factor: growth per attempt.
        jitter: 0 = fixed delays; 1 = "full jitter" (uniform in [0, delay]).

    Raises:
        ConfigError: a negative delay, ``cap_s < base_s``, ``factor < 1`` or ``jitter`` outside [0, 1].
    """

    base_s: float = 0.05
    cap_s: float = 2.0
    factor: float = 2.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.cap_s >= self.base_s):
            raise E.ConfigError(f"backoff: need 0 <= base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}")
        if self.factor < 1:
            raise E.ConfigError(f"backoff: factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise E.ConfigError(f"backoff: jitter must be within [0, 1], got {self.jitter}")

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (1 = the first retry)."""
        exp = min(max(0, attempt - 1), 64)  # no float overflow for very long outages
        full = min(self.cap_s, self.base_s * self.factor**exp)
        u = (rng or random).random()
        return full * (1.0 - self.jitter * u)
