"""API-key authentication of the HTTP ingress.

Keys are configured as ``<caller>:<sha256 hex of the key>`` entries (``IngressArgs.api_keys``
and the ``HEADRACE_INGRESS_API_KEYS`` environment variable, comma-separated), so neither the
Serve config nor the replica's memory holds a usable key. A request presents its key as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the sha256 of what it presents is
compared with every configured digest in constant time. The caller name scopes everything
that is the caller's own: its reply stream, its idempotency keys.

Make an entry with ``printf %s "$KEY" | sha256sum`` (or :func:`key_entry`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from headrace.client.errors import ConfigError

ENV_KEYS: Final = "HEADRACE_INGRESS_API_KEYS"
ANONYMOUS: Final = "anonymous"
_CALLER_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a configured caller, or :data:`ANONYMOUS` when auth is off.

    Attributes:
        name: the caller's name (letters, digits, ``_``, ``-``; 1-32 characters).
        secret: the configured key digest (bytes): keys this caller's idempotency ids, so
            nobody without the caller's key can compute them. Empty for anonymous callers.
    """

    name: str
    secret: bytes = b""

    @property
    def authenticated(self) -> bool:
        return bool(self.secret)


def key_entry(caller: str, key: str) -> str:
    """The ``<caller>:<sha256>`` entry that lets ``key`` in as ``caller``."""
    return f"{caller}:{hashlib.sha256(key.encode()).hexdigest()}"


def parse_entries(entries: Iterable[str], source: str = "api_keys") -> dict[str, str]:
    """``{digest: caller}`` of ``<caller>:<sha256 hex>`` entries.

    Raises:
        ConfigError: a malformed entry, a caller name that is not 1-32 of ``[A-Za-z0-9_-]``,
            or one digest given to two callers.
    """
    out: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        caller, _, digest = entry.partition(":")
        if not _CALLER_RE.fullmatch(caller) or not _DIGEST_RE.fullmatch(digest.lower()):
            raise ConfigError(f"{source}: {entry[:40]!r} must be '<caller>:<sha256 hex of the key>' with a caller "
                              "name of 1-32 letters, digits, '_' or '-' (make one with: printf %s \"$KEY\" | sha256sum)")
        if caller == ANONYMOUS:
            raise ConfigError(f"{source}: the caller name {ANONYMOUS!r} is reserved")
        if out.get(digest.lower(), caller) != caller:
            raise ConfigError(f"{source}: one key is given to two callers ({out[digest.lower()]!r}, {caller!r})")
        out[digest.lower()] = caller
    return out


class ApiKeys:
    """The configured keys; :meth:`authenticate` turns request headers into a :class:`Caller`.

    Args:
        entries: ``<caller>:<sha256 hex>`` strings.
        env: the environment to read :data:`ENV_KEYS` from (None: ``os.environ``).

    Raises:
        ConfigError: a malformed entry (see :func:`parse_entries`).
    """

    def __init__(self, entries: Iterable[str] = (), env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._digests = parse_entries(entries)
        extra = parse_entries(env.get(ENV_KEYS, "").split(","), source=ENV_KEYS)
        for digest, caller in extra.items():
            if self._digests.get(digest, caller) != caller:
                raise ConfigError(f"{ENV_KEYS}: one key is given to two callers ({self._digests[digest]!r}, "
                                  f"{caller!r})")
        self._digests.update(extra)
        self._table = [(bytes.fromhex(d), c) for d, c in self._digests.items()]

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key."""
        return bool(self._table)

    def callers(self) -> list[str]:
        return sorted(set(self._digests.values()))

    def authenticate(self, headers: Mapping[str, str]) -> Caller | None:
        """The caller whose key ``headers`` present; :data:`ANONYMOUS` when auth is off;
        None when auth is on and no configured key was presented."""
        if not self._table:
            return Caller(ANONYMOUS)
        presented = _presented_key(headers)
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for stored, caller in self._table:  # no early exit: every digest is compared
            if hmac.compare_digest(stored, digest):
                found = Caller(caller, stored)
        return found


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
