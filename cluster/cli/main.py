"""The ``headrace`` command: the root group and its global options.

Each command group lives in a module of its own in this package. Imports stay light at
module level (click only): every command imports what it needs inside its body, so
``headrace --help`` never loads ray, torch or onnxruntime.
"""

from __future__ import annotations

import logging

import click

from headrace.client.config import DEFAULT_REDIS_URL
from headrace.cluster.bench.run import bench
from headrace.cluster.cli.cluster import deploy_cmd, down_cmd, scale_cmd, up_cmd
from headrace.cluster.cli.compress import compress
from headrace.cluster.cli.context import CliConfig, HeadraceGroup
from headrace.cluster.cli.demo import demo
from headrace.cluster.cli.dlq import dlq
from headrace.cluster.cli.functions import functions
from headrace.cluster.cli.models import models
from headrace.cluster.cli.partitions import partitions
from headrace.cluster.cli.redis_server import redis_cmd
from headrace.cluster.cli.status import status
from headrace.cluster.cli.submit import submit
from headrace.cluster.cli.worker import worker


@click.group(cls=HeadraceGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--redis-url", envvar="HEADRACE_REDIS_URL", default=None,
              help="Redis URL (redis:// or rediss://, ACL user:password@ allowed). [env HEADRACE_REDIS_URL; "
                   f"default {DEFAULT_REDIS_URL}]")
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
    from_env = frozenset(name for name in ("redis_url", "namespace")
                         if ctx.get_parameter_source(name) is click.core.ParameterSource.ENVIRONMENT)
    ctx.obj = CliConfig(redis_url=redis_url, namespace=namespace, repo=repo, from_env=from_env)


for _command in (worker, redis_cmd, submit, status, dlq, functions, models, partitions, compress, demo, bench,
                 up_cmd, down_cmd, scale_cmd, deploy_cmd):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
