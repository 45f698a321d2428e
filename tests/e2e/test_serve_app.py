"""Ray Serve e2e on one local Ray instance: the shipped config deploys and answers (SDK,
raw Redis producer, HTTP), live reconfigure, scale, Ray metrics, tensor parallelism.

Apps are applied declaratively, so each test's config replaces the previous test's apps.
"""

from __future__ import annotations

import copy
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from headrace.client import Client
from headrace.client.errors import ConfigError
from headrace.cluster.ops import lifecycle as ops
from headrace.cluster.serve.app import IngressArgs, ModelAppArgs, app_config, ingress_config
from headrace.cluster.serve.auth import key_entry
from tests.support.ray import (
    ROOT,
    RawProducer,
    RayEnv,
    group_consumers,
    local_ray,
    named_actor,
    serve_replicas,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env() -> Iterator[RayEnv]:
    with local_ray(num_cpus=4) as e:
        yield e


@pytest.fixture(scope="module")
def repo(model_repo_dir: Path) -> Path:
    from headrace.models.builtin.build import ensure_minilm

    ensure_minilm(model_repo_dir)
    ensure_minilm(model_repo_dir, torch_format=True)
    return model_repo_dir


def _affine(env: RayEnv, **kw: object) -> dict[str, object]:
    args = {"model": "affine", "fake": "affine", "redis_url": env.redis_url, "num_cpus": 0.25, "lease_s": 3.0,
            "drain_timeout_s": 10.0, **kw}
    return app_config(ModelAppArgs.from_dict(args))


def _http(env: RayEnv, port: int | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port or env.http_port}", timeout=60.0)


def test_shipped_config_deploys_and_answers_sdk_raw_producer_and_http(env: RayEnv, repo: Path) -> None:
    cfg = ops.load_config(ROOT / "ray_config.yaml", redis_url=env.redis_url)
    names = [a["name"] for a in cfg["applications"]]
    assert names == ["minilm", "http"]
    minilm = next(a for a in cfg["applications"] if a["name"] == "minilm")
    assert minilm["args"]["redis_url"] == env.redis_url
    assert Path(minilm["args"]["model_repo"]).is_absolute()
    minilm["args"].update(model_repo=str(repo), num_replicas=1)
    cfg["applications"].append(_affine(env, num_replicas=2))
    details = ops.apply(env.deployer, cfg)
    assert {n: details["applications"][n]["status"] for n in ("minilm", "http", "affine")} == \
        {"minilm": "RUNNING", "http": "RUNNING", "affine": "RUNNING"}
    rows = ops.replicas(details)
    assert sorted((r.app, r.deployment) for r in rows if r.state == "RUNNING") == \
        [("affine", "StreamWorker"), ("affine", "StreamWorker"), ("http", "Ingress"), ("minilm", "StreamWorker")]

    # SDK -> real MiniLM replica.
    with Client(env.redis_url, timeout_s=60.0) as c:
        res = c.infer("minilm", text="The cat sat on the mat.")
        emb = res.outputs["embeddings"]
        assert emb.shape == (384,) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-3
        assert res.timings.worker.startswith("ray-minilm-")

    # Raw Redis producer (no SDK) -> the two fake replicas share the group.
    r = env.r()
    prod = RawProducer(r, "affine")
    prod.send(200)
    results = prod.wait_all(timeout_s=60)
    assert prod.duplicates() == {}
    for res in results:
        assert res.ok, res
        np.testing.assert_allclose(res.outputs["y"], np.full(4, prod.values[res.request_id] * 2 + 1, np.float32))
    workers = {res.timings.worker for res in results}
    assert all(w.startswith("ray-affine-") for w in workers)

    # HTTP ingress: real model, bad input, unknown model, OpenAPI docs.
    with _http(env) as http:
        ok = http.post("/v1/models/minilm/infer", json={"text": "A dog runs in the park."})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["model"] == "minilm" and body["outputs"]["embeddings"]["shape"] == [384]
        assert len(body["outputs"]["embeddings"]["data"]) == 384
        aff = http.post("/v1/models/affine/infer", json={"inputs": {"x": {"dtype": "float32", "shape": [4],
                                                                            "data": [1, 2, 3, 4]}}})
        assert aff.status_code == 200 and aff.json()["outputs"]["y"]["data"] == [3.0, 5.0, 7.0, 9.0]
        bad = http.post("/v1/models/affine/infer", json={"inputs": {"x": [1.0, 2.0, 3.0]}})
        assert bad.status_code == 400 and bad.json()["code"] == "bad_shape"
        wrong = http.post("/v1/models/affine/infer", json={"text": "affine takes tensors"})
        assert wrong.status_code == 400 and wrong.json()["code"] == "bad_value"
        unknown = http.post("/v1/models/nope/infer", json={"text": "x"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_model"
        assert http.get("/docs").status_code == 200
        assert "/v1/models/{model}/infer" in http.get("/openapi.json").json()["paths"]
        listed = http.get("/v1/models").json()["models"]
        assert {"minilm", "affine"} <= set(listed)


def test_http_ingress_answers_429_on_full_queue_and_504_past_deadline(env: RayEnv) -> None:
    # No worker serves "stalled": requests stay queued, so the backlog only grows.
    # With an API key configured (as its sha256 digest): calls without it get 401.
    ingress = ingress_config(IngressArgs(redis_url=env.redis_url, timeout_s=1.0, max_backlog=2,
                                         require_registered=False, api_keys=(key_entry("ops", "k-1"),)))
    ops.apply(env.deployer, {"applications": [ingress]})
    with _http(env) as http:
        anon = http.post("/v1/models/stalled/infer", json={"inputs": {"x": [1, 2, 3, 4]}})
        assert anon.status_code == 401 and anon.json()["code"] == "unauthorized"
        bad = http.post("/v1/models/stalled/infer", content=b"{oops", headers={"x-api-key": "k-1"})
        assert bad.status_code == 400 and bad.json()["code"] == "decode_error"  # not FastAPI's 422
        for _ in range(2):
            slow = http.post("/v1/models/stalled/infer", json={"inputs": {"x": [1, 2, 3, 4]}},
                             headers={"x-api-key": "k-1"})
            assert slow.status_code == 504 and slow.json()["code"] == "deadline_exceeded"
        full = http.post("/v1/models/stalled/infer", json={"inputs": {"x": [1, 2, 3, 4]}},
                         headers={"x-api-key": "k-1"})
        assert full.status_code == 429, full.text
        assert full.json()["code"] == "queue_full"
    # queued: in the stream, or still in the inbox when no worker relayed them yet
    assert env.r().xlen("headrace:{stalled}:requests") + env.r().llen("headrace:{stalled}:inbox") == 2


def test_live_reconfigure_then_scale_up_and_down_with_graceful_drain(env: RayEnv) -> None:
    from ray import serve

    cfg = {"applications": [_affine(env, num_replicas=1)]}
    ops.apply(env.deployer, cfg)
    handle = serve.get_deployment_handle("StreamWorker", app_name="affine")
    before = handle.stats.remote().result()
    assert before["max_batch"] == 32 and before["running"]

    # user_config is live: same replica, new batching.
    live = copy.deepcopy(cfg)
    live["applications"][0]["deployments"] = [{"name": "StreamWorker", "user_config":
                                                {"max_batch": 4, "preferred_batch": 0, "max_wait_ms": 1.0}}]
    ops.apply(env.deployer, live)
    after = wait_until(lambda: (s := handle.stats.remote().result())["max_batch"] == 4 and s, 30,
                       what="max_batch 4")
    assert after["replica"] == before["replica"] and after["max_wait_ms"] == 1.0

    r = env.r()
    prod = RawProducer(r, "affine")
    ops.scale(env.deployer, "affine", 3)
    assert len(serve_replicas(env.deployer, "affine")) == 3
    prod.send(150)
    prod.wait_all(60)
    assert prod.duplicates() == {}
    assert len({res.timings.worker for res in prod.results}) >= 2

    ops.scale(env.deployer, "affine", 1)
    wait_until(lambda: len(serve_replicas(env.deployer, "affine")) == 1, 60, what="one replica")
    # Stopped replicas drained and left the group: no consumer of a dead replica remains.
    survivor = serve_replicas(env.deployer, "affine")[0].replica_id
    consumers = wait_until(lambda: (cs := group_consumers(r, prod.keys)) and
                           all(survivor in c["name"] for c in cs) and cs, 30, what="only the survivor's consumer")
    assert all(int(c["pending"]) == 0 for c in consumers)
    with pytest.raises(ConfigError, match="autoscales"):
        ops.scaled({"applications": [_affine(env, autoscale=True)]}, "affine", 2)


def test_worker_metrics_reach_rays_prometheus_endpoint_with_every_dashboard_series(env: RayEnv) -> None:
    import json
    import re

    from headrace.client.protocol import Envelope, Request, encode_request

    ops.apply(env.deployer, {"applications": [_affine(env, num_replicas=1)]})
    r = env.r()
    prod = RawProducer(r, "affine")
    prod.send(40)
    # One request the model refuses (wrong shape), so the failure counter exists too.
    bad = encode_request(Request(Envelope("bad-1", prod.reply_to, model="affine"), inputs={"x": np.zeros(3, np.float32)}))
    r.xadd(prod.keys.requests, bad)  # type: ignore[arg-type]
    prod.sent.append("bad-1")
    results = prod.wait_all(60)
    assert next(x for x in results if x.request_id == "bad-1").code == "bad_shape"
    replica = serve_replicas(env.deployer, "affine")[0].replica_id
    dashboard = (ROOT / "docs" / "grafana" / "headrace-ray.json").read_text()
    wanted = set(re.findall(r"ray_headrace_[a-z_]+", dashboard)) | {"ray_serve_deployment_replica_healthy"}
    assert json.loads(dashboard)["panels"]

    def scrape() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5).read().decode()
        names = {ln.split("{")[0] for ln in text.splitlines()
                 if not ln.startswith("#") and (f'replica="{replica}"' in ln or ln.startswith("ray_serve_"))}
        return text if wanted <= names else None

    text = wait_until(scrape, 90, interval_s=1.0, what=f"all of {sorted(wanted)} on Ray's endpoint")
    mine = [ln for ln in text.splitlines() if f'replica="{replica}"' in ln]
    success = [ln for ln in mine if ln.startswith("ray_headrace_request_success_total")]
    assert all('model="affine"' in ln for ln in success)
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in success) >= 40
    failure = [ln for ln in mine if ln.startswith("ray_headrace_request_failure_total")]
    assert any('code="bad_shape"' in ln for ln in failure)


def test_tensor_parallel_2_matches_tp1_end_to_end_through_redis_and_survives_a_dead_rank(
        env: RayEnv, repo: Path) -> None:
    import ray
    from ray import serve

    texts = [f"Sentence {i}: {'the weather is rainy' if i % 3 else 'stock prices fell sharply'} today."
             for i in range(12)]
    base = {"model": "minilm-torch", "redis_url": env.redis_url, "model_repo": str(repo), "num_cpus": 0.5,
            "max_batch": 16, "max_wait_ms": 20.0, "lease_s": 3.0, "health_check_period_s": 1.0}

    def served() -> tuple[np.ndarray, set[str]]:
        with Client(env.redis_url, timeout_s=120.0) as c:
            res = c.map("minilm-torch", texts, progress=False, raise_on_error=True)
        return np.stack([x.outputs["embeddings"] for x in res]), {x.timings.worker for x in res}

    ops.apply(env.deployer, {"applications": [app_config(ModelAppArgs.from_dict({**base, "tensor_parallel": 1}),
                                                         name="tp")]})
    tp1, _ = served()
    ops.apply(env.deployer, {"applications": [app_config(ModelAppArgs.from_dict({**base, "tensor_parallel": 2}),
                                                         name="tp")]}, wait_s=300)
    handle = serve.get_deployment_handle("StreamWorker", app_name="tp")
    stats = wait_until(lambda: (s := handle.stats.remote().result()).get("tensor_parallel") == 2 and s, 120,
                       what="the TP=2 replica")
    tp2, workers = served()
    assert workers == {stats["consumer"]}
    assert tp1.shape == tp2.shape == (12, 384)
    assert float(np.abs(tp1 - tp2).max()) <= 1e-4
    # The ranks of the group share one node, and each holds only its shard.
    assert len(set(stats["tp_rank_nodes"])) == 1 and len(stats["tp_rank_nodes"]) == 2
    for shard in stats["tp_shards"]:
        assert shard["world_size"] == 2
        assert abs(shard["sharded_local_bytes"] / shard["sharded_full_bytes"] - 0.5) < 0.01

    # A rank dies: the replica stops consuming, fails its health check and is replaced by
    # a new TP group; what was in flight is reclaimed and answered exactly once.
    ray.kill(named_actor(stats["tp_rank_actors"][0]), no_restart=True)
    prod = RawProducer(env.r(), "minilm-torch")
    prod.send_texts(texts)
    results = prod.wait_all(timeout_s=240)
    assert prod.duplicates() == {}
    assert all(x.ok for x in results), [x.message for x in results if not x.ok]
    got = np.stack([{x.request_id: x for x in results}[i].outputs["embeddings"] for i in prod.sent])
    assert float(np.abs(got - tp1).max()) <= 1e-4
    after = wait_until(lambda: (s := handle.stats.remote().result()).get("replica") != stats["replica"] and s, 120,
                       what="a replacement TP replica")
    assert after["tensor_parallel"] == 2 and len(after["tp_shards"]) == 2
