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

Where the config goes (:class:`~headrace.cluster.serve.config.Deployer`): the Ray
dashboard's REST API for a cluster started by ``headrace up``, the Serve controller of the
Ray instance this process is connected to (tests, the demo), or memory (unit tests); the
config handling itself lives in :mod:`headrace.cluster.serve.config` and is re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from headrace.client.errors import BrokerError, ConfigError, HeadraceError
from headrace.client.optional import require
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_ports
from headrace.cluster.ops.versions import check_version
from headrace.cluster.serve.app import APP_BUILDER
from headrace.cluster.serve.config import (
    DashboardDeployer,
    Deployer,
    LocalDeployer,
    MemoryDeployer,
    ReplicaRow,
    app_problems,
    deployed_config,
    find_model_app,
    load_config,
    prepare_config,
    problems_table,
    replica_table,
    replicas,
    scaled,
    validate_config,
    versioned,
    with_app,
)

__all__ = [
    "ClusterState", "DashboardDeployer", "Deployer", "LocalDeployer", "MemoryDeployer", "ReplicaRow", "app_problems",
    "apply", "problems_table",
    "build_models", "check_version", "connect", "deploy_version", "deployed_config", "down", "find_model_app", "load_config",
    "prepare_config", "replica_table", "replicas", "scale", "scaled", "serve_locally", "state_dir", "up",
    "validate_config", "versioned", "wait_running", "with_app",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "ray_config.yaml"
STATE_FILE = "cluster.json"


def state_dir() -> Path:
    """Where ``headrace up`` keeps its state (``HEADRACE_STATE_DIR``, default ``~/.headrace``)."""
    return Path(os.environ.get("HEADRACE_STATE_DIR") or Path.home() / ".headrace")


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
                app = details["applications"][name]
                msgs = [app.get("message", "")] + [f"{d}: {info.get('message', '')}" for d, info in
                                                   (app.get("deployments") or {}).items() if info.get("message")]
                raise ConfigError(f"application {name!r} failed to deploy: {' | '.join(msgs)[-3000:]}")
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


def deploy_version(deployer: Deployer, model: str, version: str, *, wait_s: float | None = 300.0,
                   check: bool = True) -> dict[str, Any]:
    """Roll the model's replicas to repository ``version``: with ``check``, the version is
    first loaded here (:func:`check_version`), so a missing or broken version is refused
    before a single replica changes.

    Raises:
        ModelNotFoundError / ModelError / RepositoryError: the check failed (nothing deployed).
        ConfigError / BrokerError: the rollout failed or timed out.
    """
    cfg = deployed_config(deployer)
    if check:
        log.info("checked %s before the rollout", check_version(cfg, model, version))
    return apply(deployer, versioned(cfg, model, version), wait_s=wait_s)


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
    # Fail on a missing extra or a bad config before starting any process.
    require("ray", "ray", purpose="headrace up")
    require("ray.serve", "ray", purpose="headrace up")
    cfg = load_config(config_path)
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
    # Ray's GCS defaults to port 6379, Redis' own port: pick a free one (both picked at once,
    # so that they cannot come out equal).
    picked_metrics, gcs_port = free_ports(2)
    metrics_port = metrics_port or picked_metrics
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
        except HeadraceError as e:
            # Not listening yet is expected for a while; anything else (auth) is final.
            if "authentic" in str(e).lower() or time.monotonic() > deadline:
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


def _forget_ray_address(address: str) -> None:
    """Remove Ray's "current cluster" marker when it names the cluster we stopped, so a
    later ``ray.init(address="auto")`` does not try to reach a dead GCS."""
    import tempfile

    marker = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    port = address.rsplit(":", 1)[-1]
    try:
        if port and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()
    except OSError:
        pass


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
    _forget_ray_address(state.ray_address)
    if state.redis_pid:
        _kill(state.redis_pid)
        say("Redis: stopped")
    (state_dir() / STATE_FILE).unlink(missing_ok=True)
    return True


# --- in-process serving (the demo) ---------------------------------------------------------


def serve_locally(settings: Any, replicas: int = 1, *, num_cpus: int | None = None,
                  wait_s: float = 300.0) -> tuple[str, Any]:
    """Serve ``settings.model`` on a private local Ray instance started in this process
    (no dashboard, no HTTP proxy), through :func:`headrace.cluster.serve.app.build_app`.

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
    ray = require("ray", "ray", purpose="serving on a local Ray")
    serve = require("ray.serve", "ray", purpose="serving on a local Ray")

    from headrace.cluster.serve.app import ModelAppArgs, app_config

    # Replicas get one backend thread each unless the settings say otherwise.
    served = settings.replace(model_repo=os.path.abspath(settings.model_repo),
                              intra_op_threads=settings.intra_op_threads or 1)
    args = ModelAppArgs.from_worker_settings(served, num_replicas=replicas, num_cpus=0.5)
    # address="local": a private instance even when another Ray runs on this machine
    # (ray.init() without an address would join any cluster it can find).
    ray.init(address="local", num_cpus=num_cpus or max(2, replicas), include_dashboard=False, log_to_driver=False,
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
    from headrace.models.builtin.build import MINILM_NAME, MINILM_TORCH_NAME, ensure_minilm

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
