"""What every ``headrace`` command shares: the global options and the error handling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click


@dataclass
class CliConfig:
    """Global options shared by every command (None falls through to ``HEADRACE_*``)."""

    redis_url: str | None
    namespace: str | None
    repo: str
    #: the options above that click read from their ``HEADRACE_*`` variable: the settings read
    #: those themselves, so that a bad value is blamed on the variable, not on an argument
    from_env: frozenset[str] = frozenset()

    def client_settings(self, **overrides: Any) -> Any:
        from headrace.client.config import ClientSettings

        given: dict[str, Any] = {k: v for k, v in (("redis_url", self.redis_url), ("namespace", self.namespace))
                                 if k not in self.from_env}
        return ClientSettings.from_env(**given, **overrides)

    def redis(self) -> Any:
        """A sync client for the configured Redis: a Redis Cluster client when
        ``HEADRACE_REDIS_CLUSTER`` is set (keys routed to their node)."""
        from headrace.client.sharding import sync_client

        s = self.client_settings()
        return sync_client(s.effective_redis_url, s.redis_cluster)

    @property
    def ns(self) -> str:
        return str(self.client_settings().namespace)


class HeadraceGroup(click.Group):
    """Turns headrace errors into one clean ``Error: [code] message`` line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from headrace.client.errors import HeadraceError

        try:
            return super().invoke(ctx)
        except HeadraceError as e:
            raise click.ClickException(str(e)) from e


pass_cfg = click.make_pass_decorator(CliConfig)
