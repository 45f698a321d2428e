"""Ray Serve application builders: one application per served model, plus the HTTP ingress.

``ray_config.yaml`` names these builders (``serve deploy ray_config.yaml`` / ``serve run``
/ ``headrace up``)::

    applications:
      - name: minilm
        route_prefix: null                      # stream workers take no HTTP traffic
        import_path: headrace.cluster.serve.app:build_app
        args: {model: minilm, redis_url: "redis://...", num_replicas: 2, max_batch: 32, ...}
      - name: http
        route_prefix: /
        import_path: headrace.cluster.serve.app:build_ingress
        args: {redis_url: "redis://..."}

The builders take a plain dict (what Serve passes from the YAML ``args``) and turn it into
a typed, eagerly validated frozen dataclass (:class:`ModelAppArgs`, :class:`IngressArgs`),
so a typo in the config fails the deploy with a message naming the field.

What is live and what restarts replicas: ``max_batch``, ``preferred_batch`` and
``max_wait_ms`` travel as the deployment's ``user_config`` (changed in place through
``reconfigure``); every other argument is part of the app's code version in Serve, so
changing it (e.g. ``version``) rolls the replicas over: new ones start, old ones drain.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from headrace.client.config import (
    DEFAULT_NAMESPACE,
    Settings,
    require,
    validate_model_name,
    validate_namespace,
)
from headrace.client.errors import ConfigError
from headrace.cluster.serve.autoscale import LagPolicySettings, lag_autoscaling_config
from headrace.workers.settings import WorkerSettings

if TYPE_CHECKING:
    from ray.serve import Application

WORKER_DEPLOYMENT = "StreamWorker"
INGRESS_DEPLOYMENT = "Ingress"
APP_BUILDER = "headrace.cluster.serve.app:build_app"
INGRESS_BUILDER = "headrace.cluster.serve.app:build_ingress"
# The live (user_config) part of the worker settings.
LIVE_FIELDS = ("max_batch", "preferred_batch", "max_wait_ms")
FAKE_KINDS = ("", "affine", "length")


def _from_mapping(cls: type[Any], args: Mapping[str, Any] | None) -> Any:
    args = dict(args or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} argument(s) {unknown}; valid: {sorted(names)}")
    return cls(**args)


@dataclasses.dataclass(frozen=True)
class ModelAppArgs(Settings):
    """Arguments of one model's application (the ``args`` of its ``ray_config.yaml`` entry).

    Attributes:
        model / version: served model and repository version (empty = latest).
        redis_url / namespace: where the model's stream lives (empty URL = local default).
        model_repo: model repository path; use an absolute path (replicas do not share the
            deploying shell's working directory).
        backend: ``onnx``, ``torch`` or empty (the manifest's format).
        fake: ``affine`` / ``length`` serves a built-in numpy fake instead of a model (tests,
            smoke checks); ``fake_delay_ms`` sleeps that long per batch.
        num_replicas: fixed replica count (ignored with ``autoscale``).
        max_batch / preferred_batch / max_wait_ms: batching (live: user_config).
        lease_s / block_ms / max_deliveries / drain_timeout_s: worker settings, as in
            :class:`~headrace.workers.settings.WorkerSettings`.
        worker_overrides: any other ``WorkerSettings`` field.
        tensor_parallel: ranks per replica (1 = plain). > 1 needs a torch MiniLM entry.
        num_cpus / num_gpus: resources per replica, and per rank with tensor parallelism.
        intra_op_threads: backend threads per replica / rank.
        max_replicas_per_node: 0 = no limit.
        autoscale: scale on stream backlog (:mod:`headrace.cluster.serve.autoscale`) between
            ``min_replicas`` and ``max_replicas``, ``target_backlog_per_replica`` entries
            each, after ``upscale_delay_s`` / ``downscale_delay_s`` seconds of agreement.
        health_check_period_s / health_check_timeout_s: Serve's replica health checks.
        unhealthy_grace_s: how long the loop may stay unhealthy (e.g. Redis down) before
            the health check fails and Serve replaces the replica.
        tp_timeout_s: tensor-parallel start-up and collective timeout.
        tp_backend: ``auto`` (NCCL when the replica has GPUs, else gloo), ``nccl``, ``gloo``.
    """

    model: str = "minilm"
    version: str = ""
    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    model_repo: str = "model_repo"
    backend: str = ""
    fake: str = ""
    fake_delay_ms: float = 0.0
    num_replicas: int = 1
    max_batch: int = 32
    preferred_batch: int = 0
    max_wait_ms: float = 5.0
    lease_s: float = 30.0
    block_ms: int = 1000
    max_deliveries: int = 3
    drain_timeout_s: float = 30.0
    worker_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_parallel: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    intra_op_threads: int = 1
    max_replicas_per_node: int = 0
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_backlog_per_replica: float = 64.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    unhealthy_grace_s: float = 30.0
    tp_timeout_s: float = 120.0
    tp_backend: str = "auto"

    def validate(self) -> None:
        validate_model_name(self.model)
        validate_namespace(self.namespace)
        require(self.fake in FAKE_KINDS, "fake", f"must be one of {list(FAKE_KINDS)} (empty = the real model)")
        require(self.fake_delay_ms >= 0, "fake_delay_ms", "must be >= 0 ms")
        require(self.num_replicas >= 1, "num_replicas", "must be >= 1 (use autoscale with min_replicas 0 to idle)")
        require(1 <= self.tensor_parallel <= 64, "tensor_parallel", "must be between 1 and 64 ranks")
        require(self.tensor_parallel == 1 or not self.fake, "tensor_parallel",
                "shards the torch MiniLM; it cannot be combined with a fake servable")
        require(self.tensor_parallel == 1 or self.backend in ("", "torch"), "tensor_parallel",
                "runs the torch backend; set backend to 'torch' or leave it empty")
        require(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus", "resources must be >= 0")
        require(self.intra_op_threads >= 0, "intra_op_threads", "must be >= 0 (0 = backend default)")
        require(self.max_replicas_per_node >= 0, "max_replicas_per_node", "must be >= 0 (0 = no limit)")
        require(self.health_check_period_s > 0 and self.health_check_timeout_s > 0, "health_check_period_s",
                "health check period and timeout must be > 0 s")
        require(self.unhealthy_grace_s >= 0, "unhealthy_grace_s", "must be >= 0 s")
        require(self.tp_timeout_s > 0, "tp_timeout_s", "must be > 0 s")
        require(self.tp_backend in ("auto", "nccl", "gloo"), "tp_backend",
                "must be auto (NCCL on GPU bundles, else gloo), nccl or gloo")
        direct = sorted(set(self.worker_overrides) & _DIRECT_WORKER_FIELDS)
        require(not direct, "worker_overrides", f"must not set {direct}: set them as app args directly")
        if self.autoscale:
            self.policy_settings()  # raises ConfigError for bad policy values
            lag_autoscaling_config(self.policy_settings(), min_replicas=self.min_replicas,
                                   max_replicas=self.max_replicas, upscale_delay_s=self.upscale_delay_s,
                                   downscale_delay_s=self.downscale_delay_s)
        self.worker_settings()  # every worker field validated now, not in a replica

    @classmethod
    def from_dict(cls, args: Mapping[str, Any] | None) -> ModelAppArgs:
        """Typed args from the YAML ``args`` mapping.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        return _from_mapping(cls, args)  # type: ignore[no-any-return]

    def worker_settings(self, consumer: str = "") -> WorkerSettings:
        """The worker settings of one replica (``consumer`` empty = per-process default).

        Raises:
            ConfigError: an invalid worker setting.
        """
        try:
            # from_env: fields the app args do not set (e.g. HEADRACE_ORT_SPIN) follow the
            # replica's environment, like a standalone worker's.
            return WorkerSettings.from_env(
                model=self.model, version=self.version, redis_url=self.redis_url, namespace=self.namespace,
                consumer=consumer, model_repo=self.model_repo, backend=self.backend, max_batch=self.max_batch,
                preferred_batch=self.preferred_batch, max_wait_ms=self.max_wait_ms, block_ms=self.block_ms,
                lease_s=self.lease_s, max_deliveries=self.max_deliveries, drain_timeout_s=self.drain_timeout_s,
                intra_op_threads=self.intra_op_threads, **self.worker_overrides)
        except TypeError as e:
            raise ConfigError(f"worker_overrides: {e}; valid names are the WorkerSettings fields") from e
        except ConfigError as e:
            if "unknown setting" in e.message:
                raise ConfigError(f"worker_overrides: {e.message}") from e
            raise

    def policy_settings(self) -> LagPolicySettings:
        group = str(self.worker_overrides.get("group", "") or LagPolicySettings.group)
        return LagPolicySettings(redis_url=self.redis_url, namespace=self.namespace, model=self.model,
                                 group=group, target_backlog_per_replica=self.target_backlog_per_replica)

    def user_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in LIVE_FIELDS}

    def bundles(self) -> list[dict[str, float]]:
        """One resource bundle per tensor-parallel rank (bundle 0 is the replica itself)."""
        bundle = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        return [dict(bundle) for _ in range(self.tensor_parallel)]

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for the worker deployment."""
        opts: dict[str, Any] = {
            "name": WORKER_DEPLOYMENT,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "user_config": self.user_config(),
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            # Serve force-kills a replica this long after asking it to stop; the drain in
            # __del__ must fit inside, or in-flight entries wait out their lease instead.
            "graceful_shutdown_timeout_s": self.drain_timeout_s + 10.0,
            "graceful_shutdown_wait_loop_s": 0.5,
            # Only admin calls (stats) come through Serve; the work comes from Redis.
            "max_ongoing_requests": 16,
        }
        if self.autoscale:
            opts["autoscaling_config"] = lag_autoscaling_config(
                self.policy_settings(), min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s)
        else:
            opts["num_replicas"] = self.num_replicas
        if self.tensor_parallel > 1:
            opts["placement_group_bundles"] = self.bundles()
            # All ranks of a group on one node: the all-reduces stay off the network.
            opts["placement_group_strategy"] = "STRICT_PACK"
        if self.max_replicas_per_node:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        return opts


@dataclasses.dataclass(frozen=True)
class IngressArgs(Settings):
    """Arguments of the HTTP ingress application.

    Attributes:
        redis_url / namespace: where requests are enqueued.
        timeout_s: longest wait for a result before answering 504.
        max_backlog: answer 429 when a model's backlog reaches this (0 = no check).
        num_replicas / num_cpus: ingress replicas and CPUs each.
        require_registered: answer 404 for a model no worker has registered (``<ns>:models``).
        api_keys: ``<caller>:<sha256 hex of the key>`` entries; any entry (here or in
            ``HEADRACE_INGRESS_API_KEYS``) turns API-key authentication on
            (:mod:`headrace.cluster.serve.auth`).
        max_body_bytes: largest request body (bytes); longer ones get 413.
        max_tickets: most calls one replica tracks (in flight, plus idempotent ones kept for
            retries); beyond it new calls get 429.
        idempotency_ttl_s: how long an answered idempotent call stays for retries (seconds).
    """

    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    timeout_s: float = 30.0
    max_backlog: int = 10_000
    num_replicas: int = 1
    num_cpus: float = 0.25
    require_registered: bool = True
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    max_tickets: int = 10_000
    idempotency_ttl_s: float = 600.0

    def validate(self) -> None:
        from headrace.cluster.serve.auth import parse_entries

        object.__setattr__(self, "api_keys", tuple(self.api_keys))  # YAML gives a list
        parse_entries(self.api_keys)
        require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024 bytes")
        require(self.max_tickets >= 1, "max_tickets", "must be >= 1")
        require(self.idempotency_ttl_s >= 0, "idempotency_ttl_s", "must be >= 0 s")
        validate_namespace(self.namespace)
        require(self.timeout_s > 0, "timeout_s", "must be > 0 s")
        require(self.max_backlog >= 0, "max_backlog", "must be >= 0 (0 disables the check)")
        require(self.num_replicas >= 1, "num_replicas", "must be >= 1")
        require(self.num_cpus >= 0, "num_cpus", "must be >= 0")

    @classmethod
    def from_dict(cls, args: Mapping[str, Any] | None) -> IngressArgs:
        """Raises: ConfigError for an unknown key or an invalid value."""
        return _from_mapping(cls, args)  # type: ignore[no-any-return]


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder of one model's stream workers (``import_path`` target).

    Raises:
        ConfigError: invalid ``args`` (the deploy fails with that message).
    """
    from headrace.cluster.serve.replica import StreamWorkerDeployment

    a = ModelAppArgs.from_dict(args)
    deployment: Any = StreamWorkerDeployment
    return deployment.options(**a.deployment_options()).bind(dataclasses.asdict(a))  # type: ignore[no-any-return]


def build_ingress(args: dict[str, Any]) -> Application:
    """Serve application builder of the HTTP ingress (``POST /v1/models/{model}/infer``).

    Raises:
        ConfigError: invalid ``args``.
    """
    from headrace.cluster.serve.ingress import IngressDeployment

    a = IngressArgs.from_dict(args)
    deployment: Any = IngressDeployment  # a serve.Deployment once decorated
    return deployment.options(  # type: ignore[no-any-return]
        name=INGRESS_DEPLOYMENT, num_replicas=a.num_replicas, ray_actor_options={"num_cpus": a.num_cpus},
    ).bind(dataclasses.asdict(a))


def app_config(args: ModelAppArgs, *, name: str | None = None) -> dict[str, Any]:
    """One ``applications:`` entry of a Serve config for ``args`` (what ``headrace up``
    and the tests deploy)."""
    return {"name": name or args.model, "route_prefix": None, "import_path": APP_BUILDER,
            "args": {k: v for k, v in dataclasses.asdict(args).items() if v != _DEFAULTS.get(k, object())}}


def ingress_config(args: IngressArgs, *, name: str = "http", route_prefix: str = "/") -> dict[str, Any]:
    """The ``applications:`` entry of the HTTP ingress."""
    return {"name": name, "route_prefix": route_prefix, "import_path": INGRESS_BUILDER,
            "args": dataclasses.asdict(args)}


def absolute_repo(args: dict[str, Any], base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``args`` with ``model_repo`` made absolute against ``base`` (default: cwd)."""
    out = dict(args)
    repo = str(out.get("model_repo") or "model_repo")
    if not os.path.isabs(repo):
        repo = os.path.abspath(os.path.join(base or os.getcwd(), repo))
    out["model_repo"] = repo
    return out


# WorkerSettings fields set from ModelAppArgs fields (or per replica): not overridable.
_DIRECT_WORKER_FIELDS = frozenset({
    "model", "version", "redis_url", "namespace", "consumer", "model_repo", "backend", "max_batch",
    "preferred_batch", "max_wait_ms", "block_ms", "lease_s", "max_deliveries", "drain_timeout_s",
    "intra_op_threads"})
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelAppArgs) if f.default is not dataclasses.MISSING}
