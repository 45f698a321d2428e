"""Redis Cluster connectivity shared by the SDK and the workers.

A deployment names a Redis Cluster node in its Redis URL and sets ``redis_cluster``
(:class:`~headrace.client.config.ClientSettings`, ``WorkerSettings``); the clients then
connect with redis-py's cluster client, which routes every command, script and function
call by its keys' slot. Keyless commands are the exception: the submit function library
must be loaded on *every* primary (``FCALL`` runs on the primary of the stream's slot), so
:func:`ensure_library_everywhere` walks the primaries one by one; a worker needs it only on
the primary of its own keys' slot (:func:`aensure_library_for`), so one master down does
not stop the workers of the others' slots from starting.

A Redis Cluster refuses a command over keys of several slots (``CROSSSLOT``), so readers of
several partitions' streams read them slot by slot (:func:`by_slot`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster, key_slot

from headrace.client.errors import BrokerError
from headrace.client.functions import Outcome, aensure_library, ensure_library
from headrace.client.packing import c_packed, c_packed_cluster

V = TypeVar("V")


def is_cluster(r: Any) -> bool:
    """Whether ``r`` is a redis-py Redis Cluster client (sync or asyncio)."""
    return isinstance(r, (RedisCluster, AsyncRedisCluster))


def _local_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of ``FCALL <function> <numkeys> key...`` and of ``XREAD``/``XREADGROUP ...
    STREAMS key... id...`` read off the command (None: another command, or none found)."""
    name = str(args[0]).upper() if args else ""
    if name in ("FCALL", "FCALL_RO") and len(args) > 3:
        return list(args[3:3 + int(args[2])]) or None
    if name in ("XREAD", "XREADGROUP"):
        marks = [i for i, a in enumerate(args) if isinstance(a, (str, bytes)) and str(
            a.decode() if isinstance(a, bytes) else a).upper() == "STREAMS"]
        if marks:
            rest = args[marks[-1] + 1:]
            return list(rest[:len(rest) // 2]) or None
    return None


def _route_fcall_locally(client: Any) -> Any:
    """Make ``client`` find the keys of ``FCALL``, ``XREAD`` and ``XREADGROUP`` in the
    command itself, as redis-py does for ``EVALSHA``: otherwise it asks a node
    (``COMMAND GETKEYS``) before each of them (every submit, every read), a round trip and
    a node's CPU per request. Its pipelines share the parser."""
    parser = client.commands_parser
    get_keys = parser.get_keys
    if isinstance(client, AsyncRedisCluster):
        async def aget(*args: Any) -> Any:
            return _local_keys(args) or await get_keys(*args)

        parser.get_keys = aget
    else:
        def get(redis_conn: Any, *args: Any) -> Any:
            return _local_keys(args) or get_keys(redis_conn, *args)

        parser.get_keys = get
    return client


def sync_client(url: str, cluster: bool, **options: Any) -> Any:
    """A ``redis.Redis`` for ``url``, or a ``RedisCluster`` when ``cluster`` (``options`` go
    to redis-py either way; the cluster client discovers the other nodes from this one).

    Raises:
        redis.RedisError: the cluster client could not reach its startup node.
    """
    if cluster:
        options.pop("single_connection_client", None)  # a cluster client has a pool per node
        return _route_fcall_locally(RedisCluster.from_url(url, **options))
    return redis.Redis.from_url(url, **options)


def async_client(url: str, cluster: bool, **options: Any) -> Any:
    """:func:`sync_client` for ``redis.asyncio`` (connects lazily, on first use); its
    connections pack commands in C (:mod:`headrace.client.packing`)."""
    if cluster:
        options.pop("single_connection_client", None)
        return _route_fcall_locally(c_packed_cluster(AsyncRedisCluster.from_url(url, **options)))
    client = aioredis.Redis.from_url(url, **options)
    c_packed(client.connection_pool)
    return client


class _OnNode:
    """One node of a sync cluster client, as the ``execute_command`` that
    :func:`~headrace.client.functions.ensure_library` needs."""

    def __init__(self, r: Any, node: Any) -> None:
        self.r, self.node = r, node

    def execute_command(self, *args: Any) -> Any:
        return self.r.execute_command(*args, target_nodes=self.node)


class _AOnNode(_OnNode):
    async def execute_command(self, *args: Any) -> Any:  # type: ignore[override]
        return await self.r.execute_command(*args, target_nodes=self.node)


def ensure_library_everywhere(r: Any, *, force: bool = False) -> list[Outcome]:
    """:func:`~headrace.client.functions.ensure_library` on Redis, or on every primary of
    a Redis Cluster; one outcome per node.

    Raises:
        BrokerError: a node refused or is unreachable.
    """
    if not is_cluster(r):
        return [ensure_library(r, force=force)]
    return [ensure_library(_OnNode(r, node), force=force) for node in r.get_primaries()]


def by_slot(items: Mapping[str, V] | Iterable[tuple[str, V]]) -> list[dict[str, V]]:
    """``key -> value`` pairs grouped by the keys' cluster slot (first-seen order): the
    groups a Redis Cluster accepts in one multi-key command."""
    pairs = items.items() if isinstance(items, Mapping) else items
    groups: dict[int, dict[str, V]] = {}
    for key, value in pairs:
        groups.setdefault(key_slot(key.encode()), {})[key] = value
    return list(groups.values())


async def aensure_library_for(r: Any, key: str, *, force: bool = False) -> Outcome:
    """:func:`~headrace.client.functions.aensure_library` where ``key``'s ``FCALL`` runs: on
    Redis, or on the primary of ``key``'s slot of a Redis Cluster (``r`` is asyncio).

    Raises:
        BrokerError: that node refused or is unreachable (another node's state is not asked).
    """
    if not is_cluster(r):
        return await aensure_library(r, force=force)
    try:
        if not r.get_primaries():
            await r.initialize()
        node = r.get_node_from_key(key)
    except redis.RedisError as e:
        raise BrokerError(f"loading the headrace function library failed: no node for {key!r}: {e}") from e
    return await aensure_library(_AOnNode(r, node), force=force)
