"""Redis commands packed in C for ``redis.asyncio`` connections.

redis-py's sync connections pack commands with ``hiredis.pack_command`` when hiredis is
installed; its asyncio connections always pack them in Python, one ``Encoder.encode`` and a
few ``bytes.join`` per argument. On the SDK's and the worker's hot paths (an ``FCALL
headrace_submit`` of 22 arguments per request, a commit script of several per entry) that
was 13-14 % of their CPU (py-spy, ``benchmarks/profile_worker.py``); packing in C takes 3-4x
less (``benchmarks/pack_cost.py``, BENCHMARKS.md "Phase 7").

:func:`c_packed` swaps a connection pool's connection class for a subclass that packs in C
and is otherwise the same class (plain TCP, TLS or Unix socket); :func:`c_packed_cluster`
does the same for the nodes of a Redis Cluster client. The bytes on the wire are
the same: the first argument is split on spaces as redis-py does (``"XINFO GROUPS"``),
``bytearray`` and ``memoryview`` arguments are copied to ``bytes`` (hiredis takes neither),
and an argument neither redis-py nor hiredis can send (``bool``, ``None``, other objects)
raises redis-py's ``DataError``. Connections with a non-UTF-8 or non-strict encoding, and
processes without hiredis (it is an extra of the worker roles, not an SDK dependency), keep
redis-py's packer.
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis ships with every worker role
    hiredis = None

_UTF8: Final = frozenset({"utf-8", "utf8"})


def _split_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # "XINFO GROUPS" is two arguments to Redis: redis-py splits the first one the same way.
    if isinstance(args[0], str):
        return tuple(args[0].encode().split()) + args[1:]
    if isinstance(args[0], (bytes, bytearray, memoryview)) and b" " in bytes(args[0]):
        return tuple(bytes(args[0]).split()) + args[1:]
    return args


class _CPacking:
    """Mixin for a ``redis.asyncio`` connection class: ``pack_command`` in C (hiredis)."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        """The RESP bytes of one command, as one buffer.

        Raises:
            DataError: an argument is not str, bytes, bytearray, memoryview, int or float.
        """
        enc = self.encoder
        if hiredis is None or enc.encoding.lower() not in _UTF8 or enc.encoding_errors != "strict":
            return super().pack_command(*args)  # type: ignore[misc, no-any-return]
        # Not redis-py's own HiredisRespSerializer: it copies every argument through a
        # bytearray/memoryview check before packing, ~1.7x this path's cost on a submit.
        # Here only a command hiredis refuses takes that detour.
        args = _split_name(args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        # hiredis takes neither bytearray nor memoryview (rare here: copied, then packed)
        # and, like redis-py, refuses bool and None.
        args = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as e:
            kinds = sorted({type(a).__name__ for a in args if not isinstance(a, (str, bytes, int, float))
                            or isinstance(a, bool)})
            raise DataError(f"cannot send arguments of type {', '.join(kinds)} to Redis: convert them to "
                            "bytes, str, int or float first") from e


class CPackedConnection(_CPacking, Connection):
    """A TCP ``redis.asyncio`` connection that packs commands in C."""


class CPackedSSLConnection(_CPacking, SSLConnection):
    """A TLS ``redis.asyncio`` connection that packs commands in C."""


class CPackedUnixConnection(_CPacking, UnixDomainSocketConnection):
    """A Unix-socket ``redis.asyncio`` connection that packs commands in C."""


_C_PACKED: Final[dict[type, type]] = {
    Connection: CPackedConnection,
    SSLConnection: CPackedSSLConnection,
    UnixDomainSocketConnection: CPackedUnixConnection,
}


def c_packed(pool: ConnectionPool) -> ConnectionPool:
    """``pool``, its future connections packing commands in C (see the module docstring).

    A pool of another connection class (a subclass someone configured) is left as it is.
    Call it before the pool makes its first connection: connections already made keep
    their class.
    """
    pool.connection_class = _C_PACKED.get(pool.connection_class, pool.connection_class)
    return pool


def c_packed_cluster(client: Any) -> Any:
    """A ``redis.asyncio.cluster.RedisCluster`` whose node connections pack commands in C,
    the nodes it knows and those it discovers later (their connection class comes from the
    client's ``connection_kwargs``). Call it before the client's first command; a client
    that does not have those attributes (another redis-py) is returned as it is.
    """
    kwargs = getattr(client, "connection_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("connection_class") in _C_PACKED:
        kwargs["connection_class"] = _C_PACKED[kwargs["connection_class"]]
    nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None)
    for node in (nodes.values() if isinstance(nodes, dict) else ()):
        if getattr(node, "connection_class", None) in _C_PACKED:
            node.connection_class = _C_PACKED[node.connection_class]
    return client
