"""Serve configs and where they go: reading/validating ``ray_config.yaml``, the pure
transformations behind ``scale`` / ``deploy`` (each returns a new whole config), the
:class:`Deployer` interface with its dashboard, in-process and in-memory implementations,
and the replica table of ``headrace status``.

Configs are always applied whole and declaratively (apps missing from a config are deleted),
exactly like ``serve deploy``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from headrace.client.errors import BrokerError, ConfigError
from headrace.client.optional import require
from headrace.cluster.serve.app import APP_BUILDER, WORKER_DEPLOYMENT, with_absolute_repo

log = logging.getLogger(__name__)

# --- configs -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], *, redis_url: str | None = None,
                base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a Serve config file and prepare it for deploying.

    For every application built by :func:`headrace.cluster.serve.app.build_app` or
    ``build_ingress``: ``redis_url`` (when given) replaces ``args.redis_url``, and a relative
    ``args.model_repo`` is made absolute against ``base_dir`` (default: the config's folder),
    since replicas do not share the deploying shell's working directory.

    Raises:
        ConfigError: the file is missing or is not a valid Serve config.
    """
    yaml = require("yaml", "ray", purpose="reading a Serve config")

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read Serve config {p}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("applications"), list):
        raise ConfigError(f"{p} is not a Serve config: it needs an 'applications:' list")
    cfg = prepare_config(raw, redis_url=redis_url, base_dir=base_dir or p.resolve().parent)
    validate_config(cfg)
    return cfg


