"""The HTTP ingress against a real Redis and real (fake-model) workers, through its FastAPI
app without Ray (issue #10, item 3): callers are kept apart (server-side ids, caller-scoped
idempotency keys, one reply stream per caller), API keys are checked, every bad body gets
its documented status and wire code, and timed-out calls do not accumulate."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from headrace.client.keys import ModelKeys
from headrace.client.protocol import DEFAULT_LIMITS
from headrace.cluster.serve.app import IngressArgs
from headrace.cluster.serve.auth import key_entry
from headrace.cluster.serve.gateway import Gateway
from headrace.cluster.serve.ingress import create_api
from headrace.workers.backends.fake import affine_reference, make_fake
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings, default_consumer_name
from tests.support.worker import queued

pytestmark = pytest.mark.timeout(120)
KEYS = {"alice": uuid.uuid4().hex, "bob": uuid.uuid4().hex}


def bearer(who: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]}"}


def affine_json(values: list[float]) -> dict[str, Any]:
    return {"inputs": {"x": {"dtype": "float32", "shape": [4], "data": values}}}


@pytest.fixture
def workers(redis_url: str) -> Iterator[dict[str, Any]]:
    out = {}
    for kind in ("affine", "length"):
        sv = make_fake(kind, name=kind)
        s = WorkerSettings(model=kind, redis_url=redis_url, consumer=default_consumer_name(), block_ms=100,
                           max_wait_ms=20.0, max_batch=32, lease_s=5.0, drain_timeout_s=5.0)
        out[kind] = (WorkerThread(s, sv).start(), sv)
    yield {k: sv for k, (_, sv) in out.items()}
    for wt, _ in out.values():
        wt.stop()


def http(redis_url: str, **args: Any) -> TestClient:
    gw = Gateway(IngressArgs(redis_url=redis_url, require_registered=False, **args), env={})
    return TestClient(create_api(lambda: gw))


@pytest.fixture
def authed(redis_url: str, workers: dict[str, Any]) -> Iterator[TestClient]:
    with http(redis_url, timeout_s=10, api_keys=tuple(key_entry(w, k) for w, k in KEYS.items())) as c:
        yield c


def test_callers_get_their_own_results_even_with_the_same_idempotency_key(
        authed: TestClient, redis_url: str) -> None:
    """Theft and spoofing, the way they worked: two callers naming the same id at once.
    Each gets its own answer, and the ids on the wire differ."""
    value = {"alice": 1.0, "bob": 2.0}

    def call(who: str) -> Any:
        return authed.post("/v1/models/affine/infer", json=affine_json([value[who]] * 4),
                           headers={**bearer(who), "idempotency-key": "order-1"})

    with ThreadPoolExecutor(8) as pool:
        calls = [who for _ in range(4) for who in ("alice", "bob")]
        answers = list(pool.map(call, calls))
    by_caller: dict[str, set[str]] = {"alice": set(), "bob": set()}
    for who, res in zip(calls, answers, strict=True):
        assert res.status_code == 200, res.text
        np.testing.assert_array_equal(res.json()["outputs"]["y"]["data"], affine_reference(np.full(4, value[who])))
        by_caller[who].add(res.json()["id"])
    assert len(by_caller["alice"]) == len(by_caller["bob"]) == 1 and by_caller["alice"] != by_caller["bob"]
    # Each caller has a reply stream of its own.
    streams = {k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(match="headrace:{affine}:reply:*")}
    assert all(s.endswith(("-alice", "-bob")) for s in streams)


def test_an_idempotency_key_runs_the_model_once(authed: TestClient, workers: dict[str, Any]) -> None:
    headers = {**bearer("alice"), "idempotency-key": "once"}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: authed.post("/v1/models/affine/infer", json=affine_json([2.0] * 4),
                                                      headers=headers), range(5)))
    again = authed.post("/v1/models/affine/infer", json=affine_json([2.0] * 4), headers=headers)
    assert {a.status_code for a in [*answers, again]} == {200}
    assert len({a.json()["id"] for a in [*answers, again]}) == 1
    assert sum(workers["affine"].invocations.values()) == 1


def test_a_caller_chosen_request_id_is_refused_and_ids_are_the_servers(authed: TestClient) -> None:
    spoof = authed.post("/v1/models/affine/infer", json={**affine_json([1.0] * 4), "request_id": "victim-id"},
                        headers=bearer("bob"))
    assert spoof.status_code == 400 and spoof.json()["code"] == "decode_error"
    ok = authed.post("/v1/models/affine/infer", json=affine_json([1.0] * 4), headers=bearer("alice"))
    assert ok.status_code == 200 and ok.headers["x-request-id"] == ok.json()["id"] and len(ok.json()["id"]) == 32


def test_api_keys_are_required_once_configured(authed: TestClient) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": KEYS["alice"] + "x"},
                    {"authorization": f"Basic {KEYS['alice']}"}):
        res = authed.post("/v1/models/affine/infer", json=affine_json([1.0] * 4), headers=headers)
        assert res.status_code == 401 and res.json()["code"] == "unauthorized"
        assert res.headers["www-authenticate"] == "Bearer"
    assert authed.get("/v1/models").status_code == 401
    ok = authed.post("/v1/models/affine/infer", json=affine_json([1.0] * 4), headers={"x-api-key": KEYS["bob"]})
    assert ok.status_code == 200
    assert authed.get("/healthz").status_code == 200


def test_without_auth_idempotency_keys_are_refused(redis_url: str, workers: dict[str, Any]) -> None:
    with http(redis_url, timeout_s=10) as c:
        res = c.post("/v1/models/affine/infer", json=affine_json([1.0] * 4), headers={"idempotency-key": "k"})
        assert res.status_code == 400 and "authentication" in res.json()["message"]
        assert c.post("/v1/models/affine/infer", json=affine_json([1.0] * 4)).status_code == 200


DEEP = "[" * 100_000 + "]" * 100_000
BAD_BODIES: list[tuple[str, Any, dict[str, str], int, str]] = [
    # (what, body (bytes: sent raw), headers, status, code)
    ("malformed JSON", b"{not json", {}, 400, "decode_error"),
    ("JSON with NaN", b'{"inputs": {"x": [NaN, 1, 2, 3]}}', {}, 400, "decode_error"),
    ("deeply nested JSON", DEEP.encode(), {}, 400, "decode_error"),
    ("not an object", [1, 2], {}, 400, "decode_error"),
    ("text: 5", {"text": 5}, {}, 400, "bad_value"),
    ("text/plain body", b"hello", {"content-type": "text/plain"}, 415, "decode_error"),
    ("form body", b"text=hello", {"content-type": "application/x-www-form-urlencoded"}, 415, "decode_error"),
    ("neither text nor inputs", {}, {}, 400, "missing_field"),
    ("both text and inputs", {"text": "a", **affine_json([1, 2, 3, 4])}, {}, 400, "decode_error"),
    ("unknown key", {"text": "a", "prompt": "b"}, {}, 400, "decode_error"),
    ("shape [-1,-4]", {"inputs": {"x": {"shape": [-1, -4], "data": [1, 2, 3, 4]}}}, {}, 400, "bad_shape"),
    ("shape [1e20]", {"inputs": {"x": {"shape": [1e20], "data": [1]}}}, {}, 400, "bad_shape"),
    ("shape [0, 2**63]", {"inputs": {"x": {"shape": [0, 2**63], "data": []}}}, {}, 400, "bad_shape"),
    ("shape [true]", {"inputs": {"x": {"shape": [True], "data": [1]}}}, {}, 400, "bad_shape"),
    ("too many elements", {"inputs": {"x": {"shape": [1 << 30], "data": []}}}, {}, 413, "payload_too_large"),
    ("data does not fill the shape", affine_json([1, 2, 3]), {}, 400, "bad_shape"),
    ("ragged nested list", {"inputs": {"x": [[1.0], [1.0, 2.0]]}}, {}, 400, "bad_shape"),
    ("unknown dtype", {"inputs": {"x": {"dtype": "complex64", "shape": [1], "data": [1]}}}, {}, 400, "bad_dtype"),
    ("int8 out of range", {"inputs": {"x": {"dtype": "int8", "shape": [1], "data": [300]}}}, {}, 400, "bad_value"),
    ("float16 overflow", {"inputs": {"x": {"dtype": "float16", "shape": [1], "data": [1e20]}}}, {}, 400,
     "bad_value"),
    ("strings as data", {"inputs": {"x": {"shape": [1], "data": ["1"]}}}, {}, 400, "bad_value"),
    ("tensor key missing", {"inputs": {"x": {"shape": [1]}}}, {}, 400, "missing_field"),
    ("too many inputs", {"inputs": {f"x{i}": [1.0] for i in range(DEFAULT_LIMITS.max_inputs + 1)}}, {}, 413,
     "payload_too_large"),
    ("text too long", {"text": "x" * 100_001}, {}, 413, "payload_too_large"),
    ("bad timeout_s", {"text": "a", "timeout_s": -1}, {}, 400, "bad_value"),
    ("text to a tensor model", {"text": "affine takes tensors"}, {}, 400, "bad_value"),
    ("wrong shape for the model", affine_json([1, 2, 3, 4]) | {"inputs": {"x": [1.0, 2.0]}}, {}, 400, "bad_shape"),
    ("wrong dtype for the model", {"inputs": {"x": {"dtype": "int32", "shape": [4], "data": [1, 2, 3, 4]}}}, {},
     400, "bad_dtype"),
    ("unknown input name", {"inputs": {"x": [1.0, 2, 3, 4], "y": [1.0]}}, {}, 400, "bad_value"),
]


@pytest.mark.parametrize("what,body,headers,status,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_every_bad_body_gets_its_status_and_wire_code(redis_url: str, workers: dict[str, Any], what: str,
                                                      body: Any, headers: dict[str, str], status: int,
                                                      code: str) -> None:
    with http(redis_url, timeout_s=10, max_body_bytes=1 << 20) as c:
        if isinstance(body, bytes):
            res = c.post("/v1/models/affine/infer", content=body, headers=headers)
        else:
            res = c.post("/v1/models/affine/infer", content=json.dumps(body), headers=headers)
    assert (res.status_code, res.json()["code"]) == (status, code), res.text
    assert set(res.json()) == {"code", "message"}  # our format, never FastAPI's 422 detail list


def test_tensors_to_a_text_model_and_oversize_bodies(redis_url: str, workers: dict[str, Any]) -> None:
    with http(redis_url, timeout_s=10, max_body_bytes=4096) as c:
        res = c.post("/v1/models/length/infer", json=affine_json([1, 2, 3, 4]))
        assert (res.status_code, res.json()["code"]) == (400, "bad_value")
        big = c.post("/v1/models/length/infer", json={"text": "x" * 5000})
        assert (big.status_code, big.json()["code"]) == (413, "payload_too_large")
        ok = c.post("/v1/models/length/infer", json={"text": "naïve"})
        assert ok.status_code == 200 and ok.json()["outputs"]["length"]["data"] == [5]


def test_unknown_models_are_404(redis_url: str, workers: dict[str, Any]) -> None:
    gw = Gateway(IngressArgs(redis_url=redis_url, timeout_s=5), env={})
    with TestClient(create_api(lambda: gw)) as c:
        for model in ("nope", "a%20b", "x" * 200):
            res = c.post(f"/v1/models/{model}/infer", json={"text": "x"})
            assert (res.status_code, res.json()["code"]) == (404, "unknown_model"), model
        # Routes that do not exist, and methods a route does not take: the same error body.
        for method, path, status in (("POST", "/v1/models/..%2f..%2fx/infer", 404), ("GET", "/v2/anything", 404),
                                     ("GET", "/v1/models/length/infer", 405), ("DELETE", "/v1/models", 405)):
            res = c.request(method, path)
            body = res.json()
            assert res.status_code == status and set(body) == {"code", "message"}, (method, path, body)
            assert body["code"] == ("unknown_model" if status == 404 else "decode_error")
            assert path.split("?")[0] in body["message"] or status == 404


async def test_timed_out_calls_do_not_accumulate(redis_url: str) -> None:
    """600 calls of 100 KB that all time out (no worker): the replica keeps nothing of them.
    Before, every timed-out ticket stayed, with its request: +68 MiB for these 600."""
    gw = Gateway(IngressArgs(redis_url=redis_url, timeout_s=0.2, require_registered=False, max_backlog=0),
                 env={})
    body = json.dumps({"text": "x" * 100_000}).encode()
    headers = {"content-type": "application/json"}

    async def batch(n: int) -> None:
        answers = await asyncio.gather(*(gw.infer("stalled", body, headers) for _ in range(n)))
        assert {(a.status, a.content["code"]) for a in answers} == {(504, "deadline_exceeded")}

    await batch(20)  # warm up: clients, connections, reader task
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(6):
            await batch(100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    client = next(iter(gw._clients.values()))
    assert len(gw.calls) == 0 and client.outstanding() == []
    assert grown < 8 * 1024 * 1024, f"{grown / 2**20:.1f} MiB kept after 600 timed-out calls of 100 KB"
    assert queued(redis.Redis.from_url(redis_url), ModelKeys("headrace", "stalled")) == 620
    await gw.close()
