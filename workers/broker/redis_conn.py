"""The connection side of the Redis broker: the lazily made client, error translation, and
what a worker sets up once (the consumer group, the submit function library, its limits).

:class:`RedisConnection` is the base of :class:`~headrace.workers.broker.redis_inbox.RedisInbox`
and :class:`~headrace.workers.broker.redis_broker.RedisBroker`; it is not a broker by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from headrace.client import errors as E
from headrace.client.failures import describe
from headrace.client.functions import function_missing
from headrace.client.keys import ModelKeys
from headrace.client.sharding import aensure_library_for, async_client
from headrace.workers.broker import scripts
from headrace.workers.broker.base import Broker
from headrace.workers.broker.replies import raised_inside_redis_py
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisConnection(Broker):
    """The Redis client of a broker and the calls every broker operation goes through.

    The client is created lazily inside the running event loop (a ``redis.asyncio``
    connection belongs to the loop that opened it). Connection problems surface as
    :class:`~headrace.client.errors.BrokerError`; the caller retries with backoff.

    Args:
        settings: stream, group and consumer names, TTLs.
        client: an existing ``redis.asyncio.Redis`` (bytes responses) to use instead.
        keys: the key set to serve (one partition of the model); None: the model's
            unpartitioned keys.
    """

    def __init__(self, settings: WorkerSettings, client: Any = None, keys: ModelKeys | None = None) -> None:
        self.settings = settings
        self.keys = keys if keys is not None else ModelKeys(settings.namespace, settings.model, settings.group)
        self.consumer = settings.effective_consumer
        self.max_entry_bytes = settings.max_entry_bytes
        self.default_budget_bytes = settings.memory_budget_bytes
        self._client = client
        self._owns_client = client is None
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            # The socket timeout must outlast a blocking XREADGROUP, or a healthy idle read
            # would be reported as a dead connection.
            self._client = async_client(
                self.settings.effective_redis_url, self.settings.redis_cluster, decode_responses=False,
                socket_connect_timeout=2.0, socket_timeout=self.settings.block_ms / 1000.0 + 10.0,
                health_check_interval=30)
        return self._client

    def _script(self, name: str) -> Any:
        s = self._scripts.get(name)
        if s is None:
            s = self._scripts[name] = self.client.register_script(scripts.source(name))
        return s

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, turning connection failures into BrokerError and
        recreating the group, or loading the function library, once when Redis lost it
        (a restart without persistence)."""
        import redis

        for attempt in (0, 1):
            try:
                return await fn()
            except redis.ResponseError as e:
                if "NOGROUP" in str(e) and attempt == 0:
                    log.warning("%s: consumer group missing (Redis restarted?), recreating", what)
                    await self.ensure_group()
                    continue
                if function_missing(e) and attempt == 0:
                    # the relay's FCALL on a Redis (or a cluster master) that came back empty
                    log.warning("%s: headrace function library missing (Redis restarted?), loading it", what)
                    await self.ensure_functions()
                    continue
                raise E.BrokerError(f"{what} failed: {e}") from e
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                raise E.BrokerError(f"{what}: Redis unreachable: {e}") from e
            except (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException) as e:
                # A cluster whose masters disagree on a slot's owner (redirects until redis-py
                # gives up) or that covers no node for it: the loops back off and retry, as
                # for an outage, instead of the task dying.
                raise E.BrokerError(f"{what} failed: {describe(e)}") from e
            except (AttributeError, TypeError) as e:
                if not raised_inside_redis_py(e):
                    raise
                # redis-py's asyncio cluster client tears a node's connections down when the
                # node fails, also under a command another task is writing on one of them
                # (redis/redis-py#3546, #3835): that is the node being unreachable, not a bug
                # here, and must back off like any outage instead of killing the task.
                raise E.BrokerError(f"{what}: Redis connection torn down mid-command: {e!r}") from e
        raise AssertionError("unreachable")

    async def ensure_group(self) -> None:
        import redis

        await self.ensure_functions()
        try:
            await self.client.xgroup_create(self.keys.requests, self.settings.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.settings.group, self.keys.requests)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise E.BrokerError(f"XGROUP CREATE {self.keys.requests} failed: {e}") from e
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise E.BrokerError(f"XGROUP CREATE: Redis unreachable: {e}") from e
        except (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException) as e:
            raise E.BrokerError(f"XGROUP CREATE {self.keys.requests} failed: {describe(e)}") from e

    async def ensure_functions(self) -> None:
        """Load the producers' submit function (``client/submit.lua``) unless it is current,
        and publish this worker's ``max_payload_bytes`` in the model's limits hash, which the
        function applies to the whole entry (every field) before adding it.

        A worker user without those rights only logs a warning: the worker serves anyway, and
        an operator loads the library (``headrace functions load``).

        Raises:
            BrokerError: Redis is unreachable or failed otherwise.
        """
        import redis

        try:
            await aensure_library_for(self.client, self.keys.requests)
        except E.BrokerError as e:
            if not isinstance(e.__cause__, redis.exceptions.NoPermissionError):
                raise
            log.warning("this worker's Redis user may not load the submit function (%s); see docs/security.md "
                        "for the worker ACL, or have an operator run `headrace functions load`", e)
        limits = {"max_payload_bytes": str(self.settings.max_payload_bytes), "submit_mode": self.settings.submit_mode}
        try:
            await self.client.hset(self.keys.limits, mapping=limits)
        except redis.exceptions.NoPermissionError as e:
            log.warning("this worker's Redis user may not publish its limits (%s); see docs/security.md", e)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise E.BrokerError(f"HSET {self.keys.limits}: Redis unreachable: {e}") from e
        except redis.RedisError as e:
            raise E.BrokerError(f"HSET {self.keys.limits} failed: {describe(e)}") from e

    async def ping(self) -> None:
        async def go() -> Any:
            return await self.client.ping()

        await self._call("PING", go)

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            try:
                await self._client.aclose()
            except Exception as e:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                log.debug("closing redis client: %s", e)
            self._client = None
            self._scripts.clear()

