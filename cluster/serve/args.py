"""Typed arguments of the Ray Serve applications (the ``args`` of a ``ray_config.yaml``
entry), validated eagerly so a typo fails the deploy with a message naming the arg.

:class:`ModelAppArgs` is derived from :class:`~headrace.workers.settings.WorkerSettings`:
every settings field marked ``app_arg`` is a typed arg of the same name, type and default
(its ``app_default`` where it differs), every other field goes in ``worker_overrides``; the
live fields form the deployment's ``user_config``. Only what concerns Serve itself
(replicas, resources, autoscaling, health checks, tensor parallelism, fakes) is declared here.

Resolution, the same as for a standalone worker: an empty ``redis_url`` means
``HEADRACE_REDIS_URL`` in the replica's environment, else ``redis://127.0.0.1:6379/0``;
settings not given as args follow the replica's ``HEADRACE_*`` variables. A relative
``model_repo`` is resolved when the application is built: against ``HEADRACE_MODEL_REPO_BASE``
when set, else the working directory of the process that builds it (``headrace up`` and
``headrace deploy`` first make it absolute against the config file's folder).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from headrace.client.config import DEFAULT_NAMESPACE, Settings, resolve_redis_url, validate_namespace
from headrace.client.errors import ConfigError
from headrace.cluster.serve.autoscale import LagPolicySettings, lag_autoscaling_config
from headrace.workers.backends.fake import FAKE_KINDS
from headrace.workers.settings import UNSET, WorkerSettings, infos, live_fields

WORKER_DEPLOYMENT: Final = "StreamWorker"
MODEL_REPO_BASE_ENV: Final = "HEADRACE_MODEL_REPO_BASE"
#: the worker settings that are typed application args (the others: ``worker_overrides``).
APP_WORKER_FIELDS: Final = tuple(info.name for _, info in infos() if info.app_arg)


def require_arg(cond: bool, name: str, message: str) -> None:
    """Raise :class:`ConfigError` naming the application arg ``name`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{name}: {message} (application arg '{name}' in the Serve config)")


def _from_mapping(cls: type[Any], args: Mapping[str, Any] | None) -> Any:
    args = dict(args or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} argument(s) {unknown}; valid: {sorted(names)}")
    return cls(**args)


def absolute_repo(repo: str, base: str | os.PathLike[str] | None = None) -> str:
    """``repo`` made absolute against ``base``, else ``HEADRACE_MODEL_REPO_BASE``, else
    the working directory."""
    repo = repo or "model_repo"
    if os.path.isabs(repo):
        return repo
    return os.path.abspath(os.path.join(base or os.environ.get(MODEL_REPO_BASE_ENV) or os.getcwd(), repo))


@dataclasses.dataclass(frozen=True)
class _ServeArgs(Settings):
    """The Serve part of :class:`ModelAppArgs` (see its doc for the worker part).

    Attributes:
        fake: ``affine`` / ``length`` serves a built-in numpy fake instead of a model (tests,
            smoke checks); ``fake_delay_ms`` sleeps that long per batch.
        num_replicas: fixed replica count (ignored with ``autoscale``).
        worker_overrides: any other ``WorkerSettings`` field (those not typed args).
        tensor_parallel: ranks per replica (1 = plain). > 1 needs a torch MiniLM entry.
        num_cpus / num_gpus: resources per replica, and per rank with tensor parallelism.
        max_replicas_per_node: 0 = no limit.
        autoscale: scale on stream backlog (:mod:`headrace.cluster.serve.autoscale`) between
            ``min_replicas`` and ``max_replicas``, ``target_backlog_per_replica`` samples
            each, after ``upscale_delay_s`` / ``downscale_delay_s`` seconds of agreement.
        health_check_period_s / health_check_timeout_s: Serve's replica health checks.
        unhealthy_grace_s: how long the loop may stay unhealthy (e.g. Redis down) before
            the health check fails and Serve replaces the replica. A worker whose internal
            task died fails the health check at once.
        tp_timeout_s: tensor-parallel start-up and collective timeout.
        tp_backend: ``auto`` (NCCL when the replica has GPUs, else gloo), ``nccl``, ``gloo``.
    """

    fake: str = ""
    fake_delay_ms: float = 0.0
    num_replicas: int = 1
    worker_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_parallel: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
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

    if TYPE_CHECKING:  # the WorkerSettings fields added by _derive(): model, max_batch, ...
        def __getattr__(self, name: str) -> Any: ...

    def validate(self) -> None:
        self._validate_serve()
        overlap = sorted(set(self.worker_overrides) & set(APP_WORKER_FIELDS))
        require_arg(not overlap, "worker_overrides", f"must not set {overlap}: set them as app args directly")
        if self.autoscale:
            lag_autoscaling_config(self.policy_settings(), min_replicas=self.min_replicas,
                                   max_replicas=self.max_replicas, upscale_delay_s=self.upscale_delay_s,
                                   downscale_delay_s=self.downscale_delay_s)
        self.worker_settings()  # every worker field validated now, not in a replica

    def _validate_serve(self) -> None:
        require_arg(self.fake in ("", *FAKE_KINDS), "fake",
                    f"must be one of {list(FAKE_KINDS)} or empty (the real model)")
        require_arg(self.fake_delay_ms >= 0, "fake_delay_ms", "must be >= 0 ms")
        require_arg(self.num_replicas >= 1, "num_replicas",
                    "must be >= 1 (use autoscale with min_replicas 0 to idle)")
        require_arg(1 <= self.tensor_parallel <= 64, "tensor_parallel", "must be between 1 and 64 ranks")
        require_arg(self.tensor_parallel == 1 or not self.fake, "tensor_parallel",
                    "shards the torch MiniLM; it cannot be combined with a fake servable")
        require_arg(self.tensor_parallel == 1 or self.backend in ("", "torch"), "tensor_parallel",
                    "runs the torch backend; set backend to 'torch' or leave it empty")
        require_arg(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus", "resources must be >= 0")
        require_arg(self.max_replicas_per_node >= 0, "max_replicas_per_node", "must be >= 0 (0 = no limit)")
        require_arg(self.health_check_period_s > 0 and self.health_check_timeout_s > 0, "health_check_period_s",
                    "health check period and timeout must be > 0 s")
        require_arg(self.unhealthy_grace_s >= 0, "unhealthy_grace_s", "must be >= 0 s")
        require_arg(self.tp_timeout_s > 0, "tp_timeout_s", "must be > 0 s")
        require_arg(self.tp_backend in ("auto", "nccl", "gloo"), "tp_backend",
                    "must be auto (NCCL on GPU bundles, else gloo), nccl or gloo")

    @classmethod
    def from_dict(cls, args: Mapping[str, Any] | None) -> Any:
        """Typed args from the YAML ``args`` mapping.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        return _from_mapping(cls, args)

    @classmethod
    def from_worker_settings(cls, settings: WorkerSettings, **serve: Any) -> Any:
        """The args that serve ``settings`` (every field that differs from the app
        default), plus the ``serve`` args.

        Raises:
            ConfigError: an invalid value.
        """
        args: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for f, info in infos():
            value = getattr(settings, f.name)
            if f.name == "consumer":
                continue
            if info.app_arg:
                if value != defaults.get(f.name):
                    args[f.name] = value
            elif value != f.default:
                overrides[f.name] = value
        return cls(**args, **serve, worker_overrides=overrides)

    def worker_settings(self, consumer: str = "") -> WorkerSettings:
        """The worker settings of one replica (``consumer`` empty = per-process default);
        fields the args leave empty or unset follow the replica's ``HEADRACE_*`` variables.

        Raises:
            ConfigError: an invalid worker setting.
        """
        direct = {name: getattr(self, name) for name in APP_WORKER_FIELDS}
        direct["redis_url"] = direct["redis_url"] or None
        try:
            return WorkerSettings.from_env(**direct, consumer=consumer, **self.worker_overrides)
        except TypeError as e:
            raise ConfigError(f"worker_overrides: {e}; valid names are the WorkerSettings fields") from e
        except ConfigError as e:
            if "unknown setting" in e.message:
                raise ConfigError(f"worker_overrides: {e.message}") from e
            raise

    def policy_settings(self) -> LagPolicySettings:
        group = str(self.worker_overrides.get("group", "") or LagPolicySettings.group)
        return LagPolicySettings(redis_url=self.redis_url, namespace=self.namespace, model=self.model,
                                 group=group, target_backlog_per_replica=self.target_backlog_per_replica,
                                 partitions=self.partitions,
                                 redis_cluster=bool(self.worker_overrides.get("redis_cluster", False)))

    def user_config(self) -> dict[str, Any]:
        """The live worker settings: the deployment's ``user_config``."""
        return {name: getattr(self, name) for name in live_fields()}

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


def _derive() -> type[_ServeArgs]:
    """:class:`ModelAppArgs`: the Serve args plus one typed field per ``app_arg`` worker
    setting (same type, default, metadata)."""
    hints = typing.get_type_hints(WorkerSettings)
    fields: list[tuple[str, Any, Any]] = []
    for f, info in infos():
        if info.app_arg:
            default = f.default if info.app_default is UNSET else info.app_default
            fields.append((f.name, hints[f.name], dataclasses.field(default=default, metadata=f.metadata)))
    cls = dataclasses.make_dataclass("ModelAppArgs", fields, bases=(_ServeArgs,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = ("Arguments of one model's application (the ``args`` of its ``ray_config.yaml`` entry): "
                   "the app_arg worker settings (model, version, redis_url, namespace, model_repo, backend, "
                   "batching, lease_s, ...) and the Serve args of the base class.")
    return cls


if TYPE_CHECKING:
    ModelAppArgs = _ServeArgs
else:
    ModelAppArgs = _derive()


@dataclasses.dataclass(frozen=True)
class IngressArgs(Settings):
    """Arguments of the HTTP ingress application.

    Attributes:
        redis_url / namespace: where requests are enqueued (empty URL: ``HEADRACE_REDIS_URL``
            in the replica's environment, else the default).
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
        require_arg(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024 bytes")
        require_arg(self.max_tickets >= 1, "max_tickets", "must be >= 1")
        require_arg(self.idempotency_ttl_s >= 0, "idempotency_ttl_s", "must be >= 0 s")
        validate_namespace(self.namespace)
        require_arg(self.timeout_s > 0, "timeout_s", "must be > 0 s")
        require_arg(self.max_backlog >= 0, "max_backlog", "must be >= 0 (0 disables the check)")
        require_arg(self.num_replicas >= 1, "num_replicas", "must be >= 1")
        require_arg(self.num_cpus >= 0, "num_cpus", "must be >= 0")

    @property
    def effective_redis_url(self) -> str:
        """The URL the ingress connects to (resolved in the replica's environment)."""
        return resolve_redis_url(self.redis_url)

    @classmethod
    def from_dict(cls, args: Mapping[str, Any] | None) -> IngressArgs:
        """Raises: ConfigError for an unknown key or an invalid value."""
        return _from_mapping(cls, args)  # type: ignore[no-any-return]
