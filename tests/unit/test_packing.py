"""Commands packed in C (client/packing.py) are the bytes redis-py's own packer sends."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from headrace.client.packing import (
    CPackedConnection,
    CPackedSSLConnection,
    CPackedUnixConnection,
    c_packed,
    c_packed_cluster,
)
from headrace.client.sharding import async_client

pytestmark = pytest.mark.timeout(20)

COMMANDS: list[tuple[Any, ...]] = [
    ("FCALL", "headrace_submit", 3, "hr:{m}:requests", "hr:{m}:limits", "hr:{m}:inbox", "workers", 0,
     b"v", b"1", b"id", b"r-1", b"body", b"\x81\xa4text\xa5hello", b"ts_ms", b"1764640000000"),
    ("XINFO GROUPS", "hr:{m}:requests"),                  # a two-word name, split
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "k", "é\x00 and spaces", "EX", 10),
    ("BLMOVE", "a", "b", "LEFT", "RIGHT", 0.001),
    ("ZADD", "z", 1 / 3, "m", -0.0, "n", float("inf"), "o", 10**30, "p"),
    ("XADD", "s", "*", "body", b"\x00" * 70_000),         # past redis-py's buffer cutoff
    ("XADD", "s", "*", "body", bytearray(b"ab"), "more", memoryview(b"cd")),
]


def python_packed(args: tuple[Any, ...]) -> bytes:
    return b"".join(bytes(p) for p in Connection().pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_c_packing_sends_the_bytes_redis_py_sends(args: tuple[Any, ...]) -> None:
    packed = CPackedConnection().pack_command(*args)
    assert len(packed) == 1 and packed[0] == python_packed(args)


@pytest.mark.parametrize("bad", [True, None, object(), [1, 2]], ids=lambda v: type(v).__name__)
def test_what_redis_py_refuses_is_refused_with_its_error(bad: Any) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError, match="cannot send arguments of type"):
        CPackedConnection().pack_command("SET", "k", bad)


def test_another_encoding_keeps_redis_pys_packer() -> None:
    conn = CPackedConnection(encoding="latin-1")
    args = ("SET", "k", "é")
    assert b"".join(conn.pack_command(*args)) == b"".join(Connection(encoding="latin-1").pack_command(*args))
    assert b"\xe9" in b"".join(conn.pack_command(*args)), "latin-1, not utf-8"


@pytest.mark.parametrize(("url", "plain", "fast"), [
    ("redis://127.0.0.1:6379/0", Connection, CPackedConnection),
    ("rediss://127.0.0.1:6380/0", SSLConnection, CPackedSSLConnection),
    ("unix:///tmp/redis.sock", UnixDomainSocketConnection, CPackedUnixConnection),
])
def test_each_scheme_keeps_its_transport(url: str, plain: type, fast: type) -> None:
    pool = BlockingConnectionPool.from_url(url)
    assert pool.connection_class is plain
    assert c_packed(pool).connection_class is fast and issubclass(fast, plain)
    client = async_client(url, False)
    assert client.connection_pool.connection_class is fast


def test_a_configured_connection_class_is_left_alone() -> None:
    class Mine(Connection):
        pass

    pool = BlockingConnectionPool(connection_class=Mine)
    assert c_packed(pool).connection_class is Mine


@pytest.mark.parametrize(("url", "fast"), [("redis://127.0.0.1:7000", CPackedConnection),
                                           ("rediss://127.0.0.1:7000", CPackedSSLConnection)])
def test_a_cluster_clients_nodes_pack_in_c_known_and_discovered(url: str, fast: type) -> None:
    client = async_client(url, True)  # connects lazily: nothing listens there
    assert client.connection_kwargs["connection_class"] is fast, "the class of the nodes it discovers"
    assert all(n.connection_class is fast for n in client.nodes_manager.startup_nodes.values())
    assert c_packed_cluster(object()) is not None, "a client without those attributes is left as it is"
