"""The asyncio SDK client: the same protocol as :class:`~headrace.client.Client` (the same
flows, :mod:`headrace.client.flows`), with a reader task instead of a thread.

    async with AsyncClient("redis://127.0.0.1:6379/0") as c:
        res = await c.infer("affine", {"x": np.ones(4, np.float32)})
        ticket = await c.submit("minilm", text="hello")
        res = await ticket            # or await c.result(ticket, timeout_s=5)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from headrace.client import flows
from headrace.client.arrays import ArrayResults, one_block
from headrace.client.async_io import AsyncIO
from headrace.client.bulk import MapItem
from headrace.client.config import ClientSettings
from headrace.client.core import ClientCore
from headrace.client.effects import Flow
from headrace.client.failures import broker_error
from headrace.client.forks import PerProcess
from headrace.client.health import ModelDescription, ModelStatus
from headrace.client.pipeline import AutoPipeline
from headrace.client.progress import ProgressOption, make_progress
from headrace.client.protocol import Result
from headrace.client.retry import Retry
from headrace.client.submit import resolve_settings
from headrace.client.tickets import Ticket
from headrace.client.views import CoreViews

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncClient(CoreViews):
    """asyncio twin of :class:`~headrace.client.Client`; the methods are coroutines.

    Args and raised errors as :class:`~headrace.client.Client`. Use it from one event loop:
    it binds to the loop it first runs on, and a call from another loop (a second
    ``asyncio.run``) raises :class:`HeadraceError` before sending anything; create one
    client per loop. ``ticket.cancel()`` may be called from any thread.

    Submits are auto-pipelined: the ``submit``/``infer`` calls that coroutines make during
    one pass of the event loop go to Redis together, one ``EVALSHA`` each in one pipeline
    (see :mod:`headrace.client.pipeline`), and each caller still gets its own outcome
    (ticket, :class:`QueueFull`, :class:`BrokerError`). ``map``/``imap`` submit in batches.
    A cancelled ``infer`` task cancels its request (workers skip it if not started).
    """

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None,
                 settings: ClientSettings | None = None, client_id: str | None = None, retry: Retry | None = None,
                 **overrides: Any) -> None:
        self.settings, cid = resolve_settings(settings, client_id, redis_url=redis_url, namespace=namespace,
                                              **overrides)
        self._proc: PerProcess[AsyncIO] = PerProcess(ClientCore(self.settings, cid, retry), AsyncIO)

    @property
    def _io(self) -> AsyncIO:
        return self._proc.current()[1]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader task and close connections; outstanding tickets fail with
        :class:`RequestCancelled` (see :meth:`Client.close`). Safe after the client's event
        loop closed."""
        await self._io.close()

    async def ping(self) -> bool:
        """True when Redis answers.

        Raises:
            BrokerError: Redis is unreachable. HeadraceError: used from a second event loop.
        """
        io = self._io
        io.bind_loop()
        try:
            return bool(await io.redis.ping())
        except redis.RedisError as e:
            raise broker_error(e, "PING of Redis") from e

    @property
    def _redis(self) -> aioredis.Redis:
        return self._io.redis

    @property
    def _pipeline(self) -> AutoPipeline:
        return self._io.pipeline

    async def model_status(self, model: str) -> ModelStatus:
        """See :meth:`Client.model_status`. Raises: ConfigError, BrokerError."""
        return await self._run(flows.model_status(self._core, model))

    async def describe(self, model: str) -> ModelDescription:
        """See :meth:`Client.describe`. Raises: UnknownModel, BrokerError."""
        return await self._run(flows.describe(self._core, model))

    async def submit(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                     request_id: str | None = None, deadline_s: float | None = None,
                     retry: Retry | None = None) -> Ticket:
        """Enqueue one request; see :meth:`Client.submit`.

        Raises:
            UnknownModel, ModelUnavailable, QueueFull, ProtocolError, BrokerError.
        """
        self._core.check_open("AsyncClient")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        policy = self._core.policy(retry)
        await self._run(flows.submit(self._core, ticket, policy.start(ticket.deadline_ms)))
        return ticket

    async def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again, same request id; see :meth:`Client.resubmit`.

        Raises:
            QueueFull, BrokerError.
        """
        self._core.check_open("AsyncClient")
        if not ticket.done():
            attempts = self._core.retry.start(ticket.deadline_ms)
            await self._run(flows.submit(self._core, ticket, attempts, check=False, resubmit=True))
        return ticket

    def forget(self, ticket: Ticket) -> bool:
        """Stop tracking ``ticket``; see :meth:`Client.forget`."""
        return self._core.forget(ticket)

    async def result(self, ticket: Ticket, timeout_s: float | None = None) -> Result:
        """Wait for ``ticket``'s result.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
            RequestCancelled: the ticket was cancelled or forgotten.
        """
        return await ticket.wait(timeout_s)

    async def infer(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                    request_id: str | None = None, deadline_s: float | None = None,
                    timeout_s: float | None = None, raise_on_error: bool = True, retry: Retry | None = None) -> Result:
        """Submit and wait; see :meth:`Client.infer`. Cancelling the calling task cancels
        the request.

        Raises:
            UnknownModel, ModelUnavailable, QueueFull, ProtocolError, BrokerError, ResultTimeout,
            InferenceFailed, RequestExpired.
        """
        self._core.check_open("AsyncClient")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        res = await self._run(flows.infer(self._core, ticket, timeout_s, retry))
        return res.raise_for_status() if raise_on_error else res

    async def collect(self, tickets: Sequence[Ticket], timeout_s: float | None = None, *,
                      raise_on_error: bool = False) -> list[Result]:
        """Wait for all ``tickets``; results in the given order; see :meth:`Client.collect`.

        Raises:
            ResultTimeout, RequestCancelled, InferenceFailed, RequestExpired.
        """
        results = await self._run(flows.collect(self._core, tickets, timeout_s))
        if raise_on_error:
            for r in results:
                r.raise_for_status()
        return results

    def results(self, tickets: Iterable[Ticket], timeout_s: float | None = None) -> AsyncIterator[Result]:
        """Yield results as they arrive (completion order); ``async for``.

        Raises:
            ResultTimeout: the rest did not arrive within ``timeout_s`` in total.
        """
        return self._io.iterate(flows.results(self._core, tickets, timeout_s))

    def outstanding(self) -> list[Ticket]:
        """Tickets not answered, cancelled or forgotten yet."""
        return self._core.book.outstanding()

    def imap(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
             timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
             total: int | None = None, retry: Retry | None = None, chunk_size: int | None = None
             ) -> AsyncIterator[Result]:
        """Async iterator form of :meth:`map` (input order); ``async for``."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        bar = make_progress(progress, total, model)
        return self._io.iterate(flows.imap(self._core, model, items, timeout_s=timeout_s, deadline_s=deadline_s,
                                           retry=retry, progress=bar, raise_on_error=raise_on_error,
                                           chunk_size=chunk_size))

    async def map(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
                  timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
                  total: int | None = None, retry: Retry | None = None, chunk_size: int | None = None) -> list[Result]:
        """Pipelined bulk inference, results in input order; see :meth:`Client.map`.

        Raises:
            UnknownModel, ModelUnavailable, ProtocolError, ResultTimeout, QueueFull, BrokerError,
            InferenceFailed, RequestExpired.
        """
        return [r async for r in self.imap(model, items, progress=progress, timeout_s=timeout_s,
                                           deadline_s=deadline_s, raise_on_error=raise_on_error, total=total,
                                           retry=retry, chunk_size=chunk_size)]

    def imap_arrays(self, model: str, blocks: Iterable[Mapping[str, Any] | Sequence[str]], *,
                    progress: ProgressOption = None,
                    timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = True,
                    total: int | None = None, retry: Retry | None = None,
                    chunk_size: int | None = None) -> AsyncIterator[ArrayResults]:
        """Async iterator form of :meth:`Client.imap_arrays` (one :class:`ArrayResults` per block)."""
        bar = make_progress(progress, total, model)
        return self._io.iterate(flows.imap_arrays(self._core, model, blocks, timeout_s=timeout_s,
                                                  deadline_s=deadline_s, retry=retry, progress=bar,
                                                  raise_on_error=raise_on_error, chunk_size=chunk_size))

    async def map_arrays(self, model: str, inputs: Mapping[str, Any] | None = None, *,
                         texts: Sequence[str] | None = None, progress: ProgressOption = None,
                         timeout_s: float | None = None, deadline_s: float | None = None,
                         raise_on_error: bool = True, retry: Retry | None = None,
                         chunk_size: int | None = None) -> ArrayResults:
        """Array-in/array-out bulk inference; see :meth:`Client.map_arrays`.

        Raises:
            ProtocolError, InferenceFailed, RequestExpired, UnknownModel, ModelUnavailable,
            ResultTimeout, QueueFull, BrokerError.
        """
        block, n = one_block(inputs, texts)
        out = [r async for r in self.imap_arrays(model, [block], progress=progress, timeout_s=timeout_s,
                                                 deadline_s=deadline_s, raise_on_error=raise_on_error, total=n,
                                                 retry=retry, chunk_size=chunk_size)]
        return out[0]

    async def _run(self, flow: Flow[T]) -> T:
        return await self._io.run(flow)
