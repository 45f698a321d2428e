"""``headrace redis``: a private redis-server for development."""

from __future__ import annotations

import signal
import time
from types import FrameType

import click


class _Stop(Exception):
    """A termination signal arrived (SIGTERM, SIGHUP, SIGINT): stop the server."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


@click.command("redis")
@click.option("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 picks a free one).")
@click.option("--appendonly/--no-appendonly", default=False, help="AOF persistence (survives restarts).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory (default: temporary).")
def redis_cmd(port: int, appendonly: bool, data_dir: str | None) -> None:
    """Start a private redis-server, print its URL, and run until Ctrl-C or SIGTERM.

    The server never outlives this command: Ctrl-C, SIGTERM and SIGHUP stop it cleanly, and
    on Linux the kernel terminates it if this process is killed outright (SIGKILL).
    """
    from headrace.cluster.ops.embedded_redis import EmbeddedRedis

    # Installed before the server starts: a SIGTERM that lands while it is starting must
    # still reach the cleanup below, not kill this process and orphan the server. SIGINT
    # too: a process started in the background of a script inherits SIGINT ignored, and
    # Python then raises no KeyboardInterrupt for it.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    server = EmbeddedRedis(port, appendonly=appendonly, data_dir=data_dir, die_with_parent=True)
    try:
        server.start()
        click.echo(server.url)
        click.echo(f"export HEADRACE_REDIS_URL={server.url}   # Ctrl-C stops it", err=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        raise click.ClickException(f"redis-server exited with code {server.proc.returncode if server.proc else '?'}")
    except KeyboardInterrupt:
        click.echo("stopping redis-server", err=True)
    except _Stop as stop:
        click.echo(f"stopping redis-server ({stop})", err=True)
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
