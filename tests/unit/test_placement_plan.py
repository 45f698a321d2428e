"""``placement.balanced``: the partition spread ``headrace partitions place`` aims at, even
and with the fewest moves (the cluster side is tests/integration/test_partitions_place.py)."""

from __future__ import annotations

import random
from collections import Counter

from headrace.cluster.ops.placement import balanced


def _fewest_moves(now: list[int], masters: int) -> int:
    """Items that must move: each master keeps at most its fair share, and ``extra`` of
    the crowded ones one more."""
    floor, extra = divmod(len(now), masters)
    counts = Counter(now)
    kept = sum(min(counts[m], floor) for m in range(masters)) + min(extra, sum(counts[m] > floor for m in range(masters)))
    return len(now) - kept


def test_every_master_gets_an_even_share_with_the_fewest_moves() -> None:
    rng = random.Random(7)
    for _ in range(500):
        masters = rng.randint(1, 6)
        now = [min(int(rng.expovariate(1.0)), masters - 1) for _ in range(rng.randint(0, 20))]  # crowded low
        dests = balanced(now, masters)
        assert len(dests) == len(now) and all(0 <= d < masters for d in dests)
        floor = len(now) // masters
        assert all(floor <= Counter(dests)[m] <= floor + 1 for m in range(masters)), (now, dests)
        assert sum(a != b for a, b in zip(now, dests, strict=True)) == _fewest_moves(now, masters), (now, dests)


def test_a_crowded_master_gives_up_only_what_it_holds_over_its_share() -> None:
    assert balanced([2, 1, 2, 0, 2, 2], 3) == [2, 1, 2, 0, 0, 1]
