"""Settings of a stream worker (standalone or inside a Ray Serve replica): the one source.

Each field of :class:`WorkerSettings` carries its documentation in its metadata
(:func:`setting`): help text, unit, command-line flag, whether it changes live. Everything
else is derived from it:

* the ``HEADRACE_<FIELD>`` environment variables (:meth:`Settings.from_env`);
* the options of ``headrace worker`` and ``python -m headrace.workers``
  (:mod:`headrace.workers.cli`);
* the Ray application args (``ray_config.yaml``; :mod:`headrace.cluster.serve.args`):
  the fields marked ``app_arg`` are typed args of their own, every other one goes in
  ``worker_overrides``;
* what ``reconfigure`` / the deployment's ``user_config`` may change live (``live``).

A field added here is reachable from all of them without further wiring.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import uuid
from typing import Any, Final

from headrace.client.config import (
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    ENV_PREFIX,
    Settings,
    require,
    validate_model_name,
    validate_namespace,
    validate_redis_url,
)
from headrace.client.keys import validate_partitions
from headrace.client.protocol import DEFAULT_LIMITS, Limits
from headrace.workers.pipeline.entry import ENVELOPE_ALLOWANCE_BYTES


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "no value given" in :class:`SettingInfo` (e.g. no ``app_default``: the field's default).
UNSET: Final = _Unset()


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """What a settings field's metadata says about it.

    Attributes:
        name / env: field name and its environment variable.
        help: one-line description (the ``--help`` text).
        unit: unit of the value (``ms``, ``s``, ``bytes``, ``requests``...), "" when none.
        flag: long option name without dashes; ``aliases`` more names for it.
        live: can change while the worker runs (``reconfigure``, Serve ``user_config``).
        app_arg: a typed Ray application arg of its own (else set through
            ``worker_overrides``).
        app_default: its default as a Ray application arg, when it differs.
    """

    name: str
    env: str
    help: str
    unit: str = ""
    flag: str = ""
    aliases: tuple[str, ...] = ()
    live: bool = False
    app_arg: bool = False
    app_default: Any = UNSET


def setting(default: Any, help: str, *, unit: str = "", flag: str = "", aliases: tuple[str, ...] = (),
            live: bool = False, app_arg: bool = False, app_default: Any = UNSET) -> Any:
    """A settings field with its documentation (see :class:`SettingInfo`)."""
    meta = {"help": help, "unit": unit, "flag": flag, "aliases": aliases, "live": live, "app_arg": app_arg,
            "app_default": app_default}
    return dataclasses.field(default=default, metadata={"headrace": meta})


def setting_info(f: dataclasses.Field[Any], env_prefix: str = ENV_PREFIX) -> SettingInfo:
    """The :class:`SettingInfo` of a field declared with :func:`setting`."""
    meta = dict(f.metadata.get("headrace", {}))
    flag = meta.pop("flag", "") or f.name.replace("_", "-")
    return SettingInfo(name=f.name, env=env_prefix + f.name.upper(), flag=flag,
                       **{k: v for k, v in meta.items() if k in {"help", "unit", "aliases", "live", "app_arg",
                                                                 "app_default"}})


def default_consumer_name() -> str:
    """Unique per process: host, pid and a random suffix, so a restarted worker never
    inherits (and silently re-owns) a dead one's pending entries under the same name."""
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class WorkerSettings(Settings):
    """How one worker consumes one model's request stream. Each field's help text is in
    its metadata: ``python -m headrace.workers --help`` lists them with units and
    environment variables."""

    model: str = setting("minilm", "Served model name (repository folder name, e.g. minilm).", app_arg=True)
    version: str = setting("", "Repository version to load; empty means the latest.", app_arg=True)
    redis_url: str = setting("", "Redis URL (ACL user:password@ and rediss:// pass through); empty: "
                                 f"HEADRACE_REDIS_URL, else {DEFAULT_REDIS_URL}.", app_arg=True)
    namespace: str = setting(DEFAULT_NAMESPACE, "Key prefix shared with producers.", app_arg=True)
    partitions: int = setting(1, "Request streams the model is split into, each its own Redis Cluster slot "
                                 "(hash tag {model~p}); the worker reads all of them. 1 = one stream (the "
                                 "default). Producers must use the same value.", unit="streams", app_arg=True)
    redis_cluster: bool = setting(False, "Redis URL names a Redis Cluster node: connect with the cluster client "
                                         "(scripts routed by key, the submit function loaded on every primary).")
    group: str = setting(DEFAULT_GROUP, "Consumer group shared by all workers of the model.")
    consumer: str = setting("", "This worker's consumer name; empty picks a unique one (host-pid-random).")
    model_repo: str = setting("model_repo", "Path of the model repository directory (relative: to the working "
                                            "directory; Ray args: see docs/operations.md).", app_arg=True)
    backend: str = setting("", "onnx, torch, litert (TFLite entries), or empty for what the manifest says.",
                           app_arg=True)
    max_batch: int = setting(32, "Most requests in one model run (also the most entries read at once).",
                             unit="requests", live=True, app_arg=True)
    preferred_batch: int = setting(0, "Wait (up to max_wait_ms) for more while fewer wait; 0 = max_batch.",
                                   unit="requests", live=True, app_arg=True)
    max_wait_ms: float = setting(5.0, "Longest time a partial batch waits for more requests.", unit="ms",
                                 live=True, app_arg=True)
    block_ms: int = setting(1000, "Longest blocking XREADGROUP before the loop checks its state.", unit="ms",
                            app_arg=True)
    lease_s: float = setting(30.0, "A pending entry idle this long is presumed abandoned and reclaimed; live "
                                   "workers refresh their in-flight entries every lease_s / 3.", unit="s",
                             app_arg=True)
    max_deliveries: int = setting(3, "Deliveries after which a request goes to the dead-letter stream.",
                                  app_arg=True)
    dedupe_ttl_s: int = setting(86_400, "How long a request id's 'answered' marker is kept.", unit="s")
    max_payload_bytes: int = setting(4 * 1024 * 1024, "Largest accepted request body; entries larger than this "
                                                      "plus 64 KiB (all fields counted) are dead-lettered "
                                                      "unread.", unit="bytes")
    max_samples_per_entry: int = setting(1024, "Most samples one multi-sample entry may carry; more are answered "
                                               "too_many_samples.", unit="samples")
    memory_budget_bytes: int = setting(64 * 1024 * 1024, "Most bytes of request entries the worker holds at "
                                                         "once (read, queued, running, being answered); reads "
                                                         "are sized to it.", unit="bytes")
    reply_ttl_s: int = setting(86_400, "Reply streams expire this long after the last result written.",
                               unit="s")
    trim_interval_s: float = setting(5.0, "How often the request stream is trimmed to acknowledged entries.",
                                     unit="s")
    drain_timeout_s: float = setting(30.0, "On stop, how long in-flight work may take before giving up.",
                                     unit="s", app_arg=True)
    infer_timeout_s: float = setting(300.0, "Longest one model call may run (0 = no limit); past it the worker "
                                            "stops (unhealthy) and its requests go to other workers after "
                                            "lease_s. Set it well above the slowest legitimate batch.", unit="s")
    intra_op_threads: int = setting(0, "Backend threads per model call (0 = backend default).",
                                    aliases=("threads",), app_arg=True, app_default=1)
    instances: int = setting(1, "Model calls that run at once on the one loaded model (Triton's instance_group); "
                                "on a CPU host: cores, with intra_op_threads 1. Needs a thread-safe servable.")
    metrics_port: int = setting(0, "Serve Prometheus metrics on this port (0 = do not serve).")
    reject_non_finite: bool = setting(True, "Answer bad_value for float inputs holding NaN/Inf.")
    ort_spin: bool = setting(False, "Let ONNX Runtime's idle intra-op threads spin-wait (only on a dedicated "
                                    "many-core host: on a shared CPU they take the loop's cores).")
    restrict_reply_to: bool = setting(True, "Write results only to this model's reply streams "
                                            "(<ns>:{<model>}:reply:<client>); other reply_to keys are "
                                            "dead-lettered unanswered. Off only for trusted producers.")
    submit_mode: str = setting("strict", "How the submit function adds requests: 'strict' appends them to the "
                                         "model's inbox, which workers relay into the stream (producers need no "
                                         "XADD right); 'direct' XADDs at once for producers an operator granted "
                                         "XADD (docs/security.md).")
    relay_batch: int = setting(256, "Most inbox requests one relay step moves into the stream (a step also stops "
                                    "after 1 MiB of requests).", unit="requests")
    gc_freeze: bool = setting(True, "After loading the model, move the objects alive into the garbage collector's "
                                    "permanent generation (gc.freeze), so full collections during serving do not "
                                    "walk the model's and libraries' objects and stall the event loop.")
    servable: str = setting("", "package.module:Class of an operator-written servable (a CustomServable subclass, "
                                "docs/models.md) to serve the model with instead of the manifest's backend. "
                                "Operator configuration only: a manifest never names code.")

    def validate(self) -> None:
        validate_model_name(self.model)
        validate_namespace(self.namespace)
        validate_redis_url(self.redis_url)
        validate_partitions(self.partitions)
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
        require(1 <= self.max_samples_per_entry <= 65_536, "max_samples_per_entry",
                "must be between 1 and 65536 samples (producers send larger inputs in several entries)")
        require(self.memory_budget_bytes >= self.max_entry_bytes, "memory_budget_bytes",
                f"must hold at least one entry of the largest accepted size ({self.max_entry_bytes} bytes: "
                "max_payload_bytes + 64 KiB); raise it or lower max_payload_bytes")
        require(self.reply_ttl_s >= 1, "reply_ttl_s", "must be >= 1 s")
        require(self.trim_interval_s > 0, "trim_interval_s", "must be > 0 s")
        require(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0 s")
        require(self.infer_timeout_s >= 0, "infer_timeout_s",
                "must be >= 0 s (0 = no limit); set it well above your slowest batch")
        require(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0 (0 = backend default)")
        require(1 <= self.instances <= 64, "instances",
                "must be between 1 and 64 concurrent model calls (usually <= the cores, with intra_op_threads=1)")
        require(0 <= self.metrics_port <= 65535, "metrics_port", "must be a TCP port or 0")
        require(self.submit_mode in {"strict", "direct"}, "submit_mode",
                "must be 'strict' (producers only append to the inbox) or 'direct' (producers granted XADD add "
                "to the stream; docs/security.md)")
        require(1 <= self.relay_batch <= 1000, "relay_batch", "must be between 1 and 1000 requests")
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
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def max_entry_bytes(self) -> int:
        """Largest entry the worker reads whole (all fields counted); larger ones are
        dead-lettered by their sizes, their payload never copied."""
        return self.max_payload_bytes + ENVELOPE_ALLOWANCE_BYTES

    @functools.cached_property
    def limits(self) -> Limits:
        # cached: the decoder asks for it on every entry (settings are frozen; a live change
        # makes new settings)
        # A numeric tensor's bytes are all in the body, so the element cap only bounds what a
        # shape could claim beyond them: it follows a raised max_payload_bytes, or a worker
        # allowed 64 MiB bodies would still refuse a 20 Mi-element uint8 image batch.
        return Limits(max_payload_bytes=self.max_payload_bytes,
                      max_elements=max(DEFAULT_LIMITS.max_elements, self.max_payload_bytes))


def infos(cls: type[Settings] = WorkerSettings) -> list[tuple[dataclasses.Field[Any], SettingInfo]]:
    """Every init field of ``cls`` with its :class:`SettingInfo`, in declaration order."""
    return [(f, setting_info(f, cls.env_prefix)) for f in dataclasses.fields(cls) if f.init]


def live_fields() -> tuple[str, ...]:
    """The worker settings that change live (``reconfigure``, Serve ``user_config``)."""
    return tuple(info.name for _, info in infos() if info.live)


_PROCESS_CONSUMER = default_consumer_name()
