"""Typed settings with units in their names, validated eagerly, overridable from the
environment with the ``HEADRACE_`` prefix.

A settings class is a frozen dataclass deriving from :class:`Settings`. Every field can be
set from the environment as ``HEADRACE_<FIELD_NAME_UPPERCASE>`` (e.g. ``HEADRACE_MAX_WAIT_MS``)
through :meth:`Settings.from_env`; explicit keyword arguments win over the environment.
Values must have the field's documented type (an ``int`` is accepted for a ``float``, a list
for a tuple; a ``bool`` is never a number); invalid values raise
:class:`~headrace.client.errors.ConfigError` at construction with a message that names the
setting the way the caller set it (``max_backlog=-1`` for an argument,
``HEADRACE_MAX_BACKLOG='-1'`` for the environment), its other spelling, and what to do.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, TypeVar

from headrace.client.errors import ConfigError
from headrace.client.setting_types import coerce, parse_env_value, type_hints, type_name

ENV_PREFIX = "HEADRACE_"
DEFAULT_NAMESPACE = "headrace"
DEFAULT_GROUP = "workers"
#: where producers and workers find Redis when no URL is configured (argument or
#: ``HEADRACE_REDIS_URL``).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: the URL schemes redis-py connects with.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
#: The longest request deadline, in seconds (about 31 years): the wire's ``deadline_ms`` field
#: holds at most 18 digits, and a longer one is no deadline in practice (pass 0 for none).
MAX_DEADLINE_S = 1e9


def resolve_redis_url(url: str | None, env: Mapping[str, str] | None = None) -> str:
    """The Redis URL to use: ``url`` when set, else ``HEADRACE_REDIS_URL``, else
    :data:`DEFAULT_REDIS_URL` (the one order everywhere: SDK, workers, Ray apps)."""
    env = os.environ if env is None else env
    return url or env.get(ENV_PREFIX + "REDIS_URL") or DEFAULT_REDIS_URL


S = TypeVar("S", bound="Settings")

# The fields whose value the settings being constructed took from the environment (name ->
# variable), handed from from_env()/replace() to __post_init__, which records them on the
# instance: messages then name a setting the way it was given.
_FROM_ENV: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("headrace_settings_env",
                                                                                    default=None)

Source = Literal["argument", "env", "default"]


@contextmanager
def _env_fields(fields: Mapping[str, str]) -> Iterator[None]:
    token = _FROM_ENV.set(fields)
    try:
        yield
    finally:
        _FROM_ENV.reset(token)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base for headrace settings classes. Subclasses override :meth:`validate`.

    Construction checks every field against its annotated type, then runs :meth:`validate`.

    Raises:
        ConfigError: a value of the wrong type, or one that fails validation; ``.field``
            names the setting.
    """

    env_prefix: ClassVar[str] = ENV_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "_headrace_env", dict(_FROM_ENV.get() or {}))
        try:
            self._check_types()
            self.validate()
        except ConfigError as e:
            if e.field is None or e.field not in self._field_names():
                raise
            raise ConfigError(f"{self.setting_label(e.field)}: {e.reason}; {self._spellings(e.field)}",
                              field=e.field, reason=e.reason) from None

    @classmethod
    def _field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def _check_types(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            typ = hints.get(f.name, Any)
            value = getattr(self, f.name)
            ok, converted = coerce(value, typ)
            if not ok:
                reason = f"must be {type_name(typ)}, got {type(value).__name__} {value!r}"
                raise ConfigError(f"{f.name}: {reason}", field=f.name, reason=reason)
            if converted is not value:
                object.__setattr__(self, f.name, converted)

    def env_name(self, field: str) -> str:
        """The environment variable of ``field`` (``HEADRACE_<FIELD>``)."""
        return self.env_prefix + field.upper()

    def setting_source(self, field: str) -> Source:
        """Where ``field``'s value came from: ``env`` (its ``HEADRACE_*`` variable),
        ``argument`` (given in code, differing from the default) or ``default``."""
        if field in getattr(self, "_headrace_env", {}):
            return "env"
        f = next((f for f in dataclasses.fields(self) if f.name == field), None)
        if f is not None and f.default is not dataclasses.MISSING and getattr(self, field) == f.default:
            return "default"
        return "argument"

    def setting_label(self, field: str) -> str:
        """``field`` named the way it was set, with its value: ``HEADRACE_MAX_BACKLOG='3'``
        when it came from the environment, else ``max_backlog=3``."""
        value = getattr(self, field, None)
        if field == "redis_url" and isinstance(value, str):
            value = redact_url(value)  # messages and logs must not show its password
        if self.setting_source(field) == "env":
            return f"{self.env_name(field)}={str(value)!r}"
        return f"{field}={value!r}"

    def setting_hint(self, field: str) -> str:
        """How to change ``field``, in the caller's own terms: ``HEADRACE_MAX_BACKLOG``
        when it came from the environment, ``the max_backlog argument`` when given in code,
        both when it is the default."""
        source = self.setting_source(field)
        if source == "env":
            return self.env_name(field)
        if source == "argument":
            return f"the {field} argument"
        return f"the {field} argument (or {self.env_name(field)})"

    def _spellings(self, field: str) -> str:
        if self.setting_source(field) == "env":
            return f"set by the environment variable {self.env_name(field)} (argument {field})"
        return f"set by the argument {field} (env {self.env_name(field)})"

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
        hints = type_hints(cls)
        kwargs: dict[str, Any] = {}
        from_env: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            name = cls.env_prefix + f.name.upper()
            if name in env:
                kwargs[f.name] = parse_env_value(env[name], hints[f.name], name)
                from_env[f.name] = name
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {sorted(unknown)} for {cls.__name__}; "
                f"valid names: {sorted(f.name for f in dataclasses.fields(cls))}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        kwargs.update(given)
        with _env_fields({k: v for k, v in from_env.items() if k not in given}):
            return cls(**kwargs)

    def replace(self: S, **changes: Any) -> S:
        """Return a copy with ``changes`` applied (validated again).

        Raises:
            ConfigError: a changed value is invalid.
        """
        kept = {k: v for k, v in getattr(self, "_headrace_env", {}).items() if k not in changes}
        with _env_fields(kept):
            return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(cond: bool, field: str, message: str, cls_prefix: str = ENV_PREFIX) -> None:
    """Raise :class:`ConfigError` naming ``field`` and its env variable unless ``cond``.

    Inside :meth:`Settings.validate`, the settings re-raise it naming the field the way the
    caller set it (argument or environment variable)."""
    if not cond:
        raise ConfigError(f"{field}: {message} (env {cls_prefix}{field.upper()})", field=field, reason=message)


def validate_redis_url(url: str) -> None:
    """An empty ``url`` (the default) or one redis-py can connect with.

    Raises:
        ConfigError: another scheme, or a port/db/option redis-py cannot read (it would raise
            a bare ``ValueError`` at the first connection instead). The message never repeats
            the URL, which may hold a password.
    """
    if not url:
        return
    # redis-py would raise a bare ValueError at connection time for any other scheme.
    require(url.startswith(REDIS_SCHEMES), "redis_url",
            "must start with redis://, rediss:// (TLS) or unix://, e.g. redis://127.0.0.1:6379/0")
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as e:
        require(False, "redis_url", f"cannot be read: {e}; e.g. redis://user:password@127.0.0.1:6379/0")


def validate_namespace(namespace: str) -> None:
    require(
        bool(namespace) and not any(c in namespace for c in "{}: \t\n"),
        "namespace",
        f"{namespace!r} must be non-empty without braces, colons or spaces, e.g. 'headrace'",
    )


def validate_model_name(model: str) -> None:
    """Model names become part of Redis keys and repository paths.

    Raises:
        ConfigError: not such a name. The message names no environment variable: a model is
            mostly an argument (SDK calls, CLI commands); settings that hold one (a worker's
            ``HEADRACE_MODEL``) re-raise it naming how it was set.
    """
    ok = isinstance(model, str) and bool(model) and len(model) <= 128 and all(c.isalnum() or c in "-_." for c in model)
    if not (ok and model not in {".", ".."}):
        reason = f"{model!r} must be 1-128 characters of letters, digits, '-', '_' or '.'"
        raise ConfigError(f"model name {reason}", field="model", reason=reason)


@dataclasses.dataclass(frozen=True)
class ClientSettings(Settings):
    """Settings of the SDK (:class:`~headrace.client.Client`, :class:`~headrace.client.AsyncClient`).

    Attributes:
        redis_url: ``redis://``/``rediss://`` URL, ACL user and password included; passed
            straight to redis-py. Empty means :data:`DEFAULT_REDIS_URL`.
        namespace: key prefix shared with the workers.
        max_backlog: refuse new work with :class:`QueueFull` when a model's backlog
            reaches this many samples (unread + pending entries times the samples per
            entry the workers publish); 0 disables the check.
        timeout_s: default wait for a result in ``infer``/``result`` (seconds, ``inf``
            waits without limit; per attempt when a retry policy resubmits).
        deadline_s: default time-to-live of a request; 0 means no deadline.
        reply_block_ms: how long one blocking ``XREAD`` on the reply stream waits.
        reply_ttl_s: a client's reply stream expires this long after its last write
            (bounds memory left by clients that went away).
        max_in_flight: ``map`` keeps at most this many samples outstanding.
        chunk_size: ``map`` sends up to this many items as one multi-sample entry
            (1: one request per item).
        reconnect_backoff_max_s: upper bound of the reply reader's reconnect backoff and of
            the default retry policy's backoff (seconds).
        retry_attempts: attempts of the client's default retry policy, which retries only
            submits that Redis failed under (:class:`BrokerError`, same request id); pass
            ``retry=Retry(...)`` to also retry timeouts and full queues. 1 = no retries.
        connect_retries: redis-py retries of one command on a broken pooled connection
            (e.g. after a Redis restart), with backoff, before the SDK sees the error.
        health_check_interval_s: a pooled connection idle this long is checked with a
            ``PING`` before it is used (seconds; 0 = never).
        require_registered: ``submit`` raises :class:`UnknownModel` for a model no worker
            has ever registered in this namespace; turn off to submit before workers start.
        fail_fast: ``submit`` raises :class:`ModelUnavailable` at once when no live worker
            serves the model (instead of queueing for a worker that may never come).
        registry_cache_s: how long a model registry read is reused by those checks
            (seconds), so the hot path does not pay a round trip per submit.
        cancel_ttl_s: how long a cancel marker (``ticket.cancel()``) lives; a worker that
            reads the request within it skips it.
        partitions: request streams each model is split into (docs/scaling.md section 4):
            a request goes to partition ``crc32(request_id) % partitions``; must match the
            workers' ``partitions``. 1 (default) = one stream per model.
        redis_cluster: ``redis_url`` names a Redis Cluster node: connect with redis-py's
            cluster client.
    """

    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    max_backlog: int = 100_000
    timeout_s: float = 60.0
    deadline_s: float = 0.0
    reply_block_ms: int = 1000
    reply_ttl_s: int = 86_400
    max_in_flight: int = 256
    chunk_size: int = 32
    reconnect_backoff_max_s: float = 5.0
    retry_attempts: int = 3
    connect_retries: int = 3
    health_check_interval_s: float = 30.0
    require_registered: bool = True
    fail_fast: bool = False
    registry_cache_s: float = 2.0
    cancel_ttl_s: int = 86_400
    partitions: int = 1
    redis_cluster: bool = False

    def validate(self) -> None:
        validate_namespace(self.namespace)
        validate_redis_url(self.redis_url)
        require(1 <= self.partitions <= 1024, "partitions",
                "must be between 1 (one stream per model) and 1024; use the workers' value")
        require(self.max_backlog >= 0, "max_backlog", "must be >= 0 (0 disables the check)")
        # nan fails every comparison: say so rather than "must be > 0"; inf means no limit.
        require(not math.isnan(self.timeout_s), "timeout_s", "is not a number; set seconds > 0 (inf: no limit)")
        require(self.timeout_s > 0, "timeout_s", "must be > 0 seconds (inf waits without limit)")
        require(math.isfinite(self.deadline_s), "deadline_s",
                "must be a finite number of seconds; set 0 for no deadline")
        require(0 <= self.deadline_s <= MAX_DEADLINE_S, "deadline_s",
                f"must be between 0 (no deadline) and {MAX_DEADLINE_S:.0e} seconds")
        require(self.reply_block_ms >= 1, "reply_block_ms", "must be >= 1 ms")
        require(self.reply_ttl_s >= 1, "reply_ttl_s", "must be >= 1 s")
        require(self.max_in_flight >= 1, "max_in_flight", "must be >= 1")
        require(1 <= self.chunk_size <= 65_536, "chunk_size",
                "must be between 1 (one request per item) and 65536 samples per entry")
        require(self.reconnect_backoff_max_s > 0, "reconnect_backoff_max_s", "must be > 0 s")
        require(1 <= self.retry_attempts <= 100, "retry_attempts", "must be between 1 (no retries) and 100")
        require(0 <= self.connect_retries <= 20, "connect_retries", "must be between 0 and 20")
        require(self.health_check_interval_s >= 0, "health_check_interval_s", "must be >= 0 s (0 = never)")
        require(self.registry_cache_s >= 0, "registry_cache_s", "must be >= 0 s (0 = read every time)")
        require(self.cancel_ttl_s >= 1, "cancel_ttl_s", "must be >= 1 s")

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
