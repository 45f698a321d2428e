"""Retries as a policy: which failures a call tries again, how often, and how long it waits.

In the manner of redis-py's ``Retry`` or an HTTP client's ``max_retries``: a :class:`Retry`
is given to a client (its default for every call) or to one call (``infer(..., retry=...)``).
A retry resubmits the *same* request id, so the answer is still effectively once: the
workers' dedupe marker lets only one submission of an id be answered.

What can be retried (``Retry.on``):

* :class:`BrokerError` -- Redis failed under the submit (connection lost, timeout); the
  request may or may not have been enqueued. Errors that trying again cannot fix
  (authentication, ACL permission, wrong key type: ``BrokerError.retryable`` is False) are
  raised at once.
* :class:`ResultTimeout` -- no result within the attempt's ``timeout_s``: the request is
  submitted again (a worker that was down, a request Redis lost with its data).
* :class:`QueueFull` -- nothing was enqueued; the wait is at least ``retry_after_s``.

Deadlines are respected: no attempt starts after the request's deadline (the server would
answer ``expired`` anyway), and a resubmission carries the original deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from headrace.client import errors as E
from headrace.client.backoff import BackoffPolicy

RETRYABLE: tuple[type[E.HeadraceError], ...] = (E.BrokerError, E.ResultTimeout, E.QueueFull)
"""Every failure a retry can fix (the default of :attr:`Retry.on`)."""


@dataclass(frozen=True)
class Retry:
    """A retry policy.

    Args:
        attempts: most submissions of one request, the first included (1 = no retries).
        backoff: delay before each retry (exponential, capped, jittered).
        on: the failures to retry (subclasses of :class:`HeadraceError`; see the module doc).

    Raises:
        ConfigError: ``attempts`` < 1, or ``on`` names something that is not a
            :class:`HeadraceError` type.
    """

    attempts: int = 3
    backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(base_s=0.1, cap_s=2.0))
    on: tuple[type[E.HeadraceError], ...] = RETRYABLE

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise E.ConfigError(f"Retry: attempts must be an int >= 1 (1 = no retries), got {self.attempts!r}",
                                field="attempts")
        if not isinstance(self.backoff, BackoffPolicy):
            raise E.ConfigError(f"Retry: backoff must be a BackoffPolicy, got {type(self.backoff).__name__}",
                                field="backoff")
        if not all(isinstance(t, type) and issubclass(t, E.HeadraceError) for t in self.on):
            raise E.ConfigError(f"Retry: on must be HeadraceError subclasses, got {self.on!r}", field="on")

    @classmethod
    def none(cls) -> Retry:
        """No retries: every failure is raised at once."""
        return cls(attempts=1)

    def retries(self, err: BaseException) -> bool:
        """True when ``err`` is a failure this policy tries again (attempts aside)."""
        if not isinstance(err, self.on):
            return False
        return not isinstance(err, E.BrokerError) or err.retryable

    def start(self, deadline_ms: int = 0) -> Attempts:
        """The retry state of one call whose request has the absolute ``deadline_ms``
        (Unix ms, 0 = none)."""
        return Attempts(self, deadline_ms)


class Attempts:
    """The retry decisions of one call (sans-IO: it only says how long to wait).

    Args:
        policy: the :class:`Retry` in force.
        deadline_ms: the request's absolute deadline (Unix ms), 0 = none.
        clock: Unix time in seconds (injectable for tests).

    Attributes:
        made: submissions made so far (1 after the first).
    """

    def __init__(self, policy: Retry, deadline_ms: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.deadline_ms = deadline_ms
        self._time = clock
        self.made = 1

    def next_delay(self, err: BaseException) -> float | None:
        """Seconds to wait before the next submission after ``err``; None when ``err``
        must be raised (not retryable, attempts used up, or the deadline would pass)."""
        if not self.policy.retries(err) or self.made >= self.policy.attempts:
            return None
        delay = self.policy.backoff.delay_s(self.made)
        if isinstance(err, E.QueueFull):
            delay = max(delay, err.retry_after_s)
        if self.deadline_ms and (self._time() + delay) * 1000 >= self.deadline_ms:
            return None
        self.made += 1
        return delay

    def left(self) -> int:
        """Submissions still allowed."""
        return self.policy.attempts - self.made
