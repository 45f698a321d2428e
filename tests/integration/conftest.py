"""Fixtures of the integration tier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support.broker_harness import open_harness


@pytest.fixture(params=["memory", "redis", "partitioned"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A broker contract harness (tests/support/broker_harness.py), once per kind."""
    harness = open_harness(request.param, request.getfixturevalue)
    yield harness
    await harness.close()


@pytest.fixture
def idle() -> Iterator[Any]:
    """Wait ``seconds`` (the contract's entries go idle in real time)."""
    async def wait(seconds: float) -> None:
        await asyncio.sleep(seconds)

    yield wait
