"""The ``headrace`` command.

Imports stay light at module level (click only): every command imports what it needs
inside its body, so ``headrace --help`` never loads ray, torch or onnxruntime.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

FAKE_KINDS = ("affine", "length")


@dataclass
class CliConfig:
    """Global options shared by every command (None falls through to ``HEADRACE_*``)."""

    redis_url: str | None
    namespace: str | None
    repo: str

    def client_settings(self, **overrides: Any) -> Any:
        from headrace.client.config import ClientSettings

        return ClientSettings.from_env(redis_url=self.redis_url, namespace=self.namespace, **overrides)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.client_settings().effective_redis_url)

    @property
    def ns(self) -> str:
        return str(self.client_settings().namespace)


class _Group(click.Group):
    """Turns headrace errors into one clean ``Error: [code] message`` line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from headrace.client.errors import HeadraceError

        try:
            return super().invoke(ctx)
        except HeadraceError as e:
            raise click.ClickException(str(e)) from e


pass_cfg = click.make_pass_decorator(CliConfig)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--redis-url", envvar="HEADRACE_REDIS_URL", default=None,
              help="Redis URL (redis:// or rediss://, ACL user:password@ allowed). [env HEADRACE_REDIS_URL; "
                   "default redis://127.0.0.1:6379/0]")
@click.option("--namespace", envvar="HEADRACE_NAMESPACE", default=None,
              help="Key namespace shared by producers and workers. [env HEADRACE_NAMESPACE; default headrace]")
@click.option("--repo", envvar="HEADRACE_MODEL_REPO", default="model_repo",
              help="Model repository directory. [env HEADRACE_MODEL_REPO]")
