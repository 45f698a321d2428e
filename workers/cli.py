"""The one worker command line: ``headrace worker`` and ``python -m headrace.workers``.

Its options are derived from :class:`~headrace.workers.settings.WorkerSettings` (one per
field, named by the field's metadata, help text with unit, environment variable and
default), so a new setting needs no wiring here. An option that is not given falls through
to the ``headrace`` command's global options (``--redis-url``, ``--namespace``, ``--repo``),
then to ``HEADRACE_*`` variables, then to the default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import click

from headrace.client import errors as E
from headrace.workers.backends.fake import FAKE_KINDS
from headrace.workers.settings import SettingInfo, WorkerSettings, infos

F = TypeVar("F", bound=Callable[..., Any])
PROG = "python -m headrace.workers"
_TYPES: dict[Any, click.ParamType] = {str: click.STRING, int: click.INT, float: click.FLOAT}
# Global options of the `headrace` command (headrace.cluster.cli.context.CliConfig) that
# stand in for a worker option that was not given.
_GLOBAL_FALLBACKS = (("redis_url", "redis_url"), ("namespace", "namespace"), ("model_repo", "repo"))


def _help(f: dataclasses.Field[Any], info: SettingInfo) -> str:
    unit = f" ({info.unit})" if info.unit else ""
    default = "" if f.default is dataclasses.MISSING else f"; default {f.default!r}"
    return f"{info.help}{unit} [env {info.env}{default}]"


def _option(f: dataclasses.Field[Any], info: SettingInfo, hint: Any) -> Callable[[F], F]:
    names = [info.flag, *info.aliases]
    if hint is bool:
        decls = [f"--{n}/--no-{n}" for n in names[:1]] + [f"--{n}" for n in names[1:]]
        return click.option(*decls, f.name, default=None, help=_help(f, info))
    ptype = _TYPES.get(hint)
    if ptype is None:
        raise TypeError(f"WorkerSettings.{f.name}: no command-line type for {hint!r}; use str, int, float or bool")
    return click.option(*[f"--{n}" for n in names], f.name, type=ptype, default=None, help=_help(f, info))


def settings_options(cls: type[WorkerSettings] = WorkerSettings) -> Callable[[F], F]:
    """A decorator adding one option per settings field (see module doc)."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: F) -> F:
        for f, info in reversed(infos(cls)):
            fn = _option(f, info, hints[f.name])(fn)
        return fn

    return decorate


def build_settings(values: dict[str, Any], fake: str | None = None, fallbacks: Any = None) -> WorkerSettings:
    """Worker settings from option ``values`` (None = not given), the global ``fallbacks``
    (an object with ``redis_url``/``namespace``/``repo``, or None) and the environment.
    With ``fake``, the model defaults to the fake's kind unless ``HEADRACE_MODEL`` names one.

    Raises:
        ConfigError: an invalid value or environment variable.
    """
    values = dict(values)
    for name, attr in _GLOBAL_FALLBACKS:
        if values.get(name) is None and fallbacks is not None:
            values[name] = getattr(fallbacks, attr, None)
    if fake and values.get("model") is None and not os.environ.get("HEADRACE_MODEL"):
        values["model"] = fake
    return WorkerSettings.from_env(**values)


def _load_fake(fake: str | None, settings: WorkerSettings) -> Any:
    if not fake:
        return None
    from headrace.workers.backends.fake import fake_from_env

    return fake_from_env(fake, name=settings.model, reject_non_finite=settings.reject_non_finite)


@click.command("worker")
@click.option("--fake", type=click.Choice(FAKE_KINDS), default=None,
              help="Serve a built-in numpy fake instead of a repository model (affine: y=2x+1; length: text "
                   "length); the model name defaults to the kind.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default=None, help="Log level of the worker [env HEADRACE_LOG_LEVEL].")
@settings_options()
@click.pass_context
def worker(ctx: click.Context, fake: str | None, log_level: str | None, **values: Any) -> None:
    """Run one standalone worker for one model until SIGTERM/Ctrl-C (then drain gracefully).

    Exits non-zero when the worker fails (a model call past infer_timeout_s, an internal
    task that died): a supervisor should restart it; its requests go to other workers.
    """
    from headrace.client.config import redact_url
    from headrace.workers import run as run_mod

    if log_level:
        logging.getLogger().setLevel(log_level.upper())
    settings = build_settings(values, fake, ctx.obj)
    click.echo(f"worker: model {settings.model!r} on {redact_url(settings.effective_redis_url)} "
               f"(namespace {settings.namespace}, consumer {settings.effective_consumer})", err=True)
    try:
        run_mod.run_standalone(settings, _load_fake(fake, settings))
    except E.ModelTimeoutError as err:
        # The stuck call still runs on a daemon thread, maybe inside native code; a normal
        # interpreter exit would tear down the runtime under it (onnxruntime then aborts the
        # process: SIGABRT, exit 134, not the documented 2).
        click.echo(f"Error: {err}", err=True)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


def parse_args(argv: Sequence[str] | None = None) -> SimpleNamespace:
    """The worker command's options as attributes (None = not given), without running it.

    Raises:
        SystemExit: (code 2) the arguments do not parse; the usage error is printed.
    """
    try:
        ctx = worker.make_context(PROG, list(argv or []))
    except click.ClickException as e:
        e.show()
        raise SystemExit(2) from e
    return SimpleNamespace(**ctx.params)


def settings_from_args(args: SimpleNamespace) -> WorkerSettings:
    """The settings :func:`parse_args` describes (environment and defaults applied).

    Raises:
        ConfigError: an invalid value or environment variable.
    """
    names = {f.name for f, _ in infos()}
    return build_settings({k: v for k, v in vars(args).items() if k in names}, getattr(args, "fake", None))
