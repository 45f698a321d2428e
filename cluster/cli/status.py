"""``headrace status``: the queue of every model, and the Ray Serve replicas."""

from __future__ import annotations

import time
from typing import Any

import click

from headrace.cluster.cli.context import CliConfig, pass_cfg


@click.command()
@click.option("--model", "models", multiple=True, help="Only these models (repeatable; default: all known).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval-s", type=click.FloatRange(min=0.1), default=2.0, help="Refresh interval with --watch (s).")
@click.option("--window-s", type=click.FloatRange(min=0, min_open=True), default=60.0, help="Window of throughput and latency percentiles (s).")
@pass_cfg
def status(cfg: CliConfig, models: tuple[str, ...], watch: bool, interval_s: float, window_s: float) -> None:
    """Per model: stream length, lag, pending, consumers, dead letters, throughput, p50/p99."""
    from rich.console import Console

    from headrace.cluster.cli.render import status_table

    r = cfg.redis()
    ns = cfg.ns

    def render() -> Any:
        from headrace.cluster.cli.cluster import with_replicas
        from headrace.cluster.cli.status_data import collect_status, served_versions

        return with_replicas(status_table(collect_status(r, ns, list(models), window_s), ns),
                             served_versions(r, ns))

    console = Console()
    try:
        if not watch:
            console.print(render())
            return
        from rich.live import Live

        with Live(render(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval_s)
                live.update(render())
    except KeyboardInterrupt:
        pass
    finally:
        r.close()
