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
the typed, eagerly validated args of :mod:`headrace.cluster.serve.args`, so a typo in the
config fails the deploy with a message naming the arg.

What is live and what restarts replicas: the live worker settings (``max_batch``,
``preferred_batch``, ``max_wait_ms``) travel as the deployment's ``user_config`` (changed in
place through ``reconfigure``); every other argument is part of the app's code version in
Serve, so changing it (e.g. ``version``) rolls the replicas over: new ones start, old ones
drain.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Final

from headrace.cluster.serve.args import (
    WORKER_DEPLOYMENT,
    IngressArgs,
    ModelAppArgs,
    absolute_repo,
)

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["APP_BUILDER", "INGRESS_BUILDER", "INGRESS_DEPLOYMENT", "WORKER_DEPLOYMENT", "IngressArgs", "ModelAppArgs",
           "app_config", "build_app", "build_ingress", "ingress_config", "with_absolute_repo"]

INGRESS_DEPLOYMENT: Final = "Ingress"
APP_BUILDER: Final = "headrace.cluster.serve.app:build_app"
INGRESS_BUILDER: Final = "headrace.cluster.serve.app:build_ingress"


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder of one model's stream workers (``import_path`` target).

    A relative ``model_repo`` is made absolute here (see :func:`absolute_repo`), so every
    replica gets the same path whatever its working directory.

    Raises:
        ConfigError: invalid ``args`` (the deploy fails with that message).
    """
    from headrace.cluster.serve.replica import StreamWorkerDeployment

    a = ModelAppArgs.from_dict(with_absolute_repo(args))
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
    and the tests deploy); args at their default are left out."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelAppArgs) if f.default is not dataclasses.MISSING}
    return {"name": name or args.model, "route_prefix": None, "import_path": APP_BUILDER,
            "args": {k: v for k, v in dataclasses.asdict(args).items() if v != defaults.get(k, object())}}


def ingress_config(args: IngressArgs, *, name: str = "http", route_prefix: str = "/") -> dict[str, Any]:
    """The ``applications:`` entry of the HTTP ingress."""
    return {"name": name, "route_prefix": route_prefix, "import_path": INGRESS_BUILDER,
            "args": dataclasses.asdict(args)}


def with_absolute_repo(args: dict[str, Any], base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``args`` with ``model_repo`` made absolute (see :func:`absolute_repo`)."""
    return {**args, "model_repo": absolute_repo(str(args.get("model_repo") or ""), base)}