@click.option("--log-level", default="WARNING", envvar="HEADRACE_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.version_option(package_name="headrace")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, namespace: str | None, repo: str, log_level: str) -> None:
    """headrace: batched, effectively-once inference workers on Redis Streams and Ray Serve."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = CliConfig(redis_url=redis_url, namespace=namespace, repo=repo)


# --- worker / redis ------------------------------------------------------------------------


@main.command()
@click.option("--model", default=None, help="Served model name (repository folder; MiniLM is 'minilm'). "
                                            "[default: the --fake kind, else HEADRACE_MODEL or minilm]")
@click.option("--version", "version", default=None, help="Repository version (default: latest).")
@click.option("--fake", type=click.Choice(FAKE_KINDS), default=None,
              help="Serve a built-in numpy fake instead of a repository model (affine: y=2x+1; length: text length).")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default=None, help="Override the manifest's backend.")
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
@pass_cfg
def worker(cfg: CliConfig, model: str | None, version: str | None, fake: str | None, **opts: Any) -> None:
    """Run one standalone worker for one model until SIGTERM/Ctrl-C (then drain gracefully)."""
    from headrace.workers.run import run_standalone
    from headrace.workers.settings import WorkerSettings

    settings = WorkerSettings.from_env(model=model or fake, version=version, redis_url=cfg.redis_url,
                                       namespace=cfg.namespace, model_repo=cfg.repo, **opts)
    servable = None
    if fake:
        from headrace.workers.backends.fake import fake_from_env

        servable = fake_from_env(fake, name=settings.model, reject_non_finite=settings.reject_non_finite)
    click.echo(f"worker: model {settings.model!r} on {_redact(settings.effective_redis_url)} "
               f"(namespace {settings.namespace}, consumer {settings.effective_consumer})", err=True)
    run_standalone(settings, servable)


@main.command("redis")
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


# --- submit / status -----------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("--text", default=None, help="Text input (text models such as minilm).")
@click.option("--input", "input_files", multiple=True, metavar="[NAME=]FILE",
              help="Tensor input from .npy (named by --input NAME=… or the file stem), .npz or .json; repeatable.")
@click.option("--timeout-s", type=float, default=None, help="Longest wait for the result (s).")
@click.option("--deadline-s", type=float, default=None, help="Answer 'expired' instead of running after this (s).")
@click.option("--request-id", default=None, help="Your request id (idempotency key).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@pass_cfg
def submit(cfg: CliConfig, model: str, text: str | None, input_files: tuple[str, ...], timeout_s: float | None,
           deadline_s: float | None, request_id: str | None, as_json: bool) -> None:
    """Submit one request to MODEL, wait, and print its outputs and timings."""
    from rich.console import Console

    from headrace.client import Client
    from headrace.cluster.cli.render import load_inputs, result_json, result_table

    if (text is None) == (not input_files):
        raise click.UsageError("give exactly one of --text or --input")
    inputs = load_inputs(input_files) if input_files else None
    with Client(settings=cfg.client_settings()) as client:
        res = client.infer(model, inputs, text, request_id=request_id, deadline_s=deadline_s,
                           timeout_s=timeout_s, raise_on_error=False)
    if as_json:
        import json

        click.echo(json.dumps(result_json(res)))
    else:
        Console().print(result_table(res))
    if not res.ok:
        sys.exit(2)


@main.command()
@click.option("--model", "models", multiple=True, help="Only these models (repeatable; default: all known).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval-s", type=float, default=2.0, help="Refresh interval with --watch (s).")
@click.option("--window-s", type=float, default=60.0, help="Window of throughput and latency percentiles (s).")
@pass_cfg
def status(cfg: CliConfig, models: tuple[str, ...], watch: bool, interval_s: float, window_s: float) -> None:
    """Per model: stream length, lag, pending, consumers, dead letters, throughput, p50/p99."""
    from rich.console import Console

    from headrace.cluster.cli.render import status_table

    r = cfg.redis()
    ns = cfg.ns

    def render() -> Any:
        from headrace.cluster.cli.cluster import with_replicas
        from headrace.cluster.cli.status import collect_status

        return with_replicas(status_table(collect_status(r, ns, list(models), window_s), ns))

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


# --- dead letters ----------------------------------------------------------------------------


@main.group(cls=_Group)
def dlq() -> None:
    """Inspect, replay or purge a model's dead-letter stream."""


@dlq.command("list")
@click.argument("model")
@click.option("--count", type=int, default=20, help="Most entries to show.")
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


# --- models / compress -----------------------------------------------------------------------


@main.group(cls=_Group)
def models() -> None:
    """The model repository (--repo)."""


@models.command("list")
@pass_cfg
def models_list(cfg: CliConfig) -> None:
    """Every model and version in the repository."""
    from rich.console import Console

    from headrace.models.repository.store import ModelRepository, format_models_table

    Console().print(format_models_table(ModelRepository(cfg.repo)))


@models.command("show")
@click.argument("name")
@click.option("--version", "version", default=None, help="Version (default: latest).")
@pass_cfg
def models_show(cfg: CliConfig, name: str, version: str | None) -> None:
    """The manifest of NAME (signature, recipe, measurements, files)."""
    from rich.console import Console

    from headrace.models.repository.store import ModelRepository, show_manifest

    shown = show_manifest(ModelRepository(cfg.repo), name, version)
    if shown is not None:
        Console().print(shown)


@models.command("build")
@click.option("--torch", "torch_format", is_flag=True, help="Build the torch-format entry (minilm-torch) instead.")
@pass_cfg
def models_build(cfg: CliConfig, torch_format: bool) -> None:
    """Build all-MiniLM-L6-v2 into the repository (ONNX, optimized) unless an identical build exists."""
    from headrace.models.builtin.build import ensure_minilm

    m = ensure_minilm(cfg.repo, torch_format=torch_format)
    click.echo(f"{m.name} v{m.version} ({m.format}, {m.precision}) in {cfg.repo}")


COMPRESS_STEPS = "export, quantize-dynamic, quantize-static, prune, distill, fp16, tensorrt"


@main.command()
@click.argument("model", default="minilm")
@click.option("--steps", default=None, help=f"Comma-separated subset of: {COMPRESS_STEPS}. [default: all]")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Scratch space and distillation checkpoints (a rerun resumes). [default: runs/compress]")
@click.option("--threads", type=int, default=None, help="Threads of every backend while measuring. [default: 2]")
@click.option("--distill-steps", type=int, default=None, help="Training steps of the distillation step.")
@click.option("--prune-heads", type=float, default=None, help="Share of attention heads to remove.")
@click.option("--prune-ffn", type=float, default=None, help="Share of FFN neurons to remove.")
@click.option("--prune-recover-steps", type=int, default=None, help="Recovery training steps after pruning.")
@click.option("--held-out", type=int, default=None, help="Held-out sentences for fidelity (0 = the default set).")
@click.option("--fidelity-budget", type=float, default=None, help="Mean cosine the mixed-precision step must keep.")
@click.option("--bench/--no-bench", default=None, help="Measure speed and fidelity (--no-bench: only build).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG path of the speed-vs-fidelity plot.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--progress/--no-progress", default=None, help="Show progress bars.")
@pass_cfg
def compress(cfg: CliConfig, model: str, **opts: Any) -> None:
    """Compress MODEL (minilm or digits) into the repository and print the report."""
    from headrace.models.compress.pipeline import compress_main

    # Options not given are left out, so compress_main's own defaults stay the one source.
    compress_main(model, repo=cfg.repo, **{k: v for k, v in opts.items() if v is not None})


# --- demo ------------------------------------------------------------------------------------


@main.command()
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


def _redact(url: str) -> str:
    """The URL without its password, for printing."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"


# `headrace bench` lives in its own module (owned by the benchmarks side); it imports click only.
from headrace.cluster.bench.run import bench as _bench  # noqa: E402

main.add_command(_bench)


# Ray Serve cluster commands (up, down, scale, deploy) live in their own module.
from headrace.cluster.cli.cluster import register as _register_cluster_commands  # noqa: E402

_register_cluster_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
