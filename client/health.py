"""Model health from the registry: what ``model_status``/``describe`` return, and the cached
checks ``submit`` makes (``require_registered``, ``fail_fast``). Sans-IO: the clients read
the registry (:mod:`headrace.client.registry`) and hand the record in.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from headrace.client import errors as E
from headrace.client.registry import ALIVE_MS, ModelRecord, WorkerRecord

log = logging.getLogger(__name__)

#: seconds between two warnings that a model's submits go without a registry read.
STALE_WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class ModelStatus:
    """A model's health, as its workers last reported it in the registry.

    Attributes:
        model: the model.
        registered: a worker has registered it in this namespace at some time.
        live_workers: workers whose heartbeat is at most ``alive_ms`` old (Redis time).
        versions: versions the live workers serve, newest first.
        lag / pending: the backlog, from the most recent heartbeat (entries not yet
            delivered / delivered and not acknowledged; up to a heartbeat old).
        latency_p50_ms / latency_p99_ms: submit-to-result latency of recent requests
            (median of the workers' medians / the worst worker's p99; 0 when none ran).
        last_seen_s: age of the newest heartbeat (seconds; None when never registered).
    """

    model: str
    registered: bool
    live_workers: tuple[WorkerRecord, ...] = ()
    versions: tuple[str, ...] = ()
    lag: int = 0
    pending: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    last_seen_s: float | None = None

    @property
    def ready(self) -> bool:
        """At least one live worker serves the model (a readiness probe's answer)."""
        return bool(self.live_workers)

    @property
    def backlog(self) -> int:
        """``lag + pending``: what ``max_backlog`` is compared with."""
        return self.lag + self.pending

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for health endpoints)."""
        return {"model": self.model, "registered": self.registered, "ready": self.ready,
                "live_workers": [w.consumer for w in self.live_workers], "versions": list(self.versions),
                "lag": self.lag, "pending": self.pending, "backlog": self.backlog,
                "latency_p50_ms": self.latency_p50_ms, "latency_p99_ms": self.latency_p99_ms,
                "last_seen_s": self.last_seen_s}


@dataclass(frozen=True)
class BatchingLimits:
    """The batching limits a worker applies (``max_batch`` requests per model run, waiting up
    to ``max_wait_ms`` for ``preferred_batch`` of them; 0 = ``max_batch``)."""

    max_batch: int = 0
    preferred_batch: int = 0
    max_wait_ms: float = 0.0


@dataclass(frozen=True)
class ModelDescription:
    """What a model takes and returns, per version, from the registry.

    Attributes:
        model: the model.
        versions: versions served by live workers, newest first (empty: none live now).
        signatures: version -> the servable's description (``Servable.describe()``:
            inputs, outputs, text or tensors), for every version workers served lately.
        batching: version -> the batching limits of its live workers (the largest, when
            workers of one version differ).
        live_workers: how many workers are live.
    """

    model: str
    versions: tuple[str, ...]
    signatures: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    batching: Mapping[str, BatchingLimits] = field(default_factory=dict)
    live_workers: int = 0

    def signature(self, version: str | None = None) -> Mapping[str, Any] | None:
        """The description of ``version``; None picks the newest live version (else the
        newest known)."""
        if version is None:
            version = self.versions[0] if self.versions else _newest(self.signatures)
        return self.signatures.get(version) if version is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {"model": self.model, "versions": list(self.versions), "live_workers": self.live_workers,
                "signatures": {v: dict(s) for v, s in self.signatures.items()},
                "batching": {v: vars(b).copy() for v, b in self.batching.items()}}


def _newest(versions: Mapping[str, Any]) -> str | None:
    known = sorted(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v), reverse=True)
    return known[0] if known else None


def model_status(model: str, record: ModelRecord | None, now_ms: int, alive_ms: int = ALIVE_MS) -> ModelStatus:
    """The :class:`ModelStatus` of ``model`` from its registry ``record`` at server time ``now_ms``."""
    if record is None:
        return ModelStatus(model=model, registered=False)
    live = record.live_workers(now_ms, alive_ms)
    newest = max(record.workers.values(), key=lambda w: w.seen_ms, default=None)
    answered = [w for w in live if w.p50_ms > 0]
    return ModelStatus(
        model=model, registered=True, live_workers=live, versions=record.versions(now_ms, alive_ms),
        lag=newest.lag if newest else 0, pending=newest.pending if newest else 0,
        latency_p50_ms=statistics.median(w.p50_ms for w in answered) if answered else 0.0,
        latency_p99_ms=max((w.p99_ms for w in answered), default=0.0),
        last_seen_s=max(0.0, (now_ms - newest.seen_ms) / 1000.0) if newest else None)


def describe(model: str, record: ModelRecord | None, now_ms: int, alive_ms: int = ALIVE_MS) -> ModelDescription:
    """The :class:`ModelDescription` of ``model``.

    Raises:
        UnknownModel: no worker ever registered ``model``.
    """
    if record is None:
        raise unknown_model(model)
    live = record.live_workers(now_ms, alive_ms)
    batching: dict[str, BatchingLimits] = {}
    for w in live:
        limits = BatchingLimits(w.max_batch, w.preferred_batch, w.max_wait_ms)
        have = batching.get(w.version)
        if have is None or limits.max_batch > have.max_batch:
            batching[w.version] = limits
    return ModelDescription(model=model, versions=record.versions(now_ms, alive_ms),
                            signatures=dict(record.signatures), batching=batching, live_workers=len(live))


def unknown_model(model: str, namespace: str = "") -> E.UnknownModel:
    where = f" in namespace {namespace!r}" if namespace else ""
    return E.UnknownModel(
        f"no worker has ever registered model {model!r}{where}: check the name, or start its workers; "
        "to submit before any worker starts, pass require_registered=False (env HEADRACE_REQUIRE_REGISTERED=0)",
        model=model)


@dataclass
class _Cached:
    record: ModelRecord | None
    server_ms: int
    read_at: float  # time.monotonic() of the read
    live_until: float  # time.monotonic() at which the newest heartbeat of the read gets too old
    p50_ms: float  # the model's recent median latency (0: unknown)
    partitions: frozenset[int] = frozenset()  # the partition counts of its live workers


class RegistryCache:
    """Registry reads of the models a client submits to, reused for ``ttl_s`` seconds, and
    the checks ``submit`` makes with them (thread-safe).

    Args:
        ttl_s: how long a read is reused.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        #: set once a read was refused by ACL: the checks are then skipped.
        self.unreadable = False
        # Models this client saw registered: after Redis lost its data the registry is empty
        # until the workers' next heartbeat, and those models must not turn "unknown" meanwhile.
        self._known: set[str] = set()
        self._stale_warned: dict[str, float] = {}

    def fresh(self, model: str) -> bool:
        """True when a read of ``model`` is recent enough to decide without Redis. A read
        that found the model unregistered is never reused: workers starting right now
        must be seen by the next submit."""
        with self._lock:
            got = self._cache.get(model)
        return got is not None and got.record is not None and self._clock() - got.read_at < self.ttl_s

    def store(self, model: str, record: ModelRecord | None, server_ms: int) -> None:
        # What the submit checks need is worked out here, once per read: a submit then
        # compares two numbers instead of walking the record.
        now = self._clock()
        newest = max((w.seen_ms for w in record.workers.values()), default=None) if record else None
        live_until = now + (newest + ALIVE_MS - server_ms) / 1000.0 if newest is not None else now
        p50 = model_status(model, record, server_ms).latency_p50_ms if record else 0.0
        parts = frozenset(w.partitions for w in record.workers.values() if w.alive(server_ms)) if record else frozenset()
        with self._lock:
            self._cache[model] = _Cached(record, server_ms, now, live_until, p50, parts)
            if record is not None:
                self._known.add(model)

    def known(self, model: str) -> bool:
        """Whether a read by this client found ``model`` registered."""
        with self._lock:
            return model in self._known

    def warn_stale(self, model: str, error: E.BrokerError) -> None:
        """Log, once per :data:`STALE_WARN_EVERY_S` and model, that ``model``'s submits go
        on an earlier read because the registry's Redis cannot be reached (``error``)."""
        now = self._clock()
        with self._lock:
            if now - self._stale_warned.get(model, -STALE_WARN_EVERY_S) < STALE_WARN_EVERY_S:
                return
            self._stale_warned[model] = now
        log.warning("cannot read the model registry (%s); submitting to model %r, which this client saw "
                    "registered, without the require_registered/fail_fast checks", error, model)

    def cached(self, model: str) -> tuple[ModelRecord | None, int] | None:
        """``(record, server ms advanced by the read's age)`` of a fresh read, else None."""
        with self._lock:
            got = self._cache.get(model)
        if got is None or got.record is None or self._clock() - got.read_at >= self.ttl_s:
            return None
        return got.record, got.server_ms + int((self._clock() - got.read_at) * 1000)

    def forget(self, model: str | None = None) -> None:
        """Drop the cached read of ``model`` (all models with None)."""
        with self._lock:
            if model is None:
                self._cache.clear()
            else:
                self._cache.pop(model, None)

    def status(self, model: str) -> ModelStatus | None:
        """The :class:`ModelStatus` from the cached read (server time advanced by the
        read's age); None when nothing is cached."""
        with self._lock:
            got = self._cache.get(model)
        if got is None:
            return None
        now_ms = got.server_ms + int((self._clock() - got.read_at) * 1000)
        return model_status(model, got.record, now_ms)

    def check(self, model: str, *, require_registered: bool, fail_fast: bool, namespace: str = "",
              partitions: int | None = None) -> None:
        """Apply the submit checks with the cached read (call :meth:`fresh` first).

        Raises:
            UnknownModel: ``require_registered`` and no worker ever registered ``model``.
            ModelUnavailable: ``fail_fast`` and no live worker serves ``model``.
            ConfigError: ``partitions`` given and no live worker reads that many partitions
                (while some live worker reads another count): requests would wait on
                streams nobody reads.
        """
        with self._lock:
            got = self._cache.get(model)
        if got is None:
            return
        if partitions is not None and got.partitions and partitions not in got.partitions:
            theirs = ", ".join(str(p) for p in sorted(got.partitions))
            raise E.ConfigError(
                f"model {model!r} is served by workers reading {theirs} partition(s), but this client sends to "
                f"{partitions}: its requests would wait on streams no worker reads; set the partitions argument "
                f"(env HEADRACE_PARTITIONS) to the workers' value", field="partitions")
        if got.record is None and require_registered and model not in self._known:
            raise unknown_model(model, namespace)
        if fail_fast and self._clock() >= got.live_until:
            st = self.status(model)
            if st is not None and st.last_seen_s is not None:
                seen = f"; the last heartbeat is {st.last_seen_s:.0f}s old"
            else:  # a registry entry whose workers all stopped cleanly lists none
                seen = ("; its workers have all stopped" if got.record is not None
                        else "; no worker has registered it yet")
            raise E.ModelUnavailable(
                f"no live worker serves model {model!r}{seen} (fail_fast is on): start workers, or turn "
                "fail_fast off to queue the request for them", model=model)

    def retry_after_s(self, model: str) -> float:
        """A suggested wait after :class:`QueueFull`: the model's recent median latency
        (about how long the queue takes to move), clamped to [0.05, 5] s; 0.5 s unknown."""
        with self._lock:
            got = self._cache.get(model)
        if got is None or got.p50_ms <= 0:
            return 0.5
        return min(5.0, max(0.05, got.p50_ms / 1000.0))
