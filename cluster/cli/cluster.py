"""``headrace up | down | scale | deploy``: the Ray Serve cluster commands, and the replica
table that ``headrace status`` appends when a cluster is known.

Registered on the main command group by :func:`register`; heavy imports (ray) happen inside
the commands only.
"""

from __future__ import annotations

import os
from typing import Any

import click

from headrace.client.optional import require


@click.command("up")
@click.option("--config", "config_path", default="ray_config.yaml", type=click.Path(dir_okay=False),
              help="Ray Serve config to deploy.")
@click.option("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all).")
@click.option("--dashboard-port", type=int, default=8265, help="Ray dashboard port on 127.0.0.1.")
@click.option("--metrics-port", type=int, default=0, help="Ray's Prometheus export port (0 picks one).")
@click.option("--build/--no-build", default=True, help="Build the stock MiniLM entries the config needs.")
@click.pass_obj
def up_cmd(cfg: Any, config_path: str, num_cpus: int | None, dashboard_port: int, metrics_port: int,
           build: bool) -> None:
    """Start local Ray (with dashboard), Redis unless the global --redis-url is given (headrace
    --redis-url URL up), and deploy the config."""
    require("ray.serve", "ray", purpose="headrace up")
    from headrace.cluster.ops import lifecycle as ops

    if build:
        ops.build_models(ops.load_config(config_path), say=click.echo)
    state = ops.up(config_path, redis_url=cfg.redis_url, num_cpus=num_cpus, dashboard_port=dashboard_port,
                   metrics_port=metrics_port, say=click.echo)
    click.echo(f"Ray dashboard: {state.dashboard_url}")
    from headrace.client.config import redact_url

    click.echo(f"Redis: {redact_url(state.redis_url)}   Prometheus: http://127.0.0.1:{state.metrics_port}/metrics")
    if not cfg.redis_url:
        click.echo(f"For the SDK and `headrace status`: export HEADRACE_REDIS_URL={state.redis_url}")
    click.echo("Next: headrace status | headrace scale MODEL N | headrace deploy MODEL --version V | headrace down")


@click.command("down")
def down_cmd() -> None:
    """Delete the apps (replicas drain), stop the Ray and Redis that `headrace up` started."""
    from headrace.cluster.ops import lifecycle as ops

    ops.down(say=click.echo)


@click.command("scale")
@click.argument("model")
@click.argument("replicas", type=int)
@click.option("--dashboard", default=None, help="Ray dashboard URL (default: the cluster `up` started).")
@click.option("--wait-s", type=float, default=180.0, help="Wait this long for the replicas to run.")
def scale_cmd(model: str, replicas: int, dashboard: str | None, wait_s: float) -> None:
    """Run REPLICAS replicas of MODEL's stream workers (no restart of the running ones)."""
    from headrace.cluster.ops import lifecycle as ops

    deployer = ops.connect(dashboard)
    details = ops.scale(deployer, model, replicas, wait_s=wait_s)
    rows = [r for r in ops.replicas(details) if r.model == model]
    click.echo(f"{model}: {sum(r.state == 'RUNNING' for r in rows)} replica(s) running")


@click.command("deploy")
@click.argument("model")
@click.option("--version", "version", required=True, help="Repository version to roll out.")
@click.option("--dashboard", default=None, help="Ray dashboard URL (default: the cluster `up` started).")
@click.option("--wait-s", type=float, default=300.0, help="Wait this long for the rollout.")
@click.option("--check/--no-check", default=True,
              help="Load the version here first (exists, checksums, manifest vs model) and refuse before any "
                   "replica changes if it fails.")
def deploy_cmd(model: str, version: str, dashboard: str | None, wait_s: float, check: bool) -> None:
    """Roll MODEL to repository VERSION: new replicas start, old ones drain; no request is lost.

    The version is loaded and checked here before the rollout: a missing or broken version
    is refused and the running replicas are left as they are."""
    from headrace.cluster.ops import lifecycle as ops

    deployer = ops.connect(dashboard)
    if check:
        cfg = ops.deployed_config(deployer)
        click.echo(f"checked {ops.check_version(cfg, model, version)}; rolling out")
    ops.deploy_version(deployer, model, version, wait_s=wait_s, check=False)
    click.echo(f"{model}: rolled out version {version}")


def with_replicas(renderable: Any, served: Any = None) -> Any:
    """``renderable`` followed by the Ray Serve replica table when a cluster is known
    (``headrace up`` state or ``RAY_DASHBOARD_ADDRESS``); unchanged otherwise.

    ``served``: ``{(model, pid): version}`` from the workers' registry, so each replica shows
    the version it really serves; applications that failed to deploy are listed below it."""
    from headrace.cluster.ops.lifecycle import ClusterState

    url = os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not url:
        try:
            state = ClusterState.load()
        except Exception:  # noqa: BLE001 - a broken state file must not break `status`
            return renderable
        if state is None:
            return renderable
        url = state.dashboard_url
    from rich.console import Group

    from headrace.cluster.ops import lifecycle as ops

    try:
        details = ops.DashboardDeployer(url).details()
        rows = ops.replicas(details, served)
    except Exception as e:  # noqa: BLE001 - show the problem instead of failing the status
        return Group(renderable, f"[yellow]Ray Serve at {url}: {e}[/]")
    parts = [renderable, ops.replica_table(rows, title=f"Ray Serve replicas ({url})")]
    problems = ops.app_problems(details)
    if problems:
        parts.append(ops.problems_table(problems))
    return Group(*parts)
