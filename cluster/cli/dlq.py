"""``headrace dlq``: inspect, replay or purge dead letters."""

from __future__ import annotations

import click

from headrace.cluster.cli.context import CliConfig, HeadraceGroup, pass_cfg


@click.group(cls=HeadraceGroup)
def dlq() -> None:
    """Inspect, replay or purge a model's dead-letter stream."""


@dlq.command("list")
@click.argument("model")
@click.option("--count", type=click.IntRange(min=1), default=20, help="Most entries to show.")
@pass_cfg
def dlq_list_cmd(cfg: CliConfig, model: str, count: int) -> None:
    """Show the oldest dead letters of MODEL."""
    from rich.console import Console

    from headrace.cluster.cli.render import dlq_table
    from headrace.workers.admin.dlq import dlq_list

    r = cfg.redis()
    try:
        Console().print(dlq_table(dlq_list(r, cfg.ns, model, count), model))
    finally:
        r.close()


@dlq.command("replay")
@click.argument("model")
@click.option("--id", "ids", multiple=True, help="Dead-letter entry id (repeatable; default: all).")
@pass_cfg
def dlq_replay_cmd(cfg: CliConfig, model: str, ids: tuple[str, ...]) -> None:
    """Requeue dead letters of MODEL (their request ids can be answered again)."""
    from headrace.workers.admin.dlq import dlq_replay

    r = cfg.redis()
    try:
        n = dlq_replay(r, cfg.ns, model, list(ids) or None)
    finally:
        r.close()
    click.echo(f"replayed {n} dead letter(s) of {model}")
    if ids and n < len(set(ids)):
        # named ids that were not there (a typo, or replayed or purged already): say so, as a failure
        click.echo(f"{len(set(ids)) - n} of the {len(set(ids))} ids named were not replayed: not in the DLQ of "
                   f"{model} (already replayed or purged?), or kept as incomplete; see `headrace dlq list {model}`",
                   err=True)
        raise SystemExit(1)


@dlq.command("purge")
@click.argument("model")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_cfg
def dlq_purge_cmd(cfg: CliConfig, model: str, yes: bool) -> None:
    """Delete every dead letter of MODEL."""
    from headrace.workers.admin.dlq import dlq_purge

    if not yes:
        click.confirm(f"delete all dead letters of {model}?", abort=True)
    r = cfg.redis()
    try:
        n = dlq_purge(r, cfg.ns, model)
    finally:
        r.close()
    click.echo(f"purged {n} dead letter(s) of {model}")
