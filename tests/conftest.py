"""Shared fixtures. Markers follow the folder: tests/unit -> unit, and so on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from tests.support.redis_cluster import RedisClusterProcs

TIERS = ("unit", "integration", "e2e", "chaos")
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server for the whole session (flush between tests if you need to)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session's private Redis, flushed before each test."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh private redis-server per test, for fault injection (kill/restart)."""
    with EmbeddedRedis(data_dir=tmp_path, appendonly=True, appendfsync="always") as server:
        yield server


@pytest.fixture(scope="session")
def model_repo_dir() -> Path:
    """The model repository used by tests (built on demand by model fixtures)."""
    path = Path(os.environ.get("HEADRACE_TEST_MODEL_REPO", ROOT / ".cache" / "test_model_repo"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    """A private 3-master Redis Cluster on loopback for the whole session
    (see ``tests/support/redis_cluster.py``)."""
    with RedisClusterProcs(3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcs) -> str:
    """A startup-node URL of the session's Redis Cluster, every master flushed before the test."""
    redis_cluster.flush()
    return redis_cluster.url
