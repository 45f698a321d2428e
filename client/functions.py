"""The submit function library (``client/submit.lua``): its identity, and loading it.

Producers submit with ``FCALL headrace_submit`` (see :mod:`headrace.client.submit` and
``docs/protocol.md``); the library must be loaded on the Redis primary first. Workers load it
when they start (``RedisBroker.ensure_group``), operators with ``headrace functions load``.
Producers need no right to load it: the SDK loads it itself only when Redis lets it (a
development Redis without ACL users).

Loading is version-aware, so a rolling upgrade never downgrades the library: a library that
is missing is loaded; one with a lower ``LIBRARY_VERSION``, or the same version with other
code, is replaced; a newer one is left alone.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
from importlib import resources
from typing import Any, Final

from headrace.client import errors as E

log = logging.getLogger(__name__)

LIBRARY_NAME: Final = "headrace"
SUBMIT_FUNCTION: Final = "headrace_submit"
RELAY_FUNCTION: Final = "headrace_relay"
VERSION_FUNCTION: Final = "headrace_version"
LIBRARY_SOURCE: Final[str] = resources.files(__package__).joinpath("submit.lua").read_text(encoding="utf-8")
LIBRARY_SHA256: Final[str] = hashlib.sha256(LIBRARY_SOURCE.encode("utf-8")).hexdigest()
"""sha256 of ``client/submit.lua`` as published in docs/protocol.md."""

_VERSION_RE = re.compile(r"^local LIBRARY_VERSION = (\d+)$", re.M)


def library_version(code: str) -> int | None:
    """The ``LIBRARY_VERSION`` a library's source declares; None when it declares none."""
    m = _VERSION_RE.search(code)
    return int(m.group(1)) if m else None


LIBRARY_VERSION: Final[int] = library_version(LIBRARY_SOURCE) or 0


class Outcome(enum.Enum):
    """What :func:`ensure_library` did."""

    LOADED = "loaded"        # it was missing
    REPLACED = "replaced"    # an older (or different same-version) library was replaced
    CURRENT = "current"      # this very library was loaded already
    NEWER = "newer"          # a newer library is loaded; left alone


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def loaded_code(listing: Any) -> str | None:
    """The library code in a ``FUNCTION LIST LIBRARYNAME headrace WITHCODE`` reply (RESP2
    flat pairs or RESP3 maps); None when the library is not loaded."""
    for lib in listing or []:
        info = lib if isinstance(lib, dict) else {_text(lib[i]): lib[i + 1] for i in range(0, len(lib) - 1, 2)}
        info = {_text(k): v for k, v in info.items()}
        if _text(info.get("library_name", "")) == LIBRARY_NAME:
            return _text(info.get("library_code", ""))
    return None


def plan(code: str | None, *, force: bool = False) -> Outcome:
    """What to do given the loaded library's ``code`` (None: not loaded)."""
    if code is None:
        return Outcome.LOADED
    if code == LIBRARY_SOURCE:
        return Outcome.REPLACED if force else Outcome.CURRENT
    theirs = library_version(code) or 0
    if theirs > LIBRARY_VERSION and not force:
        return Outcome.NEWER
    return Outcome.REPLACED


_LIST = ("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE")


def current_code(r: Any) -> str | None:
    """The headrace library code loaded in the Redis of ``r`` (a ``redis.Redis``); None when
    none is loaded.

    Raises:
        BrokerError: Redis refused (no ``FUNCTION LIST`` right) or is unreachable.
    """
    import redis

    try:
        return loaded_code(r.execute_command(*_LIST))
    except redis.RedisError as e:
        raise E.BrokerError(f"cannot list the functions loaded in Redis: {e}") from e


def _load_args(outcome: Outcome) -> tuple[str, ...]:
    return ("FUNCTION", "LOAD", "REPLACE", LIBRARY_SOURCE) if outcome is Outcome.REPLACED else (
        "FUNCTION", "LOAD", LIBRARY_SOURCE)


def _report(outcome: Outcome, code: str | None) -> Outcome:
    if outcome is Outcome.NEWER:
        log.warning("Redis has headrace library version %s loaded, newer than this code's %s; leaving it",
                    library_version(code or ""), LIBRARY_VERSION)
    elif outcome is not Outcome.CURRENT:
        log.info("%s the headrace function library (version %s)", outcome.value, LIBRARY_VERSION)
    return outcome


def _already_exists(e: Exception) -> bool:
    return "already exists" in str(e)


def ensure_library(r: Any, *, force: bool = False) -> Outcome:
    """Load the library into the Redis of ``r`` (a ``redis.Redis``) unless it is current.

    Args:
        force: replace whatever is loaded, a newer version too.

    Raises:
        BrokerError: Redis refused (e.g. no ``FUNCTION LOAD`` right) or is unreachable.
    """
    import redis

    try:
        for _ in range(2):
            code = loaded_code(r.execute_command(*_LIST))
            outcome = plan(code, force=force)
            if outcome in (Outcome.CURRENT, Outcome.NEWER):
                return _report(outcome, code)
            try:
                r.execute_command(*_load_args(outcome))
            except redis.ResponseError as e:
                if _already_exists(e):
                    continue  # another loader won the race: look again
                raise
            return _report(outcome, code)
    except redis.RedisError as e:
        raise E.BrokerError(f"loading the headrace function library failed: {e}") from e
    raise E.BrokerError("loading the headrace function library raced with another loader twice")


async def aensure_library(r: Any, *, force: bool = False) -> Outcome:
    """:func:`ensure_library` for a ``redis.asyncio.Redis``."""
    import redis

    try:
        for _ in range(2):
            code = loaded_code(await r.execute_command(*_LIST))
            outcome = plan(code, force=force)
            if outcome in (Outcome.CURRENT, Outcome.NEWER):
                return _report(outcome, code)
            try:
                await r.execute_command(*_load_args(outcome))
            except redis.ResponseError as e:
                if _already_exists(e):
                    continue
                raise
            return _report(outcome, code)
    except redis.RedisError as e:
        raise E.BrokerError(f"loading the headrace function library failed: {e}") from e
    raise E.BrokerError("loading the headrace function library raced with another loader twice")


def function_missing(error: BaseException) -> bool:
    """Whether a Redis error says the submit function is not loaded."""
    return "Function not found" in str(error)