def prepare_config(cfg: Mapping[str, Any], *, redis_url: str | None = None,
                   base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A copy of ``cfg`` with the Redis URL and absolute model repositories filled in."""
    out = copy.deepcopy(dict(cfg))
    for app in out.get("applications", []):
        if not str(app.get("import_path", "")).startswith("headrace.cluster.serve.app:"):
            continue
        args = dict(app.get("args") or {})
        if redis_url:
            args["redis_url"] = redis_url
        if app["import_path"] == APP_BUILDER:
            args = with_absolute_repo(args, base_dir)
        app["args"] = args
    return out


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check the Serve schema and our builders' args without deploying.

    Raises:
        ConfigError: naming the application and the problem.
    """
    ServeDeploySchema = require("ray.serve.schema", "ray", purpose="validating a Serve config").ServeDeploySchema

    from headrace.cluster.serve.app import INGRESS_BUILDER, IngressArgs, ModelAppArgs

    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as e:  # noqa: BLE001 - pydantic ValidationError and friends
        raise ConfigError(f"invalid Serve config: {e}") from e
    for app in cfg.get("applications", []):
        try:
            if app.get("import_path") == APP_BUILDER:
                ModelAppArgs.from_dict(app.get("args"))
            elif app.get("import_path") == INGRESS_BUILDER:
                IngressArgs.from_dict(app.get("args"))
        except ConfigError as e:
            raise ConfigError(f"application {app.get('name')!r}: {e.message}") from e


def find_model_app(cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The application entry serving ``model`` (by ``args.model``, else by app name).

    Raises:
        ConfigError: no application serves it.
    """
    apps = [a for a in cfg.get("applications", []) if a.get("import_path") == APP_BUILDER]
    for app in apps:
        if (app.get("args") or {}).get("model", "minilm") == model:
            return dict(app)
    for app in apps:
        if app.get("name") == model:
            return dict(app)
    raise ConfigError(f"no deployed application serves model {model!r}; "
                      f"apps: {[a.get('name') for a in cfg.get('applications', [])]}")


def with_app(cfg: Mapping[str, Any], app: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with the application named like ``app`` replaced by it."""
    out = copy.deepcopy(dict(cfg))
    out["applications"] = [dict(app) if a.get("name") == app.get("name") else a for a in out["applications"]]
    return out


def scaled(cfg: Mapping[str, Any], model: str, replicas: int) -> dict[str, Any]:
    """``cfg`` with the model's worker deployment at ``replicas`` replicas.

    Raises:
        ConfigError: unknown model, ``replicas`` < 1, or the app autoscales (change its
            ``min_replicas``/``max_replicas`` or set ``autoscale: false`` instead).
    """
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    app = find_model_app(cfg, model)
    if (app.get("args") or {}).get("autoscale"):
        raise ConfigError(f"model {model!r} autoscales on its backlog; change min_replicas/max_replicas "
                          "in its args (or set autoscale: false) instead of scaling by hand")
    deployments = [dict(d) for d in app.get("deployments") or [] if d.get("name") != WORKER_DEPLOYMENT]
    deployments.append({"name": WORKER_DEPLOYMENT, "num_replicas": replicas})
    app["deployments"] = deployments
    return with_app(cfg, app)


def versioned(cfg: Mapping[str, Any], model: str, version: str) -> dict[str, Any]:
    """``cfg`` with the model's app serving repository ``version`` (a rolling update).

    Raises:
        ConfigError: unknown model.
    """
    app = find_model_app(cfg, model)
    app["args"] = {**(app.get("args") or {}), "version": str(version)}
    return with_app(cfg, app)


# --- where configs go ----------------------------------------------------------------------


class Deployer(Protocol):
    """Applies Serve configs and reports what runs."""

    def deploy(self, cfg: Mapping[str, Any]) -> None:
        """Apply ``cfg`` (all applications; apps missing from it are deleted)."""

    def details(self) -> dict[str, Any]:
        """Serve instance details (the ``GET /api/serve/applications/`` document)."""

    def delete_all(self) -> None:
        """Delete every application."""


def deployed_config(deployer: Deployer) -> dict[str, Any]:
    """The config currently applied, rebuilt from the deployed applications.

    Raises:
        ConfigError: nothing was deployed from a config.
    """
    apps = []
    for app in (deployer.details().get("applications") or {}).values():
        cfg = app.get("deployed_app_config")
        if cfg:
            apps.append(cfg)
    if not apps:
        raise ConfigError("no Serve applications were deployed from a config; run `headrace up` first")
    return {"applications": apps}


class DashboardDeployer:
    """Through the Ray dashboard's Serve REST API (as ``serve deploy`` does).

    Args:
        address: dashboard URL, e.g. ``http://127.0.0.1:8265``.
    """

    def __init__(self, address: str) -> None:
        sdk = require("ray.dashboard.modules.serve.sdk", "ray", purpose="the Ray dashboard client")

        _use_ray_token_if_present()
        try:
            self.client = sdk.ServeSubmissionClient(address)
        except Exception as e:  # noqa: BLE001 - connection errors of several libraries
            raise BrokerError(f"cannot reach the Ray dashboard at {address}: {e}") from e
        self.address = address

    def deploy(self, cfg: Mapping[str, Any]) -> None:
        self.client.deploy_applications(dict(cfg))

    def details(self) -> dict[str, Any]:
        return dict(self.client.get_serve_details())

    def delete_all(self) -> None:
        self.client.delete_applications()


def _use_ray_token_if_present() -> None:
    """Send Ray's auth token (``~/.ray/auth_token``) when one exists.

    Clusters started by ``ray start`` in Ray >= 2.52 require a token on the dashboard's
    REST API by default, but a plain client process only sends it when ``RAY_AUTH_MODE``
    is ``token``; this is what ``ray start``/``ray.init`` do for themselves (private API,
    hence the guard).
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it warns "token auth is enabled" on every call
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            quiet.setLevel(level)
    except Exception as e:  # noqa: BLE001 - older/newer Ray without this helper: go on without
        log.debug("ray token auth helper unavailable: %s", e)


class LocalDeployer:
    """Through the Serve controller of the Ray instance this process is connected to
    (``ray.init`` first), as ``serve run config.yaml`` does.

    Args:
        http_options: Serve HTTP proxy options used if Serve is not running yet.
        proxy_location: ``HeadOnly``, ``EveryNode`` or ``Disabled`` (same condition).
    """

    def __init__(self, http_options: Mapping[str, Any] | None = None, proxy_location: str = "HeadOnly") -> None:
        self.http_options = dict(http_options or {})
        self.proxy_location = proxy_location
        self._c: Any = None

    def _client(self) -> Any:
        from ray.serve._private.api import serve_start

        if self._c is None:
            self._c = serve_start(http_options=self.http_options, proxy_location=self.proxy_location)
        return self._c

    def deploy(self, cfg: Mapping[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self._client().deploy_apps(ServeDeploySchema.model_validate(dict(cfg)), _blocking=False)

    def details(self) -> dict[str, Any]:
        return dict(self._client().get_serve_details())

    def delete_all(self) -> None:
        self._client().delete_all_apps(blocking=True)


@dataclass
class MemoryDeployer:
    """Keeps the last config and fabricates details from it (unit tests)."""

    applied: list[dict[str, Any]] = field(default_factory=list)

    def deploy(self, cfg: Mapping[str, Any]) -> None:
        self.applied.append(copy.deepcopy(dict(cfg)))

    def details(self) -> dict[str, Any]:
        if not self.applied:
            return {"applications": {}}
        return {"applications": {a["name"]: {"status": "RUNNING", "deployed_app_config": a, "deployments": {}}
                                 for a in self.applied[-1]["applications"]}}

    def delete_all(self) -> None:
        self.applied.append({"applications": []})


@dataclass(frozen=True)
class ReplicaRow:
    """One replica as ``headrace status`` shows it."""

    app: str
    deployment: str
    replica_id: str
    state: str
    node_id: str
    node_ip: str
    pid: int | None
    model: str
    version: str
    deployed: str = ""


def replicas(details: Mapping[str, Any], served: Mapping[tuple[str, int], str] | None = None) -> list[ReplicaRow]:
    """Every replica of every application in Serve ``details``.

    ``version`` is what the replica's worker registered (``served``: ``{(model, pid):
    version}`` from the registry), ``?`` while it has not registered (starting, or unknown
    without ``served``); ``deployed`` is what the app's config asks for (``latest`` when unset).
    """
    rows: list[ReplicaRow] = []
    for app_name, app in (details.get("applications") or {}).items():
        deployed = app.get("deployed_app_config") or {}
        args = deployed.get("args") or {}
        # A model app's config may leave model at its default (ModelAppArgs.model).
        model = str(args.get("model", "minilm" if deployed.get("import_path") == APP_BUILDER else ""))
        for dep_name, dep in (app.get("deployments") or {}).items():
            for r in dep.get("replicas") or []:
                pid = r.get("pid")
                rows.append(ReplicaRow(
                    app=app_name, deployment=dep_name, replica_id=str(r.get("replica_id", "")),
                    state=str(getattr(r.get("state"), "value", r.get("state", ""))), node_id=str(r.get("node_id") or ""),
                    node_ip=str(r.get("node_ip") or ""), pid=pid, model=model,
                    version=(served or {}).get((model, int(pid or 0)), "?") if dep_name != "Ingress" else "",
                    deployed=str(args.get("version", "") or "latest") if model else ""))
    return rows


def app_problems(details: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(app, status, message)`` of every application that is not RUNNING (a failed or
    ongoing deploy, an unhealthy deployment), with its deployments' messages."""
    out = []
    for name, app in (details.get("applications") or {}).items():
        status = str(getattr(app.get("status"), "value", app.get("status", "")))
        if status == "RUNNING":
            continue
        msgs = [str(app.get("message") or "")] + [f"{d}: {info.get('message')}" for d, info in
                                                  (app.get("deployments") or {}).items() if info.get("message")]
        out.append((str(name), status, " | ".join(m for m in msgs if m)[-600:]))
    return out


def problems_table(problems: list[tuple[str, str, str]]) -> Any:
    """A rich table of :func:`app_problems`."""
    from rich.table import Table

    t = Table(title="[red]Applications not running[/] (failed or ongoing deploys)")
    for col in ("app", "status", "message"):
        t.add_column(col)
    for app, status, msg in problems:
        t.add_row(app, f"[red]{status}[/]" if "FAIL" in status or "UNHEALTHY" in status else status, msg)
    return t


def replica_table(rows: list[ReplicaRow], title: str = "Ray Serve replicas") -> Any:
    """A rich table of :func:`replicas`."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("app", "deployment", "replica", "state", "node", "pid", "model", "serves", "deployed"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.app, r.deployment, r.replica_id, r.state, (r.node_ip or r.node_id[:12]),
                  "" if r.pid is None else str(r.pid), r.model, r.version, r.deployed)
    return t
