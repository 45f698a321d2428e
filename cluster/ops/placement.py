"""Spread a partitioned model's (empty) slots evenly over the masters of a Redis Cluster.

A model's partition streams ``<ns>:{<model>~<p>}:requests`` land wherever CRC16 puts their
hash tags, often several on one master (``{affine~0..5}`` fall 1 / 1 / 4 on three equal slot
ranges). Before the model takes traffic an operator evens them out, once, moving as few as
that takes (every master ends with ``P // masters`` partitions or one more):

    headrace partitions place affine --partitions 6     # HEADRACE_REDIS_URL names any node

Each slot moves the way ``redis-cli --cluster reshard`` moves one (the order the ``CLUSTER
SETSLOT`` docs give): ``IMPORTING`` on the new owner, ``MIGRATING`` on the old one, then
``NODE`` on the new owner first, the old one next, every other master last. The race this
order prevents: a bare ``SETSLOT NODE`` sent to each node in turn leaves a window in which
the old owner's gossip, still claiming the slot with a greater config epoch, takes it back
from the nodes already told (the new owner included); once the old owner is told too nobody
claims it, and the nodes' maps stay crossed for good, every command on the slot bouncing
between two ``MOVED`` replies. A node importing a slot ignores gossip about it, and ``NODE``
on it bumps its config epoch above every other, so its claim wins everywhere.
:func:`place_partitions` then waits until every master names the new owners.

Only empty slots move (moving keys is ``redis-cli --cluster reshard``'s job); a slot that
holds keys is refused before anything changes. A slot whose masters disagree on its owner
(maps crossed by bare ``SETSLOT NODE`` calls, see above) is moved to its planned master the
same way, which repairs it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.cluster import key_slot

from headrace.client.errors import BrokerError, ConfigError
from headrace.client.keys import partition_keys

#: seconds one round of moves waits for every master to agree before it repairs and retries.
ROUND_S = 5.0


@dataclass(frozen=True)
class Move:
    """Partition ``partition``'s slot ``slot``, held by master ``src``, goes to ``dst``
    (indexes into the masters list; ``src == dst``: it stays). ``agreed`` is False when the
    masters' maps disagree on the slot's owner (``src`` is then the first master's view);
    such a slot is always moved, which repairs it."""

    partition: int
    slot: int
    src: int
    dst: int
    agreed: bool = True

    @property
    def moves(self) -> bool:
        return self.src != self.dst or not self.agreed


class Masters:
    """The masters of one Redis Cluster, one plain (non-cluster) sync client each, in the
    order of the lowest slot each holds (a fresh cluster's node order).

    Args:
        nodes: one ``redis.Redis`` per master; the caller owns (and closes) them.

    Raises:
        BrokerError: from any method, when a node does not answer.
    """

    def __init__(self, nodes: Sequence[Any]) -> None:
        self.nodes = list(nodes)
        self.ids: list[str] = []
        self.ids = [_text(self._on(i, "CLUSTER MYID")) for i in range(len(self.nodes))]
        lowest = self._lowest_slots()
        order = sorted(range(len(self.nodes)), key=lambda i: lowest.get(self.ids[i], 1 << 20))
        self.nodes, self.ids = [self.nodes[i] for i in order], [self.ids[i] for i in order]

    @classmethod
    def of_cluster(cls, rc: Any) -> Masters:
        """The masters of redis-py's ``RedisCluster`` client ``rc`` (its node connections)."""
        return cls([rc.get_redis_connection(n) for n in rc.get_primaries()])

    def address(self, node: int) -> str:
        """``host:port`` of master ``node`` (for tables and messages)."""
        kw = self.nodes[node].connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def owners(self, node: int, slots: Sequence[int]) -> dict[int, str]:
        """The master id that master ``node`` maps each of ``slots`` to (``CLUSTER SLOTS``);
        a slot it sees unassigned is left out."""
        found: dict[int, str] = {}
        for lo, hi, master, *_ in self._on(node, "CLUSTER SLOTS"):
            found.update({s: _text(master[2]) for s in slots if lo <= s <= hi})
        return found

    def keys_in(self, node: int, slot: int) -> int:
        return int(self._on(node, "CLUSTER COUNTKEYSINSLOT", slot))

    def move_empty_slot(self, slot: int, dst: int) -> None:
        """Give ``slot`` (holding no keys outside ``dst``) to master ``dst`` in the reshard
        order (module docstring), whoever holds it now, also when the masters' maps disagree
        on that.

        Raises:
            ConfigError: ``dst`` sees the slot unassigned.
        """
        n = len(self.nodes)
        claims = [i for i in range(n) if i != dst and self.owners(i, [slot]).get(slot) == self.ids[i]]
        seen = self.owners(dst, [slot]).get(slot)
        if seen is None:
            raise ConfigError(f"master {dst} sees slot {slot} unassigned; assign it first (CLUSTER ADDSLOTS)")
        if seen != self.ids[dst]:
            self._on(dst, "CLUSTER SETSLOT", slot, "IMPORTING", seen)
        for i in claims:
            self._on(i, "CLUSTER SETSLOT", slot, "MIGRATING", self.ids[dst])
        self._on(dst, "CLUSTER SETSLOT", slot, "NODE", self.ids[dst])
        if seen == self.ids[dst]:
            # dst already maps the slot to itself, so no import bumped its epoch: others
            # mapping it elsewhere would ignore its claim unless its epoch is the greatest.
            self._on(dst, "CLUSTER BUMPEPOCH")
        for i in [*claims, *[i for i in range(n) if i != dst and i not in claims]]:
            self._on(i, "CLUSTER SETSLOT", slot, "NODE", self.ids[dst])

    def wait_agreed(self, wanted: dict[int, int], timeout_s: float) -> None:
        """Return once every master maps each slot of ``wanted`` to its master index.

        Raises:
            BrokerError: not within ``timeout_s`` seconds (the message shows each view).
        """
        ids = {slot: self.ids[m] for slot, m in wanted.items()}
        give_up = time.monotonic() + timeout_s
        while True:
            views = [self.owners(i, list(ids)) for i in range(len(self.nodes))]
            if all(v == ids for v in views):
                return
            if time.monotonic() > give_up:
                raise BrokerError(f"the masters did not agree on the new slot owners {ids} within {timeout_s:g}s; "
                                  f"each master's view: {views}")
            time.sleep(0.05)

    def _lowest_slots(self) -> dict[str, int]:
        lowest: dict[str, int] = {}
        for lo, _hi, master, *_ in self._on(0, "CLUSTER SLOTS"):
            mid = _text(master[2])
            lowest[mid] = min(lowest.get(mid, lo), lo)
        return lowest

    def _on(self, node: int, *args: Any) -> Any:
        import redis

        try:
            return self.nodes[node].execute_command(*args)
        except redis.ResponseError as e:
            raise BrokerError(f"Redis Cluster master {node} ({self.ids[node] if self.ids else '?'}) refused "
                              f"{' '.join(map(str, args))}: {e}") from e
        except redis.RedisError as e:
            raise BrokerError(f"Redis Cluster master {node} did not answer {args[0]}: {e}") from e


def balanced(now: Sequence[int], masters: int) -> list[int]:
    """Destinations for items now on masters ``now`` (one master index each): every master
    ends with ``len(now) // masters`` or one more, and as few items as that allows move
    (an item stays where it is while its master has room; the rest fill the emptiest
    master, the lowest index first)."""
    n = len(now)
    floor, extra = divmod(n, masters)
    count = [0] * masters
    dests: list[int | None] = [None] * n
    for i, m in enumerate(now):  # first everyone's fair share, where it is
        if count[m] < floor:
            dests[i], count[m] = m, count[m] + 1
    for i, m in enumerate(now):  # then the one-more share of ``extra`` masters
        if dests[i] is None and count[m] == floor and extra > 0:
            dests[i], count[m], extra = m, count[m] + 1, extra - 1
    for i in range(n):
        if dests[i] is None:
            m = min(range(masters), key=lambda j: (count[j], j))
            dests[i], count[m] = m, count[m] + 1
    return [d for d in dests if d is not None]


def plan(masters: Masters, keys: Sequence[str], dests: Sequence[int] | None = None) -> list[Move]:
    """Where the slot of each of ``keys`` (one per partition) is and where it goes:
    ``dests[p]`` (a master index), by default :func:`balanced` (the fewest moves that leave
    every master an even share). A key whose slot an earlier key shares (two hash tags
    with one CRC16) goes wherever that one goes.

    Raises:
        ConfigError: a slot that would move holds keys, or no master holds it.
    """
    slots = [key_slot(k.encode()) for k in keys]
    views = [masters.owners(i, slots) for i in range(len(masters.nodes))]
    for p, slot in enumerate(slots):
        if slot not in views[0]:
            raise ConfigError(f"slot {slot} of partition {p} is not assigned to any master; assign every slot first "
                              "(CLUSTER ADDSLOTSRANGE) and check `redis-cli --cluster check`")
    firsts = {slot: p for p, slot in reversed(list(enumerate(slots)))}
    where = [masters.ids.index(views[0][slot]) for slot in slots]
    unique = sorted(firsts.values())  # the partition that first names each slot
    if dests is None:
        goes = dict(zip(unique, balanced([where[p] for p in unique], len(masters.nodes)), strict=True))
    else:
        if len(dests) != len(keys) or not all(0 <= d < len(masters.nodes) for d in dests):
            raise ConfigError(f"need one master index in 0..{len(masters.nodes) - 1} per key, got {list(dests)}")
        goes = {p: dests[p] for p in unique}
    moves = [Move(p, slot, where[p], goes[firsts[slot]], all(v.get(slot) == views[0][slot] for v in views))
             for p, slot in enumerate(slots)]
    for mv in moves:
        if mv.moves and firsts[mv.slot] == mv.partition:
            held = {i: k for i in range(len(masters.nodes)) if i != mv.dst and (k := masters.keys_in(i, mv.slot))}
            if held:
                raise ConfigError(f"slot {mv.slot} of partition {mv.partition} holds keys on master(s) {held} (master: "
                                  "keys): only empty slots are placed here; drain the model first, or move the slot "
                                  "with its keys by `redis-cli --cluster reshard`")
    return moves


def place_keys(masters: Masters, keys: Sequence[str], dests: Sequence[int] | None = None, *, dry_run: bool = False,
               timeout_s: float = 30.0) -> list[Move]:
    """Give the slot of each of ``keys`` to its master (:func:`plan`) and wait until every
    master agrees, moving a slot still disagreed on again after each :data:`ROUND_S`;
    nothing changes when a slot that must move holds keys. Returns the plan (with
    ``dry_run``, only the plan).

    Raises:
        ConfigError: a slot that must move holds keys, or is unassigned (nothing changed).
        BrokerError: a master did not answer, or the masters did not agree within
            ``timeout_s`` seconds.
    """
    moves = plan(masters, keys, dests)
    if dry_run:
        return moves
    give_up = time.monotonic() + timeout_s
    todo = moves
    while True:
        done: set[int] = set()
        for move in todo:
            if move.moves and move.slot not in done:
                masters.move_empty_slot(move.slot, move.dst)
                done.add(move.slot)
        try:
            masters.wait_agreed({mv.slot: mv.dst for mv in moves}, min(ROUND_S, max(0.0, give_up - time.monotonic())))
            return moves
        except BrokerError:
            if time.monotonic() >= give_up:
                raise
        # A slot that gossip still crossed (e.g. a node's epoch changed meanwhile): the next
        # round sees the masters disagree on it and moves it again.
        todo = plan(masters, keys, [mv.dst for mv in moves])


def place_partitions(masters: Masters, namespace: str, model: str, partitions: int, *, dry_run: bool = False,
                     timeout_s: float = 30.0) -> list[Move]:
    """:func:`place_keys` for the request streams of ``model``'s ``partitions`` partitions
    (every key of a partition shares its stream's slot), balanced with the fewest moves."""
    keys = [k.requests for k in partition_keys(namespace, model, partitions)]
    return place_keys(masters, keys, dry_run=dry_run, timeout_s=timeout_s)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
