"""A connection redis-py tears down under a command in flight (what its asyncio cluster
client does to a failed node's connections, redis/redis-py#3546) is an outage to back off
from, not a crash of the worker task that sent the command."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.connection import Connection

from headrace.client import errors as E
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(30)


class _ClosedWriter:
    """A stream writer whose transport is gone: ``writelines`` is None, as in asyncio's
    selector transport after another task closed it (redis/redis-py#3546)."""

    writelines = None


@pytest.fixture
def torn_down_writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every command's connection loses its transport between redis-py's connect check and
    its write, as when another task disconnects it at that moment."""
    real = Connection.send_packed_command
    torn: list[int] = []

    async def send(self: Connection, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()
        self._writer = _ClosedWriter()  # type: ignore[assignment]  # the other task's close
        torn.append(1)
        await real(self, command, check_health=False)

    monkeypatch.setattr(Connection, "send_packed_command", send)
    yield torn


async def test_a_writer_torn_down_mid_command_is_a_broker_error(redis_url: str, torn_down_writer: list[int]) -> None:
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=redis_url))
    try:
        with pytest.raises(E.BrokerError, match="torn down mid-command"):
            await broker.ping()
        assert torn_down_writer, "the fault was injected"
    finally:
        torn_down_writer.clear()


async def test_a_bug_outside_redis_py_still_surfaces(redis_url: str) -> None:
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=redis_url))

    async def buggy() -> Any:
        return None.missing  # type: ignore[attr-defined]  # a bug in headrace's own closure

    try:
        with pytest.raises(AttributeError):
            await broker._call("buggy", buggy)
    finally:
        await broker.close()
