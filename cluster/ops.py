"""Operating the Ray Serve cluster: up, down, scale, deploy a version, replica status.

Deployments always go through a Serve *config* (``ray_config.yaml``, the same schema as
``serve deploy``), applied declaratively: ``scale`` and ``deploy`` read the deployed config,
change one field, and apply the whole config again, so the cluster converges to exactly
what the config says.

* ``scale MODEL N`` changes ``deployments[StreamWorker].num_replicas`` of the model's app:
  a lightweight update, existing replicas keep running.
* ``deploy MODEL --version V`` changes the app's ``args.version``: a new code version in
  Serve, so the replicas roll over (new ones start, old ones drain in ``__del__``); the
  queue keeps every request meanwhile.

Where the config goes (:class:`Deployer`): the Ray dashboard's REST API for a cluster
started by ``headrace up`` (:class:`DashboardDeployer`, what ``serve deploy`` uses), the
Serve controller of the Ray instance this process is connected to (:class:`LocalDeployer`,
what ``serve run config.yaml`` uses; tests and the demo), or memory (:class:`MemoryDeployer`,
unit tests).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from headrace.client.embedded_redis import EmbeddedRedis, free_port
from headrace.client.errors import BrokerError, ConfigError, HeadraceError

from .app import APP_BUILDER, WORKER_DEPLOYMENT, absolute_repo

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "ray_config.yaml"
STATE_FILE = "cluster.json"


def state_dir() -> Path:
    """Where ``headrace up`` keeps its state (``HEADRACE_STATE_DIR``, default ``~/.headrace``)."""
    return Path(os.environ.get("HEADRACE_STATE_DIR") or Path.home() / ".headrace")


# --- configs -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], *, redis_url: str | None = None,
                base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read a Serve config file and prepare it for deploying.

    For every application built by :func:`headrace.cluster.app.build_app` or
    ``build_ingress``: ``redis_url`` (when given) replaces ``args.redis_url``, and a relative
    ``args.model_repo`` is made absolute against ``base_dir`` (default: the config's folder),
    since replicas do not share the deploying shell's working directory.

    Raises:
        ConfigError: the file is missing or is not a valid Serve config.
    """
    import yaml

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
        if not str(app.get("import_path", "")).startswith("headrace.cluster.app:"):
            continue
        args = dict(app.get("args") or {})
        if redis_url:
            args["redis_url"] = redis_url
        if app["import_path"] == APP_BUILDER:
            args = absolute_repo(args, base_dir)
        app["args"] = args
    return out


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check the Serve schema and our builders' args without deploying.

    Raises:
        ConfigError: naming the application and the problem.
    """
    from ray.serve.schema import ServeDeploySchema

    from .app import INGRESS_BUILDER, IngressArgs, ModelAppArgs

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
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        try:
            self.client = ServeSubmissionClient(address)
        except Exception as e:  # noqa: BLE001 - connection errors of several libraries
            raise BrokerError(f"cannot reach the Ray dashboard at {address}: {e}") from e
        self.address = address

    def deploy(self, cfg: Mapping[str, Any]) -> None:
        self.client.deploy_applications(dict(cfg))

    def details(self) -> dict[str, Any]:
        return dict(self.client.get_serve_details())

    def delete_all(self) -> None:
        self.client.delete_applications()


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


def wait_running(deployer: Deployer, apps: list[str] | None = None, timeout_s: float = 180.0,
                 poll_s: float = 0.5) -> dict[str, Any]:
    """Wait until every (named) application is RUNNING; return the details.

    Raises:
        ConfigError: an application failed to deploy (its message included).
        BrokerError: not running within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        details = deployer.details()
        states = {name: a.get("status", "") for name, a in (details.get("applications") or {}).items()}
        wanted = apps if apps is not None else list(states)
        for name in wanted:
            if states.get(name) == "DEPLOY_FAILED":
                msg = details["applications"][name].get("message", "")
                raise ConfigError(f"application {name!r} failed to deploy: {msg[-2000:]}")
        if wanted and all(states.get(n) == "RUNNING" for n in wanted):
            return details
        last = states
        if time.monotonic() > deadline:
            raise BrokerError(f"applications not RUNNING after {timeout_s:.0f}s: {last}")
        time.sleep(poll_s)


def apply(deployer: Deployer, cfg: Mapping[str, Any], *, wait_s: float | None = 180.0) -> dict[str, Any]:
    """Validate, deploy and (unless ``wait_s`` is None) wait until every app runs.

    Raises:
        ConfigError, BrokerError: see :func:`validate_config` and :func:`wait_running`.
    """
    validate_config(cfg)
    deployer.deploy(cfg)
    if wait_s is None:
        return {}
    return wait_running(deployer, [a["name"] for a in cfg["applications"]], timeout_s=wait_s)


def scale(deployer: Deployer, model: str, replicas: int, *, wait_s: float | None = 180.0) -> dict[str, Any]:
    """Set the model's replica count (lightweight update). Raises ConfigError/BrokerError."""
    return apply(deployer, scaled(deployed_config(deployer), model, replicas), wait_s=wait_s)


