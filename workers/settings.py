"""Settings of a stream worker (standalone or inside a Ray Serve replica)."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

from headrace.client.config import (
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    Settings,
    require,
    validate_model_name,
    validate_namespace,
)
from headrace.client.protocol import Limits


def default_consumer_name() -> str:
    """Unique per process: host, pid and a random suffix, so a restarted worker never
    inherits (and silently re-owns) a dead one's pending entries under the same name."""
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class WorkerSettings(Settings):
    """How one worker consumes one model's request stream.

    Attributes:
        model: served model name (repository folder name, e.g. ``minilm``).
        version: repository version to load; empty means the latest.
        redis_url: Redis URL (ACL user/password and ``rediss://`` pass through).
        namespace: key prefix shared with producers.
        group: consumer group name shared by all workers of the model.
        consumer: this worker's consumer name; empty picks a unique one.
        model_repo: path of the model repository directory.
        backend: ``onnx``, ``torch``, ``litert`` (TFLite entries) or empty for what the manifest says.
        max_batch: most requests in one model run (also ``XREADGROUP COUNT``).
        preferred_batch: wait (up to ``max_wait_ms``) for more while below this; 0 = max_batch.
        max_wait_ms: longest time a partial batch waits for more requests.
        block_ms: longest blocking ``XREADGROUP`` before the loop checks its state.
        lease_s: a pending entry idle this long is presumed abandoned and reclaimed
            (``XAUTOCLAIM`` min-idle); live workers refresh their in-flight entries at
            ``lease_s / 3``.
        max_deliveries: deliveries after which a request goes to the dead-letter stream.
        dedupe_ttl_s: how long a request id's "answered" marker is kept.
        max_payload_bytes: largest accepted request body.
        reply_ttl_s: reply streams expire this long after the last result written.
        trim_interval_s: how often the request stream is trimmed to acknowledged entries.
        drain_timeout_s: on stop, how long in-flight work may take before giving up.
        infer_timeout_s: longest one model call may run (0 = no limit). A call past it
            cannot be interrupted, so the worker marks itself unhealthy and stops consuming
            (its in-flight requests are redelivered after ``lease_s``; a standalone worker
            exits non-zero for its supervisor to restart it, a Ray replica fails its health
            check). Set it well above the slowest legitimate batch.
        intra_op_threads: backend threads per model call (0 = backend default).
        instances: model calls that run at once, each on its own inference thread, all on
            the one loaded model (Triton's ``instance_group`` count). On a CPU host,
            ``instances`` = cores with ``intra_op_threads`` = 1 runs whole batches side by
            side instead of splitting each batch across threads: +15-30 % throughput on 2
            cores (BENCHMARKS.md). The servable must be ``thread_safe``.
        metrics_port: serve Prometheus metrics on this port (0 = do not serve).
        reject_non_finite: answer ``bad_value`` for float inputs holding NaN/Inf.
        ort_spin: let ONNX Runtime's idle intra-op threads spin-wait for work. Off by
            default: on a shared CPU the spinning threads take the cores the event loop,
            Redis and the producers need (measured ~70% more raw throughput with it off on
            2 cores, BENCHMARKS.md); turn it on for a dedicated many-core host.
        servable: ``package.module:Class`` of an operator-written servable
            (:class:`~headrace.workers.backends.custom.CustomServable`) to serve the model
            with instead of the manifest's backend. Operator configuration only: a manifest
            never names code.
        restrict_reply_to: write results only to this model's reply streams
            (``<ns>:{<model>}:reply:<client>``); an entry naming another key is
            dead-lettered unanswered. Turn off only for trusted producers on a single Redis.
    """

    model: str = "minilm"
    version: str = ""
    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    group: str = DEFAULT_GROUP
    consumer: str = ""
    model_repo: str = "model_repo"
    backend: str = ""
    max_batch: int = 32
    preferred_batch: int = 0
    max_wait_ms: float = 5.0
    block_ms: int = 1000
    lease_s: float = 30.0
    max_deliveries: int = 3
    dedupe_ttl_s: int = 86_400
    max_payload_bytes: int = 4 * 1024 * 1024
    reply_ttl_s: int = 86_400
    trim_interval_s: float = 5.0
    drain_timeout_s: float = 30.0
    infer_timeout_s: float = 300.0
    intra_op_threads: int = 0
    instances: int = 1
    metrics_port: int = 0
    reject_non_finite: bool = True
    ort_spin: bool = False
    restrict_reply_to: bool = True
    servable: str = ""

    def validate(self) -> None:
        validate_model_name(self.model)
        validate_namespace(self.namespace)
        require(bool(self.group) and "{" not in self.group, "group", "must be a non-empty name")
        require(self.backend in {"", "onnx", "torch", "litert"}, "backend",
                "must be 'onnx', 'torch', 'litert' or empty (manifest)")
        require(1 <= self.max_batch <= 4096, "max_batch", "must be between 1 and 4096 requests")
        require(0 <= self.preferred_batch <= self.max_batch, "preferred_batch",
                "must be between 0 (= max_batch) and max_batch")
        require(0 <= self.max_wait_ms <= 60_000, "max_wait_ms", "must be between 0 and 60000 ms")
        require(1 <= self.block_ms <= 60_000, "block_ms", "must be between 1 and 60000 ms")
        require(self.lease_s >= 0.1, "lease_s", "must be >= 0.1 s; make it longer than a batch usually takes")
        require(self.max_deliveries >= 1, "max_deliveries", "must be >= 1")
        require(self.dedupe_ttl_s >= 1, "dedupe_ttl_s", "must be >= 1 s (longer than any redelivery window)")
        require(self.max_payload_bytes >= 1024, "max_payload_bytes", "must be >= 1024 bytes")
        require(self.reply_ttl_s >= 1, "reply_ttl_s", "must be >= 1 s")
        require(self.trim_interval_s > 0, "trim_interval_s", "must be > 0 s")
        require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0 s")
        require(self.infer_timeout_s >= 0, "infer_timeout_s",
                "must be >= 0 s (0 = no limit); set it well above your slowest batch")
        require(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0 (0 = backend default)")
        require(1 <= self.instances <= 64, "instances",
                "must be between 1 and 64 concurrent model calls (usually <= the cores, with intra_op_threads=1)")
        require(0 <= self.metrics_port <= 65535, "metrics_port", "must be a TCP port or 0")
        mod, sep, cls = self.servable.partition(":")
        require(not self.servable or (bool(sep) and bool(mod) and bool(cls) and " " not in self.servable),
                "servable", "must be 'package.module:Class' (an importable CustomServable subclass) or empty")

    @property
    def effective_preferred_batch(self) -> int:
        return self.preferred_batch or self.max_batch

    @property
    def effective_consumer(self) -> str:
        return self.consumer or _PROCESS_CONSUMER

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @property
    def limits(self) -> Limits:
        return Limits(max_payload_bytes=self.max_payload_bytes)


_PROCESS_CONSUMER = default_consumer_name()
