"""Health and fail-fast against a real Redis and a real stream worker: ``model_status`` and
``describe`` from the registry, ``UnknownModel`` for a model no worker registered,
``fail_fast``, and the README's FastAPI app (one AsyncClient from the lifespan, a readiness
probe)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from headrace.client import AsyncClient, Client, ModelUnavailable, UnknownModel
from tests.support.client import affine_inputs, start_fake_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for w in started:
        w.stop()


def test_status_describe_and_the_submit_checks(redis_url: str, workers: list[Any]) -> None:
    with Client(redis_url, reply_block_ms=200, timeout_s=10) as c:
        st = c.model_status("affine")
        assert not st.registered and not st.ready
        with pytest.raises(UnknownModel) as info:
            c.submit("affine", affine_inputs(0))
        assert info.value.model == "affine" and "require_registered=False" in str(info.value)
        with pytest.raises(UnknownModel):
            c.describe("affine")
        assert c.outstanding() == []

        workers.append(start_fake_worker(redis_url, "affine", "affine"))
        st = c.model_status("affine")  # a started worker is registered already
        assert st.ready and len(st.live_workers) == 1 and st.versions == (st.live_workers[0].version,)
        for i in range(20):
            assert c.infer("affine", affine_inputs(i)).ok
        # the next heartbeats carry the latency of those requests and the (drained) backlog
        def settled() -> bool:
            s = c.model_status("affine")
            return s.latency_p50_ms > 0 and s.backlog == 0

        assert wait_until(settled, timeout_s=10)
        st = c.model_status("affine")
        assert 0 < st.latency_p50_ms <= st.latency_p99_ms and st.last_seen_s is not None
        d = c.describe("affine")
        assert d.versions == st.versions and d.live_workers == 1
        sig = d.signature()
        assert sig is not None and "x" in str(sig) and "y" in str(sig)
        assert d.batching[d.versions[0]].max_batch == 32

        workers.pop().stop()  # a worker that stops unregisters: registered, nobody live
        st = c.model_status("affine")
        assert st.registered and not st.ready
        ticket = c.submit("affine", affine_inputs(1))  # default: queued for workers to come
        assert ticket.entry_id and ticket.cancel()
    with Client(redis_url, fail_fast=True) as fast:
        with pytest.raises(ModelUnavailable) as unavailable:
            fast.submit("affine", affine_inputs(2))
        assert unavailable.value.model == "affine" and "fail_fast" in str(unavailable.value)
        assert "its workers have all stopped" in str(unavailable.value), "it was registered: say so"
        workers.append(start_fake_worker(redis_url, "affine", "affine"))
        # the cached "no live worker" reading lasts at most registry_cache_s
        assert wait_until(lambda: _accepted(fast), timeout_s=10)


def _accepted(c: Client) -> bool:
    try:
        c.submit("affine", affine_inputs(3)).cancel()
        return True
    except ModelUnavailable:
        return False


def test_async_client_status_and_describe(redis_url: str, workers: list[Any]) -> None:
    workers.append(start_fake_worker(redis_url, "length", "length"))

    async def scenario() -> None:
        async with AsyncClient(redis_url, reply_block_ms=200) as c:
            st, d = await asyncio.gather(c.model_status("length"), c.describe("length"))
            assert st.ready and d.versions and d.signature() is not None
            with pytest.raises(UnknownModel):
                await c.submit("lenght", text="typo")
            assert int((await c.infer("length", text="four")).outputs["length"][0]) == 4

    asyncio.run(scenario())


def test_fastapi_example_with_a_lifespan_client_and_a_readiness_probe(redis_url: str, workers: list[Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from examples.fastapi_app import app

    monkeypatch.setenv("HEADRACE_REDIS_URL", redis_url)
    monkeypatch.setenv("APP_MODEL", "length")
    with TestClient(app) as http:
        assert http.get("/ready").status_code == 503
        assert http.post("/infer", json={"text": "hello"}).status_code == 404  # no worker ever registered
        workers.append(start_fake_worker(redis_url, "length", "length"))
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        got = http.post("/infer", json={"text": "hello"})
        assert got.status_code == 200 and got.json()["outputs"]["length"] == [5]
        np.testing.assert_array_equal(np.asarray(got.json()["outputs"]["length"]), [len("hello")])
