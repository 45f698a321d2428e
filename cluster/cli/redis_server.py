"""``headrace redis``: a private redis-server for development."""

from __future__ import annotations

import time

import click


@click.command("redis")
@click.option("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 picks a free one).")
@click.option("--appendonly/--no-appendonly", default=False, help="AOF persistence (survives restarts).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory (default: temporary).")
def redis_cmd(port: int, appendonly: bool, data_dir: str | None) -> None:
    """Start a private redis-server, print its URL, and run until Ctrl-C."""
    from headrace.cluster.ops.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(port, appendonly=appendonly, data_dir=data_dir).start()
    try:
        click.echo(server.url)
        click.echo(f"export HEADRACE_REDIS_URL={server.url}   # Ctrl-C stops it", err=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        raise click.ClickException(f"redis-server exited with code {server.proc.returncode if server.proc else '?'}")
    except KeyboardInterrupt:
        click.echo("stopping redis-server", err=True)
    finally:
        server.close()
