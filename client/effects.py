"""The IO a flow (:mod:`headrace.client.flows`) asks its client shell to do.

A flow is a generator: it yields one effect, the shell performs it (with threads and
blocking calls in :class:`~headrace.client.Client`, with ``await`` in
:class:`~headrace.client.AsyncClient`) and sends back the answer, or throws the exception the
IO raised into the flow. So the protocol's loops (submit with retries, ``infer``, ``map``,
the reply reader) are written once, and each shell only knows how to do these few things.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from headrace.client.pipeline import Command
from headrace.client.protocol import Result
from headrace.client.tickets import Ticket

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """Send submit ``commands`` in one pipeline. Answer: per command, the reply or the
    redis-py exception it got (a failed round trip gives every command that exception)."""

    commands: Sequence[Command]


@dataclass(frozen=True)
class WakeReader:
    """Start the reply reader if needed, and wake its blocked ``XREAD`` so a new reply stream
    joins it. Answer: None."""


@dataclass(frozen=True)
class Wait:
    """Wait up to ``timeout_s`` for ``ticket`` to be done. Answer: True when it is done."""

    ticket: Ticket
    timeout_s: float


@dataclass(frozen=True)
class WaitAll:
    """Wait up to ``timeout_s`` for all ``tickets``. Answer: how many are not done."""

    tickets: Sequence[Ticket]
    timeout_s: float


@dataclass(frozen=True)
class WaitAny:
    """Wait up to ``timeout_s`` for any of ``tickets``. Answer: the done ones (empty on timeout)."""

    tickets: Sequence[Ticket]
    timeout_s: float


@dataclass(frozen=True)
class Sleep:
    """Sleep ``seconds`` (a shell may end it early when the client closes). Answer: None."""

    seconds: float


@dataclass(frozen=True)
class ReadModel:
    """Read ``model``'s registry entry. Answer: ``(ModelRecord | None, Redis server ms)``;
    raises :class:`BrokerError`. With ``cached_ok`` a read another caller just made will
    do (concurrent submit checks share one round trip)."""

    model: str
    cached_ok: bool = False


@dataclass(frozen=True)
class Emit:
    """Hand ``results`` to the caller of an iterator (``imap``, ``results``: :class:`Result` s;
    ``imap_arrays``: ``ArrayResults``). Answer: None."""

    results: Sequence[Any]


@dataclass(frozen=True)
class ReaderId:
    """The reader connection's ``CLIENT ID`` (connecting it first). Answer: int."""


@dataclass(frozen=True)
class Delete:
    """``XDEL`` consumed reply entries, on the reader's connection. Answer: None."""

    entries: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class XRead:
    """One blocking ``XREAD`` of the reply streams. Answer: redis-py's reply."""

    streams: Mapping[str, str]
    count: int
    block_ms: int


@dataclass(frozen=True)
class Resolve:
    """Complete answered tickets (``(ticket, result)`` pairs). Answer: None."""

    answered: Sequence[tuple[Ticket, Result]]


Effect = Send | WakeReader | Wait | WaitAll | WaitAny | Sleep | ReadModel | Emit | ReaderId | Delete | XRead | Resolve
Flow = Generator[Effect, Any, T]
"""A flow returning ``T``."""


def drive(flow: Flow[T], perform: Callable[[Effect], Any]) -> T:
    """Run ``flow`` to its end with a blocking ``perform``; an exception ``perform`` raises
    is thrown into the flow (which may handle it). Returns the flow's value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = perform(effect)
        except BaseException as e:  # noqa: BLE001 - handed to the flow, which re-raises what it does not handle
            error = e


def iterate(flow: Flow[None], perform: Callable[[Effect], Any]) -> Iterator[Any]:
    """Run ``flow`` as an iterator of the results it emits (:class:`Emit`). Stopping the
    iteration closes the flow (its clean-up runs)."""
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration:
                return
            value, error = None, None
            if isinstance(effect, Emit):
                yield from effect.results
                continue
            try:
                value = perform(effect)
            except BaseException as e:  # noqa: BLE001 - handed to the flow
                error = e
    finally:
        flow.close()


async def adrive(flow: Flow[T], perform: Callable[[Effect], Awaitable[Any]]) -> T:
    """:func:`drive` with an ``async`` ``perform`` (cancellation is thrown into the flow too)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.throw(error) if error is not None else flow.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        value, error = None, None
        try:
            value = await perform(effect)
        except BaseException as e:  # noqa: BLE001 - handed to the flow
            error = e


async def aiterate(flow: Flow[None], perform: Callable[[Effect], Awaitable[Any]]) -> AsyncIterator[Any]:
    """:func:`iterate` with an ``async`` ``perform``."""
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.throw(error) if error is not None else flow.send(value)
            except StopIteration:
                return
            value, error = None, None
            if isinstance(effect, Emit):
                for res in effect.results:
                    yield res
                continue
            try:
                value = await perform(effect)
            except BaseException as e:  # noqa: BLE001 - handed to the flow
                error = e
    finally:
        flow.close()
