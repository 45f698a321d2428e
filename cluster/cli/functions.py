"""``headrace functions``: load and inspect the producers' submit function library."""

from __future__ import annotations

import click

from headrace.cluster.cli.context import CliConfig, HeadraceGroup, pass_cfg


@click.group(cls=HeadraceGroup)
def functions() -> None:
    """The Redis Function library producers submit through (FCALL headrace_submit)."""


@functions.command("load")
@click.option("--force", is_flag=True, help="Replace whatever is loaded, a newer library version too.")
@pass_cfg
def functions_load_cmd(cfg: CliConfig, force: bool) -> None:
    """Load the library into Redis unless it is loaded already (older versions are replaced).

    Run it once per Redis primary; with ``HEADRACE_REDIS_CLUSTER=1`` it loads it on every
    primary of the cluster. Workers do the same when they start, if their Redis user may
    (docs/security.md).
    """
    from headrace.client.functions import LIBRARY_VERSION
    from headrace.client.sharding import ensure_library_everywhere

    r = cfg.redis()
    try:
        outcomes = ensure_library_everywhere(r, force=force)
    finally:
        r.close()
    click.echo(f"headrace function library version {LIBRARY_VERSION}: {', '.join(o.value for o in outcomes)}")


@functions.command("show")
@pass_cfg
def functions_show_cmd(cfg: CliConfig) -> None:
    """Print the library this headrace ships (name, version, sha256) and what Redis has loaded."""
    from headrace.client.functions import (
        LIBRARY_NAME,
        LIBRARY_SHA256,
        LIBRARY_SOURCE,
        LIBRARY_VERSION,
        current_code,
        library_version,
    )

    click.echo(f"library {LIBRARY_NAME} version {LIBRARY_VERSION} sha256 {LIBRARY_SHA256}")
    r = cfg.redis()
    try:
        code = current_code(r)
    finally:
        r.close()
    if code is None:
        click.echo("loaded in Redis: none (run `headrace functions load`)")
    elif code == LIBRARY_SOURCE:
        click.echo("loaded in Redis: this version")
    else:
        click.echo(f"loaded in Redis: version {library_version(code)} (different code)")


@functions.command("source")
def functions_source_cmd() -> None:
    """Print the library's Lua source (for `redis-cli -x FUNCTION LOAD REPLACE`)."""
    from headrace.client.functions import LIBRARY_SOURCE

    click.echo(LIBRARY_SOURCE, nl=False)
