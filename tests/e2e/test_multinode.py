"""Multi-node placement on a simulated cluster (``ray.cluster_utils.Cluster``): a head node
without GPUs and worker nodes that declare 2 GPUs each (no real GPUs are used: replicas
serve the numpy fake, tensor-parallel ranks run gloo on CPU with ``tp_backend: gloo``).

One cluster for the module; the tests run in order and each applies its own config.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from headrace.client import Client
from headrace.cluster.ops import lifecycle as ops
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_port
from headrace.cluster.serve.app import ModelAppArgs, app_config
from tests.support.ray import RawProducer, group_backlog, group_consumers, serve_replicas, wait_until

pytestmark = pytest.mark.timeout(300)

# Batches slow enough (4 requests per 100 ms per replica) that a load is still running
# when a node goes away.
SLOW = {"fake_delay_ms": 100.0, "max_batch": 4}


@dataclass
class Sim:
    cluster: Any
    redis: EmbeddedRedis
    deployer: ops.LocalDeployer
    gpu_nodes: dict[str, Any]  # node id -> Node

    def add_gpu_node(self) -> str:
        node = self.cluster.add_node(num_cpus=2, num_gpus=2)
        self.cluster.wait_for_nodes()
        self.gpu_nodes[node.node_id] = node
        return str(node.node_id)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    with EmbeddedRedis() as rs:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
        s = Sim(cluster, rs, ops.LocalDeployer(http_options={"host": "127.0.0.1", "port": free_port()}), {})
        try:
            for _ in range(2):
                s.add_gpu_node()
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            yield s
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()


def _affine(sim: Sim, **kw: Any) -> dict[str, Any]:
    args = {"model": "affine", "fake": "affine", "redis_url": sim.redis.url, "num_cpus": 0.25,
            "lease_s": 2.0, "drain_timeout_s": 10.0, **kw}
    return app_config(ModelAppArgs.from_dict(args))


def test_replicas_spread_over_nodes_and_gpu_replicas_land_on_gpu_nodes(sim: Sim) -> None:
    ops.apply(sim.deployer, {"applications": [_affine(sim, num_replicas=2, num_gpus=0.5)]})
    nodes = [r.node_id for r in serve_replicas(sim.deployer, "affine")]
    assert len(nodes) == 2
    assert len(set(nodes)) == 2, "replicas should spread over nodes"
    assert set(nodes) <= set(sim.gpu_nodes), "GPU replicas must run on GPU nodes"


def test_tensor_parallel_group_ranks_share_one_gpu_node(sim: Sim, model_repo_dir: Path) -> None:
    from ray import serve

    from headrace.models.builtin.build import ensure_minilm

    ensure_minilm(model_repo_dir, torch_format=True)
    tp = ModelAppArgs(model="minilm-torch", redis_url=sim.redis.url, model_repo=str(model_repo_dir),
                      tensor_parallel=2, num_cpus=0.5, num_gpus=1.0, tp_backend="gloo")
    assert tp.bundles() == [{"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]
    ops.apply(sim.deployer, {"applications": [app_config(tp, name="tp")]}, wait_s=300)
    stats = serve.get_deployment_handle("StreamWorker", app_name="tp").stats.remote().result()
    ranks = stats["tp_rank_nodes"]
    assert len(ranks) == 2 and len(set(ranks)) == 1
    assert ranks[0] in sim.gpu_nodes
    with Client(sim.redis.url, timeout_s=120.0) as c:
        res = c.infer("minilm-torch", text="Ranks of one group share a node.")
    assert res.outputs["embeddings"].shape == (384,)


def test_added_node_lets_scale_place_more_replicas(sim: Sim) -> None:
    # Each replica takes a whole 2-GPU node: two nodes hold two replicas, not three.
    ops.apply(sim.deployer, {"applications": [_affine(sim, num_replicas=2, num_gpus=2.0, **SLOW)]})
    assert len(serve_replicas(sim.deployer, "affine")) == 2
    ops.scale(sim.deployer, "affine", 3, wait_s=None)
    time.sleep(5.0)
    assert len(serve_replicas(sim.deployer, "affine")) == 2, "no room for a third replica yet"
    new_node = sim.add_gpu_node()
    ops.wait_running(sim.deployer, ["affine"], timeout_s=120)
    wait_until(lambda: len(serve_replicas(sim.deployer, "affine")) == 3, 120, what="three replicas")
    rows = serve_replicas(sim.deployer, "affine")
    assert new_node in {r.node_id for r in rows}


def test_removing_a_node_with_a_replica_loses_no_request(sim: Sim) -> None:
    rows = serve_replicas(sim.deployer, "affine")
    if len(rows) != 3:  # run alone: set up what the previous test leaves behind
        ops.apply(sim.deployer, {"applications": [_affine(sim, num_replicas=3, num_gpus=1.0, **SLOW)]})
        rows = serve_replicas(sim.deployer, "affine")
    r = sim.redis
    import redis

    conn = redis.Redis.from_url(r.url)
    prod = RawProducer(conn, "affine")
    prod.send(300)
    victim_node, victim = rows[-1].node_id, rows[-1].replica_id
    # Remove the node while its replica owns in-flight entries.
    wait_until(lambda: any(victim in c["name"] and int(c["pending"]) > 0 for c in group_consumers(conn, prod.keys)),
               60, interval_s=0.02, what="victim owning pending entries")
    sim.cluster.remove_node(sim.gpu_nodes.pop(victim_node), allow_graceful=False)
    prod.send(300, start=300.0)
    results = prod.wait_all(timeout_s=180)
    assert prod.duplicates() == {}
    assert {x.request_id for x in results} == set(prod.sent)
    assert all(x.ok for x in results)
    wait_until(lambda: group_backlog(conn, prod.keys) == (0, 0), 60, what="empty backlog")
    survivors = {x.node_id for x in serve_replicas(sim.deployer, "affine")}
    assert victim_node not in survivors
