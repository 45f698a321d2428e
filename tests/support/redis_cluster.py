"""A real Redis Cluster on loopback for tests and benchmarks: ``masters`` redis-server
processes in cluster mode, no replicas, the 16384 slots split evenly.

Built by hand rather than with ``redis-cli --cluster create``: each node gets its slot
range (``CLUSTER ADDSLOTSRANGE``), the first node ``CLUSTER MEET``s the others (naming their
bus ports, which are picked free instead of the default port + 10000, which may be taken or
beyond 65535), and :meth:`RedisClusterProcs.start` returns once every node reports
``cluster_state:ok``, knows every other node and sees all slots assigned.

    with RedisClusterProcs(3) as rc:
        client = redis.cluster.RedisCluster.from_url(rc.url)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

from headrace.client.errors import BrokerError
from headrace.client.keys import partition_of
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_ports
from headrace.cluster.ops.placement import Masters, place_keys

SLOTS = 16384


def slot_ranges(n: int) -> list[tuple[int, int]]:
    """``n`` contiguous, inclusive slot ranges covering 0..16383 (sizes differ by at most 1)."""
    if n < 1:
        raise ValueError("a cluster needs at least one master")
    bounds = [round(i * SLOTS / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


def _cluster_info(node: EmbeddedRedis) -> dict[str, str]:
    r = redis.Redis.from_url(node.url, socket_connect_timeout=1.0)
    try:
        info = r.cluster("info")  # redis-py parses CLUSTER INFO into a dict
    finally:
        r.close()
    return {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in dict(info).items()}


class RedisClusterProcs:
    """Start, inspect and stop a loopback Redis Cluster of ``masters`` nodes.

    Args:
        masters: number of master nodes (no replicas).
        node_timeout_ms: ``cluster-node-timeout``.
        appendonly: persist every node's data (AOF), so a node restarted on its data folder
            comes back with its streams (its cluster config, ``nodes.conf``, always persists).
        full_coverage: ``cluster-require-full-coverage``; False lets the other masters
            serve their slots while one is down.

    Raises:
        BrokerError: from :meth:`start` when a node does not come up or the cluster does
            not reach ``cluster_state:ok`` within ``timeout_s``.
    """

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 5000, appendonly: bool = False,
                 full_coverage: bool = True) -> None:
        self.masters = masters
        self.full_coverage = full_coverage
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.nodes: list[EmbeddedRedis] = []
        self.bus_ports: list[int] = []

    @property
    def url(self) -> str:
        """A startup node's URL (``RedisCluster.from_url`` discovers the others)."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout_s: float = 30.0) -> RedisClusterProcs:
        self._tmp = tempfile.TemporaryDirectory(prefix="headrace-cluster-")
        ports = free_ports(2 * self.masters)
        data_ports, self.bus_ports = ports[:self.masters], ports[self.masters:]
        try:
            for port, bus in zip(data_ports, self.bus_ports, strict=True):
                d = Path(self._tmp.name) / str(port)
                d.mkdir()
                node = EmbeddedRedis(port, data_dir=d, appendonly=self.appendonly, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-port", str(bus),
                    "--cluster-require-full-coverage", "yes" if self.full_coverage else "no"])
                self.nodes.append(node.start())
            self._form(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout_s: float) -> None:
        for i, (node, (lo, hi)) in enumerate(zip(self.nodes, slot_ranges(self.masters), strict=True)):
            r = redis.Redis.from_url(node.url)
            try:
                # Distinct config epochs from the start, as `redis-cli --cluster create` sets
                # them: left at 0 each, the nodes resolve the collision by gossip after the
                # cluster reports ok, and an epoch bumped then can cross a slot being placed.
                r.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
                r.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
            finally:
                r.close()
        first = redis.Redis.from_url(self.nodes[0].url)
        try:
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                first.execute_command("CLUSTER MEET", "127.0.0.1", node.port, bus)
        finally:
            first.close()
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Return once every node reports ``cluster_state:ok``, knows every other node and
        sees all slots assigned (after forming, or after a node restarted).

        Raises:
            BrokerError: not within ``timeout_s``.
        """
        give_up = time.monotonic() + timeout_s
        while True:
            infos = [_cluster_info(n) for n in self.nodes]
            if all(i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == str(self.masters)
                   and i.get("cluster_slots_assigned") == str(SLOTS) for i in infos):
                return
            if time.monotonic() > give_up:
                raise BrokerError(f"Redis Cluster of {self.masters} did not form within {timeout_s:.0f}s: "
                                  f"{[(i.get('cluster_state'), i.get('cluster_known_nodes')) for i in infos]}")
            time.sleep(0.1)

    def place(self, keys: Sequence[str], timeout_s: float = 30.0) -> list[int]:
        """Give the slot of ``keys[i]`` to master ``i % masters`` and return once every node
        agrees (:func:`headrace.cluster.ops.placement.place_keys`, what ``headrace partitions
        place`` does for a model). Returns the master index of each key. The slots must hold
        no keys (flush first).

        Raises:
            ConfigError: a slot that must move holds keys.
            BrokerError: the nodes did not agree on the new owners within ``timeout_s``.
        """
        clients = [redis.Redis.from_url(n.url, socket_connect_timeout=1.0) for n in self.nodes]
        try:
            masters = Masters(clients)
            dests = [masters.nodes.index(clients[i % self.masters]) for i in range(len(keys))]
            moves = place_keys(masters, keys, dests, timeout_s=timeout_s)
            return [clients.index(masters.nodes[mv.dst]) for mv in moves]
        finally:
            for c in clients:
                c.close()

    def slot_owners(self, node: int, slots: Sequence[int]) -> dict[int, str]:
        """The id of the master that node ``node`` maps each of ``slots`` to (``CLUSTER
        SLOTS``); a slot it sees unassigned is left out."""
        r = redis.Redis.from_url(self.nodes[node].url, socket_connect_timeout=1.0)
        try:
            return Masters([r]).owners(0, slots)
        finally:
            r.close()

    def epochs(self) -> list[int]:
        """Each master's config epoch, as the first node sees them."""
        r = redis.Redis.from_url(self.url)
        try:
            nodes = {info["node_id"]: int(info["epoch"]) for info in r.cluster("nodes").values()}
        finally:
            r.close()
        return [nodes[self._my_id(i)] for i in range(self.masters)]

    def cross(self, slot: int, timeout_s: float = 10.0) -> None:
        """Cross the nodes' maps on ``slot`` (empty, held by the master of the greatest config
        epoch) for good, the way hand-typed bare ``CLUSTER SETSLOT <slot> NODE <id>`` calls
        do (``placement``'s module docstring): the lowest-epoch master is told first, the
        owner's gossip takes the slot back from it, then the others are told. Afterwards
        the lowest-epoch master maps the slot to the old owner, the rest to the
        lowest-epoch master, and nobody claims it.

        Raises:
            AssertionError: the slot's owner is not the greatest-epoch master, or the maps
                did not end up crossed.
        """
        epochs = self.epochs()
        high, low = epochs.index(max(epochs)), epochs.index(min(epochs))
        ids = [self._my_id(i) for i in range(self.masters)]
        assert self.slot_owners(0, [slot]) == {slot: ids[high]}, "cross a slot of the greatest-epoch master"
        self._setslot(low, slot, ids[low])
        give_up = time.monotonic() + timeout_s
        while self.slot_owners(low, [slot]) != {slot: ids[high]}:  # the owner's gossip took it back
            assert time.monotonic() < give_up, "the old owner's gossip never took the slot back"
            time.sleep(0.05)
        for i in [i for i in range(self.masters) if i not in (low, high)] + [high]:
            self._setslot(i, slot, ids[low])
        time.sleep(1.0)  # gossip rounds: nobody claims the slot, so nothing uncrosses it
        views = [self.slot_owners(i, [slot]) for i in range(self.masters)]
        assert views[low] == {slot: ids[high]} and views[high] == {slot: ids[low]}, views

    def _my_id(self, node: int) -> str:
        r = redis.Redis.from_url(self.nodes[node].url)
        try:
            return str(r.execute_command("CLUSTER MYID").decode())
        finally:
            r.close()

    def _setslot(self, node: int, slot: int, owner_id: str) -> None:
        r = redis.Redis.from_url(self.nodes[node].url)
        try:
            r.execute_command("CLUSTER SETSLOT", slot, "NODE", owner_id)
        finally:
            r.close()

    def flush(self) -> None:
        """``FLUSHALL`` on every master."""
        for n in self.nodes:
            r = redis.Redis.from_url(n.url)
            try:
                r.flushall()
            finally:
                r.close()

    def stop(self) -> None:
        """Stop every node and remove the data folders. Idempotent."""
        for n in self.nodes:
            n.close()
        self.nodes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisClusterProcs:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def ids_on(partitions: Sequence[int], n: int, total: int) -> list[str]:
    """``n`` request ids (``r<k>``) that a model of ``total`` partitions routes to one of
    ``partitions``, so a test can aim requests at a chosen master."""
    return [f"r{i}" for i in range(5000) if partition_of(f"r{i}", total) in partitions][:n]


def affine_x(rid: str) -> dict[str, np.ndarray]:
    """The ``affine`` fake's input for an id of :func:`ids_on`: ``r<k>`` carries ``k``, so
    its answer is ``2k + 1``."""
    return {"x": np.full(4, float(rid[1:]), np.float32)}
