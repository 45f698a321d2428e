"""Typed settings with units in their names, validated eagerly, overridable from the
environment with the ``HEADRACE_`` prefix.

A settings class is a frozen dataclass deriving from :class:`Settings`. Every field can be
set from the environment as ``HEADRACE_<FIELD_NAME_UPPERCASE>`` (e.g. ``HEADRACE_MAX_WAIT_MS``)
through :meth:`Settings.from_env`; explicit keyword arguments win over the environment.
Invalid values raise :class:`~headrace.client.errors.ConfigError` at construction with a
message that names the field, the env variable and what to do.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from headrace.client.errors import ConfigError

ENV_PREFIX = "HEADRACE_"
DEFAULT_NAMESPACE = "headrace"
DEFAULT_GROUP = "workers"
#: where producers and workers find Redis when no URL is configured (argument or
#: ``HEADRACE_REDIS_URL``).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def resolve_redis_url(url: str | None, env: Mapping[str, str] | None = None) -> str:
    """The Redis URL to use: ``url`` when set, else ``HEADRACE_REDIS_URL``, else
    :data:`DEFAULT_REDIS_URL` (the one order everywhere: SDK, workers, Ray apps)."""
    env = os.environ if env is None else env
    return url or env.get(ENV_PREFIX + "REDIS_URL") or DEFAULT_REDIS_URL

S = TypeVar("S", bound="Settings")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(raw: str, typ: Any, env_name: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if raw.strip().lower() in {"", "none", "null"}:
            return None
        return _parse(raw, inner[0], env_name)
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
        if origin in (tuple, list):
            items = [x.strip() for x in raw.split(",") if x.strip()]
            conv = args[0] if args else str
            return tuple(_parse(x, conv, env_name) for x in items)
    except ValueError as e:
        raise ConfigError(
            f"{env_name}={raw!r} is not a valid {getattr(typ, '__name__', typ)}; "
            f"set it to a {getattr(typ, '__name__', typ)} or unset it"
        ) from e
    return raw


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base for headrace settings classes. Subclasses override :meth:`validate`."""

    env_prefix: ClassVar[str] = ENV_PREFIX

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field values; raise :class:`ConfigError` with a fix-it message."""

    @classmethod
    def from_env(cls: type[S], env: Mapping[str, str] | None = None, **overrides: Any) -> S:
        """Build settings from ``HEADRACE_*`` environment variables, then ``overrides``.

        ``overrides`` whose value is ``None`` are ignored, so CLI options that were not
        given fall through to the environment and then to the defaults.

        Raises:
            ConfigError: a variable does not parse, or a value fails validation.
        """
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            name = cls.env_prefix + f.name.upper()
            if name in env:
                kwargs[f.name] = _parse(env[name], hints[f.name], name)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {sorted(unknown)} for {cls.__name__}; "
                f"valid names: {sorted(f.name for f in dataclasses.fields(cls))}"
            )
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def replace(self: S, **changes: Any) -> S:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(cond: bool, field: str, message: str, cls_prefix: str = ENV_PREFIX) -> None:
    """Raise :class:`ConfigError` naming ``field`` and its env variable unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field}: {message} (env {cls_prefix}{field.upper()})")


def validate_namespace(namespace: str) -> None:
    require(
        bool(namespace) and not any(c in namespace for c in "{}: \t\n"),
        "namespace",
        f"{namespace!r} must be non-empty without braces, colons or spaces, e.g. 'headrace'",
    )


def validate_model_name(model: str) -> None:
    """Model names become part of Redis keys and repository paths."""
    ok = bool(model) and len(model) <= 128 and all(c.isalnum() or c in "-_." for c in model)
    require(
        ok and model not in {".", ".."},
        "model",
        f"{model!r} must be 1-128 characters of letters, digits, '-', '_' or '.'",
    )


@dataclasses.dataclass(frozen=True)
class ClientSettings(Settings):
    """Settings of the SDK (:class:`~headrace.client.Client`).

    Attributes:
        redis_url: ``redis://``/``rediss://`` URL, ACL user and password included; passed
            straight to redis-py. Empty means :data:`DEFAULT_REDIS_URL`.
        namespace: key prefix shared with the workers.
        max_backlog: refuse new work with :class:`QueueFull` when a model's backlog
            (unread + pending entries) reaches this many; 0 disables the check.
        timeout_s: default wait for a result in ``infer``/``result``.
        deadline_s: default time-to-live of a request; 0 means no deadline.
        reply_block_ms: how long one blocking ``XREAD`` on the reply stream waits.
        reply_ttl_s: a client's reply stream expires this long after its last write
            (bounds memory left by clients that went away).
        max_in_flight: ``map`` keeps at most this many requests outstanding.
        reconnect_backoff_max_s: upper bound of the exponential reconnect backoff.
    """

    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    max_backlog: int = 100_000
    timeout_s: float = 60.0
    deadline_s: float = 0.0
    reply_block_ms: int = 1000
    reply_ttl_s: int = 86_400
    max_in_flight: int = 256
    reconnect_backoff_max_s: float = 5.0

    def validate(self) -> None:
        validate_namespace(self.namespace)
        require(self.max_backlog >= 0, "max_backlog", "must be >= 0 (0 disables the check)")
        require(self.timeout_s > 0, "timeout_s", "must be > 0 seconds")
        require(self.deadline_s >= 0, "deadline_s", "must be >= 0 seconds (0 = no deadline)")
        require(self.reply_block_ms >= 1, "reply_block_ms", "must be >= 1 ms")
        require(self.reply_ttl_s >= 1, "reply_ttl_s", "must be >= 1 s")
        require(self.max_in_flight >= 1, "max_in_flight", "must be >= 1")
        require(self.reconnect_backoff_max_s > 0, "reconnect_backoff_max_s", "must be > 0 s")

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and terminal output."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"
