"""Ray Serve e2e, failure and change under load: a replica killed mid-load, a rolling
version update, and autoscaling on the stream's lag (real Serve controller)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from headrace.cluster.ops import lifecycle as ops
from headrace.cluster.serve.app import ModelAppArgs, app_config
from tests.support.ray import (
    RawProducer,
    RayEnv,
    group_backlog,
    group_consumers,
    local_ray,
    replica_actor,
    serve_replicas,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env() -> Iterator[RayEnv]:
    with local_ray(num_cpus=4) as e:
        yield e


def _affine(env: RayEnv, **kw: object) -> dict[str, object]:
    args = {"model": "affine", "fake": "affine", "redis_url": env.redis_url, "num_cpus": 0.25,
            "drain_timeout_s": 15.0, **kw}
    return app_config(ModelAppArgs.from_dict(args))


def test_replica_killed_mid_load_loses_nothing_and_duplicates_nothing(env: RayEnv) -> None:
    import ray

    ops.apply(env.deployer, {"applications": [_affine(env, num_replicas=2, fake_delay_ms=100.0, max_batch=4,
                                                      lease_s=2.0)]})
    r = env.r()
    prod = RawProducer(r, "affine")
    prod.send(500)
    victim = serve_replicas(env.deployer, "affine")[0].replica_id
    # Kill it while it owns in-flight entries (pending), i.e. mid-batch.
    owned = wait_until(lambda: next((int(c["pending"]) for c in group_consumers(r, prod.keys)
                                     if victim in c["name"] and int(c["pending"]) > 0), 0),
                       30, interval_s=0.02, what="victim owning pending entries")
    assert owned > 0
    answered_before = prod.poll()
    ray.kill(replica_actor("affine", victim), no_restart=True)

    results = prod.wait_all(timeout_s=120)
    assert answered_before < len(prod.sent)
    assert prod.duplicates() == {}
    assert all(res.ok for res in results)
    assert {res.request_id for res in results} == set(prod.sent)
    # Nothing stays pending: the dead consumer's entries were reclaimed and acknowledged.
    wait_until(lambda: group_backlog(r, prod.keys) == (0, 0), 30, what="empty backlog")
    dead = [c for c in group_consumers(r, prod.keys) if victim in c["name"]]
    assert all(int(c["pending"]) == 0 for c in dead)
    # Serve replaced the killed replica.
    wait_until(lambda: len(serve_replicas(env.deployer, "affine")) == 2
               and victim not in {x.replica_id for x in serve_replicas(env.deployer, "affine")}, 90,
               what="a replacement replica")


def test_rolling_version_update_under_load_loses_and_duplicates_nothing(env: RayEnv) -> None:
    ops.apply(env.deployer, {"applications": [_affine(env, version="1", num_replicas=2, fake_delay_ms=20.0,
                                                      max_batch=8, lease_s=5.0)]})
    old = {x.replica_id for x in serve_replicas(env.deployer, "affine")}
    r = env.r()
    prod = RawProducer(env.r(), "affine")
    stop = threading.Event()
    after_rollout: list[str] = []
    rolled = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            ids = prod.send(10, start=float(len(prod.sent)))
            if rolled.is_set():
                after_rollout.extend(ids)
            time.sleep(0.05)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        ops.deploy_version(env.deployer, "affine", "2", wait_s=240)
        rolled.set()
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(10)
    results = prod.wait_all(timeout_s=120)
    assert prod.duplicates() == {}
    assert {res.request_id for res in results} == set(prod.sent)
    assert all(res.ok for res in results)
    versions = {res.version for res in results}
    assert versions == {"1", "2"}
    by_id = {res.request_id: res for res in results}
    assert after_rollout and all(by_id[i].version == "2" for i in after_rollout)
    new = {x.replica_id for x in serve_replicas(env.deployer, "affine")}
    assert new and not (new & old)
    # The old replicas drained and left the group; nothing is left pending.
    wait_until(lambda: group_backlog(r, prod.keys) == (0, 0), 30, what="empty backlog")
    names = [c["name"] for c in group_consumers(r, prod.keys)]
    assert not [n for n in names if any(o in n for o in old)], names


def test_backlog_scales_the_deployment_up_and_drained_queue_scales_it_down(env: RayEnv) -> None:
    ops.apply(env.deployer, {"applications": [_affine(
        env, model="scaled", autoscale=True, min_replicas=1, max_replicas=3, target_backlog_per_replica=20.0,
        upscale_delay_s=0.5, downscale_delay_s=3.0, fake_delay_ms=100.0, max_batch=4, lease_s=5.0)]})
    assert len(serve_replicas(env.deployer, "scaled")) == 1
    prod = RawProducer(env.r(), "scaled")
    counts: list[int] = []

    def watch() -> bool:
        counts.append(len(serve_replicas(env.deployer, "scaled")))
        return counts[-1] == 3

    prod.send(500)
    wait_until(watch, 90, interval_s=0.5, what="scale-up to max_replicas=3")
    prod.wait_all(timeout_s=120)
    assert prod.duplicates() == {}
    wait_until(lambda: len(serve_replicas(env.deployer, "scaled")) == 1, 90, interval_s=0.5,
               what="scale-down to min_replicas=1 after the drain")
    assert max(counts) == 3
