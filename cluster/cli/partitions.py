"""``headrace partitions``: where a partitioned model's streams live on a Redis Cluster,
and spreading them evenly over its masters (:mod:`headrace.cluster.ops.placement`)."""

from __future__ import annotations

from typing import Any

import click

from headrace.cluster.cli.context import CliConfig, HeadraceGroup, pass_cfg

_PARTITIONS = click.option("--partitions", type=int, default=None,
                           help="The model's partition count. [env HEADRACE_PARTITIONS]")


@click.group(cls=HeadraceGroup)
def partitions() -> None:
    """A partitioned model's streams on a Redis Cluster (HEADRACE_REDIS_URL names any node)."""


@partitions.command("show")
@click.argument("model")
@_PARTITIONS
@pass_cfg
def partitions_show_cmd(cfg: CliConfig, model: str, partitions: int | None) -> None:
    """Show which master holds each partition of MODEL, and where `place` would put it."""
    _run(cfg, model, partitions, dry_run=True, timeout_s=0.0)


@partitions.command("place")
@click.argument("model")
@_PARTITIONS
@click.option("--dry-run", is_flag=True, help="Only show the plan.")
@click.option("--timeout-s", type=float, default=30.0, help="Seconds to wait for every master to agree.")
@pass_cfg
def partitions_place_cmd(cfg: CliConfig, model: str, partitions: int | None, dry_run: bool, timeout_s: float) -> None:
    """Spread MODEL's partitions evenly over the masters, before it takes traffic.

    Every master ends with P // masters partitions or one more, moving as few as that
    takes, and the command returns once every master agrees. A slot the masters disagree
    on is repaired. Only empty slots move (a slot holding keys is refused before anything
    changes: drain the model, or use `redis-cli --cluster reshard`). Safe to run again: a
    partition already in place stays.
    """
    _run(cfg, model, partitions, dry_run=dry_run, timeout_s=timeout_s)


def _run(cfg: CliConfig, model: str, partitions: int | None, *, dry_run: bool, timeout_s: float) -> None:
    from rich.console import Console

    from headrace.cluster.cli.render import placement_table
    from headrace.cluster.ops.placement import Masters, place_partitions

    settings = cfg.client_settings(**({"partitions": partitions} if partitions is not None else {}))
    rc = _cluster_client(settings.effective_redis_url)
    try:
        masters = Masters.of_cluster(rc)
        moves = place_partitions(masters, settings.namespace, model, settings.partitions, dry_run=dry_run,
                                 timeout_s=timeout_s)
        Console().print(placement_table(moves, [masters.address(i) for i in range(len(masters.nodes))], model,
                                        done=not dry_run))
    finally:
        rc.close()


def _cluster_client(url: str) -> Any:
    import redis
    from redis.cluster import RedisCluster

    from headrace.client.config import redact_url
    from headrace.client.errors import BrokerError, ConfigError

    try:
        return RedisCluster.from_url(url)
    except redis.exceptions.RedisClusterException as e:
        raise ConfigError(f"no Redis Cluster reached at {redact_url(url)} ({e}); partitions are placed on a cluster "
                          "only: point HEADRACE_REDIS_URL (or --redis-url) at any of its nodes, with credentials it "
                          "accepts") from e
    except redis.RedisError as e:
        raise BrokerError(f"cannot reach the Redis Cluster at {redact_url(url)}: {e}") from e
