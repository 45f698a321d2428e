"""``headrace worker``: one standalone stream worker."""

from __future__ import annotations

from typing import Any

import click

from headrace.cluster.cli.context import CliConfig, pass_cfg

FAKE_KINDS = ("affine", "length")


@click.command()
@click.option("--model", default=None, help="Served model name (repository folder; MiniLM is 'minilm'). "
                                            "[default: the --fake kind, else HEADRACE_MODEL or minilm]")
@click.option("--version", "version", default=None, help="Repository version (default: latest).")
@click.option("--fake", type=click.Choice(FAKE_KINDS), default=None,
              help="Serve a built-in numpy fake instead of a repository model (affine: y=2x+1; length: text length).")
@click.option("--backend", type=click.Choice(["onnx", "torch", "litert"]), default=None,
              help="Override the manifest's backend (litert: TFLite entries).")
@click.option("--max-batch", type=int, default=None, help="Most requests per model run.")
@click.option("--preferred-batch", type=int, default=None, help="Wait (up to --max-wait-ms) for this many.")
@click.option("--max-wait-ms", type=float, default=None, help="Longest wait of a partial batch (ms).")
@click.option("--block-ms", type=int, default=None, help="Longest blocking XREADGROUP (ms).")
@click.option("--lease-s", type=float, default=None, help="Idle time after which pending work is reclaimed (s).")
@click.option("--max-deliveries", type=int, default=None, help="Deliveries before the dead-letter stream.")
@click.option("--consumer", default=None, help="Consumer name (default: host-pid-random).")
@click.option("--threads", "intra_op_threads", type=int, default=None, help="Backend threads per model call (0 = default).")
@click.option("--instances", type=int, default=None,
              help="Model calls at once on the one loaded model (CPU: cores, with --threads 1).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port (0 = off).")
@click.option("--servable", default=None, metavar="PACKAGE.MODULE:CLASS",
              help="Serve the model with this operator-written CustomServable subclass (docs/models.md).")
@pass_cfg
def worker(cfg: CliConfig, model: str | None, version: str | None, fake: str | None, **opts: Any) -> None:
    """Run one standalone worker for one model until SIGTERM/Ctrl-C (then drain gracefully)."""
    from headrace.client.config import redact_url
    from headrace.workers.run import run_standalone
    from headrace.workers.settings import WorkerSettings

    settings = WorkerSettings.from_env(model=model or fake, version=version, redis_url=cfg.redis_url,
                                       namespace=cfg.namespace, model_repo=cfg.repo, **opts)
    servable = None
    if fake:
        from headrace.workers.backends.fake import fake_from_env

        servable = fake_from_env(fake, name=settings.model, reject_non_finite=settings.reject_non_finite)
    click.echo(f"worker: model {settings.model!r} on {redact_url(settings.effective_redis_url)} "
               f"(namespace {settings.namespace}, consumer {settings.effective_consumer})", err=True)
    run_standalone(settings, servable)
