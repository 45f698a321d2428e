"""``headrace demo``: end to end on a fresh machine."""

from __future__ import annotations

import click

from headrace.cluster.cli.context import CliConfig, pass_cfg


@click.command()
@click.option("--sentences", type=int, default=48, help="How many real sentences to embed.")
@click.option("--workers", type=int, default=1, help="Standalone workers to start.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@pass_cfg
def demo(cfg: CliConfig, sentences: int, workers: int, progress: bool) -> None:
    """End to end on a fresh machine: Redis (yours or a private one), MiniLM built into the
    repository, a worker, sentences through the SDK, similarities and the status table."""
    from headrace.cluster.demo import run_demo

    run_demo(redis_url=cfg.redis_url, namespace=cfg.namespace, repo=cfg.repo, n_sentences=sentences,
             n_workers=workers, progress=progress)