def deploy_version(deployer: Deployer, model: str, version: str, *, wait_s: float | None = 300.0) -> dict[str, Any]:
    """Roll the model's replicas to repository ``version``. Raises ConfigError/BrokerError."""
    return apply(deployer, versioned(deployed_config(deployer), model, version), wait_s=wait_s)


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


def replicas(details: Mapping[str, Any]) -> list[ReplicaRow]:
    """Every replica of every application in Serve ``details``."""
    rows: list[ReplicaRow] = []
    for app_name, app in (details.get("applications") or {}).items():
        args = ((app.get("deployed_app_config") or {}).get("args") or {})
        for dep_name, dep in (app.get("deployments") or {}).items():
            for r in dep.get("replicas") or []:
                rows.append(ReplicaRow(
                    app=app_name, deployment=dep_name, replica_id=str(r.get("replica_id", "")),
                    state=str(getattr(r.get("state"), "value", r.get("state", ""))), node_id=str(r.get("node_id") or ""),
                    node_ip=str(r.get("node_ip") or ""), pid=r.get("pid"),
                    model=str(args.get("model", "")), version=str(args.get("version", "") or "latest")))
    return rows


def replica_table(rows: list[ReplicaRow], title: str = "Ray Serve replicas") -> Any:
    """A rich table of :func:`replicas`."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("app", "deployment", "replica", "state", "node", "pid", "model", "version"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.app, r.deployment, r.replica_id, r.state, (r.node_ip or r.node_id[:12]),
                  "" if r.pid is None else str(r.pid), r.model, r.version)
    return t


# --- headrace up / down --------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterState:
    """What ``headrace up`` started (``<state_dir>/cluster.json``)."""

    dashboard_url: str
    ray_address: str
    redis_url: str
    redis_pid: int | None
    metrics_port: int
    config_path: str
    started_ray: bool
    ray_pid: int | None = None

    def save(self, folder: Path | None = None) -> Path:
        folder = folder or state_dir()
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / STATE_FILE
        p.write_text(json.dumps(asdict(self), indent=2))
        return p

    @classmethod
    def load(cls, folder: Path | None = None) -> ClusterState | None:
        p = (folder or state_dir()) / STATE_FILE
        if not p.is_file():
            return None
        try:
            return cls(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"{p} is unreadable ({e}); delete it and run `headrace down`") from e


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.is_file() else "ray"


def connect(dashboard_url: str | None = None) -> DashboardDeployer:
    """A deployer for the running cluster: ``dashboard_url``, else ``RAY_DASHBOARD_ADDRESS``,
    else the one ``headrace up`` recorded.

    Raises:
        ConfigError: no cluster is known. BrokerError: the dashboard does not answer.
    """
    url = dashboard_url or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not url:
        st = ClusterState.load()
        if st is None:
            raise ConfigError("no cluster: run `headrace up` (or set RAY_DASHBOARD_ADDRESS)")
        url = st.dashboard_url
    return DashboardDeployer(url)


def up(config_path: str | os.PathLike[str] = DEFAULT_CONFIG, *, redis_url: str | None = None,
       num_cpus: int | None = None, dashboard_port: int = 8265, metrics_port: int = 0,
       wait_s: float = 300.0, say: Any = print) -> ClusterState:
    """Start local Ray (head node with dashboard), Redis when no URL is given, and deploy
    the config. Returns what was started (also saved for ``down``/``scale``/``deploy``).

    Raises:
        ConfigError: a cluster is already recorded, or the config is invalid.
        BrokerError: Ray or Redis did not start, or the apps did not come up.
    """
    if ClusterState.load() is not None:
        raise ConfigError(f"a cluster is already up (see {state_dir() / STATE_FILE}); run `headrace down` first")
    cfg = load_config(config_path)  # fail on a bad config before starting anything
    redis_url = redis_url or os.environ.get("HEADRACE_REDIS_URL") or None
    redis_pid: int | None = None
    if not redis_url:
        data = state_dir() / "redis"
        data.mkdir(parents=True, exist_ok=True)
        server = EmbeddedRedis(data_dir=data, appendonly=True).start()
        # Left running on purpose (own session): it outlives this command; `down` stops it.
        redis_url, redis_pid = server.url, server.proc.pid if server.proc else None
        say(f"Redis: started a private redis-server at {redis_url} (data in {data})")
    cfg = prepare_config(cfg, redis_url=redis_url)
    metrics_port = metrics_port or free_port()
    # Ray's GCS defaults to port 6379, Redis' own port: pick a free one.
    gcs_port = free_port()
    cmd = [_ray_cli(), "start", "--head", "--block", f"--port={gcs_port}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--metrics-export-port={metrics_port}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "ray-head.log"
    # --block in its own session: every Ray process of this cluster shares the process
    # group, so `down` stops exactly this cluster (`ray stop` would kill every Ray
    # instance of the user on the machine).
    with open(log_path, "ab") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    state = ClusterState(dashboard_url=dashboard, ray_address=f"127.0.0.1:{gcs_port}", redis_url=redis_url, redis_pid=redis_pid,
                         metrics_port=metrics_port, config_path=str(Path(config_path).resolve()),
                         started_ray=True, ray_pid=head.pid)
    state.save()
    try:
        deployer = _wait_dashboard(dashboard, head, log_path, timeout_s=180.0)
    except HeadraceError:
        down(say=lambda *_: None)
        raise
    say(f"Ray: head node up; dashboard {dashboard} (Serve tab: replicas; Metrics: Prometheus on :{metrics_port})")
    apply(deployer, cfg, wait_s=wait_s)
    say(f"Serve: deployed {[a['name'] for a in cfg['applications']]} from {config_path}")
    return state


def _wait_dashboard(url: str, head: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> DashboardDeployer:
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            raise BrokerError(f"`ray start` exited with {head.returncode}: {tail}")
        try:
            return DashboardDeployer(url)
        except HeadraceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _kill(pid: int, *, group: bool = False, grace_s: float = 10.0) -> None:
    """SIGTERM ``pid`` (its whole process group with ``group``), SIGKILL after ``grace_s``."""
    def send(sig: int) -> bool:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    if not send(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not send(0):
            return
        time.sleep(0.2)
    send(signal.SIGKILL)


def down(*, say: Any = print) -> bool:
    """Delete the apps (replicas drain), stop Ray and the Redis ``up`` started.

    Returns False when no cluster was recorded.
    """
    state = ClusterState.load()
    if state is None:
        say("no cluster recorded; nothing to stop")
        return False
    try:
        DashboardDeployer(state.dashboard_url).delete_all()
        say("Serve: applications deleted (replicas drained)")
    except Exception as e:  # noqa: BLE001 - the cluster may be half gone already
        say(f"Serve: could not delete applications ({e}); stopping Ray anyway")
    if state.started_ray and state.ray_pid:
        _kill(state.ray_pid, group=True, grace_s=20.0)
        say("Ray: stopped")
    if state.redis_pid:
        _kill(state.redis_pid)
        say("Redis: stopped")
    (state_dir() / STATE_FILE).unlink(missing_ok=True)
    return True


# --- in-process serving (the demo) ---------------------------------------------------------


def serve_locally(settings: Any, replicas: int = 1, *, num_cpus: int | None = None,
                  wait_s: float = 300.0) -> tuple[str, Any]:
    """Serve ``settings.model`` on a private local Ray instance started in this process
    (no dashboard, no HTTP proxy), through :func:`headrace.cluster.app.build_app`.

    Args:
        settings: :class:`~headrace.workers.settings.WorkerSettings` of the model.
        replicas: stream-worker replicas.

    Returns:
        ``(description, stop)``; ``stop()`` deletes the app (replicas drain) and stops Ray.

    Raises:
        ConfigError: the app failed to deploy (e.g. the model does not load).
        BrokerError: it did not come up within ``wait_s``.
        Exception: whatever ``ray.init`` raises when Ray cannot start here.
    """
    import ray
    from ray import serve

    from .app import ModelAppArgs, app_config

    args = ModelAppArgs(
        model=settings.model, version=settings.version, redis_url=settings.redis_url,
        namespace=settings.namespace, model_repo=os.path.abspath(settings.model_repo), backend=settings.backend,
        num_replicas=replicas, max_batch=settings.max_batch, preferred_batch=settings.preferred_batch,
        max_wait_ms=settings.max_wait_ms, lease_s=settings.lease_s, block_ms=settings.block_ms,
        max_deliveries=settings.max_deliveries, drain_timeout_s=settings.drain_timeout_s,
        intra_op_threads=settings.intra_op_threads or 1, num_cpus=0.5)
    ray.init(num_cpus=num_cpus or max(2, replicas), include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    def stop() -> None:
        try:
            serve.shutdown()  # deletes the apps: replicas drain in __del__
        finally:
            ray.shutdown()

    try:
        apply(LocalDeployer(proxy_location="Disabled"), {"applications": [app_config(args)]}, wait_s=wait_s)
    except BaseException:
        stop()
        raise
    return f"{replicas} Ray Serve replica(s) of {settings.model!r} on a local Ray instance", stop


def build_models(cfg: Mapping[str, Any], *, say: Any = print) -> list[str]:
    """Build the stock MiniLM entries (``minilm``, ``minilm-torch``) that the config's apps
    serve and the repository lacks (cached builds are reused). Returns what was ensured.

    Raises:
        ModelNotFoundError: the MiniLM weights package is not installed.
    """
    from headrace.models.build import MINILM_NAME, MINILM_TORCH_NAME, ensure_minilm

    done: list[str] = []
    for app in cfg.get("applications", []):
        args = app.get("args") or {}
        if app.get("import_path") != APP_BUILDER or args.get("fake"):
            continue
        model = args.get("model", "minilm")
        if model not in (MINILM_NAME, MINILM_TORCH_NAME):
            continue
        repo = str(args.get("model_repo") or "model_repo")
        say(f"Models: making sure {model!r} is in {repo} …")
        m = ensure_minilm(repo, torch_format=model == MINILM_TORCH_NAME)
        done.append(f"{m.name}/{m.version}")
    return done
