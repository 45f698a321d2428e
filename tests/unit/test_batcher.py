"""Dynamic batching decisions (clock-injected, no sleeping) and length bucketing."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace.client.errors import ConfigError
from headrace.workers.engine.batcher import Batcher, select_window, split_by_length
from headrace.workers.testing.clock import ManualClock


def test_ready_when_preferred_batch_waits() -> None:
    clock = ManualClock()
    b: Batcher[int] = Batcher(max_batch=8, preferred_batch=3, max_wait_ms=50, clock=clock)
    b.put(1)
    b.put(2)
    assert b.take_ready() is None
    b.put(3)
    assert b.take_ready() == [1, 2, 3]
    assert len(b) == 0


def test_partial_batch_waits_at_most_max_wait_ms_from_oldest() -> None:
    clock = ManualClock()
    b: Batcher[str] = Batcher(max_batch=8, preferred_batch=0, max_wait_ms=20, clock=clock)
    b.put("a")
    clock.advance(0.015)
    b.put("b")
    assert b.take_ready() is None
    assert b.time_to_ready() == pytest.approx(0.005)
    clock.advance(0.006)
    assert b.take_ready() == ["a", "b"]
    assert b.time_to_ready() is None


def test_max_batch_caps_and_keeps_fifo_for_fixed_size_inputs() -> None:
    b: Batcher[int] = Batcher(max_batch=4, max_wait_ms=0, clock=ManualClock())
    for i in range(10):
        b.put(i)
    assert b.take_ready() == [0, 1, 2, 3]
    assert b.take_ready() == [4, 5, 6, 7]
    assert b.take_ready() == [8, 9]
    assert b.take_ready() is None


def test_variable_length_batch_is_closest_lengths_around_the_oldest() -> None:
    b: Batcher[str] = Batcher(max_batch=3, max_wait_ms=0, clock=ManualClock())
    # oldest is long; the batch must include it and its nearest lengths, not the 3 shortest.
    for name, length in [("old-long", 100), ("s1", 1), ("s2", 2), ("l1", 90), ("s3", 3), ("l2", 110)]:
        b.put(name, length)
    first = b.take_ready()
    assert first is not None and "old-long" in first
    assert set(first) == {"old-long", "l1", "l2"}
    assert set(b.take_ready() or []) == {"s1", "s2", "s3"}


def test_select_window_minimises_spread_and_includes_oldest() -> None:
    lengths = [50, 1, 2, 3, 49, 51, 200]
    picked = select_window(lengths, oldest=0, size=3)
    assert 0 in picked and sorted(lengths[i] for i in picked) == [49, 50, 51]
    assert select_window([5, 6], oldest=1, size=10) == [0, 1]


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=40),
       st.data(), st.integers(min_value=1, max_value=40))
@settings(max_examples=150, deadline=None)
def test_select_window_properties(lengths: list[int], data: st.DataObject, size: int) -> None:
    oldest = data.draw(st.integers(min_value=0, max_value=len(lengths) - 1))
    picked = select_window(lengths, oldest, size)
    assert oldest in picked
    assert len(picked) == min(size, len(lengths))
    assert len(set(picked)) == len(picked)


def test_split_by_length_separates_outlier_and_keeps_uniform_together() -> None:
    assert split_by_length([7] * 12) == [list(range(12))]
    lengths = [5] * 10 + [500]
    buckets = split_by_length(lengths, call_cost=64)
    assert buckets == [list(range(10)), [10]]
    # A small spread is not worth a second model call.
    assert len(split_by_length([10, 12, 11, 13], call_cost=64)) == 1


@given(st.lists(st.integers(min_value=0, max_value=2000), min_size=0, max_size=60),
       st.integers(min_value=0, max_value=500))
@settings(max_examples=150, deadline=None)
def test_split_by_length_is_a_partition_no_worse_than_one_bucket(lengths: list[int], call_cost: int) -> None:
    buckets = split_by_length(lengths, call_cost=call_cost)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(b for b in buckets)

    def cost(bs: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) + call_cost for b in bs)

    if lengths:
        assert cost(buckets) <= cost([list(range(len(lengths)))])


def test_close_flushes_without_waiting_then_ends() -> None:
    async def go() -> list[list[int] | None]:
        b: Batcher[int] = Batcher(max_batch=8, max_wait_ms=60_000)
        b.put(1)
        b.put(2)
        b.close()
        return [await b.next_batch(), await b.next_batch()]

    assert asyncio.run(go()) == [[1, 2], None]


def test_next_batch_wakes_on_put_and_on_deadline() -> None:
    async def go() -> tuple[list[int] | None, list[int] | None]:
        b: Batcher[int] = Batcher(max_batch=4, preferred_batch=2, max_wait_ms=30)
        waiter = asyncio.ensure_future(b.next_batch())
        await asyncio.sleep(0)
        b.put(1)
        b.put(2)  # reaches preferred_batch: ready at once
        first = await asyncio.wait_for(waiter, 1.0)
        b.put(3)  # alone: ready once max_wait_ms has passed
        second = await asyncio.wait_for(b.next_batch(), 1.0)
        return first, second

    assert asyncio.run(go()) == ([1, 2], [3])


def test_wait_for_room_blocks_until_a_batch_is_taken() -> None:
    async def go() -> bool:
        b: Batcher[int] = Batcher(max_batch=2, max_wait_ms=0)
        b.put(1)
        b.put(2)
        room = asyncio.ensure_future(b.wait_for_room(2))
        await asyncio.sleep(0.01)
        blocked = not room.done()
        assert await b.next_batch() == [1, 2]
        await asyncio.wait_for(room, 1.0)
        return blocked

    assert asyncio.run(go())


def test_handed_over_waits_for_an_idle_taker_to_take_the_ready_batch() -> None:
    """The reader lets a waiting model loop take a ready batch before it reads again (on an
    idle worker, sending the next read first delayed every request's model call)."""
    async def go() -> list[str]:
        events: list[str] = []
        b: Batcher[int] = Batcher(max_batch=4, max_wait_ms=0)

        async def taker() -> None:
            batch = await b.next_batch()
            events.append(f"took {batch}")

        task = asyncio.ensure_future(taker())
        await asyncio.sleep(0)  # the taker waits
        b.put(1)
        await asyncio.wait_for(b.handed_over(), 1.0)
        events.append("read again")
        await task
        return events

    assert asyncio.run(go()) == ["took [1]", "read again"]


def test_handed_over_does_not_wait_without_an_idle_taker_or_a_ready_batch() -> None:
    async def go() -> None:
        busy: Batcher[int] = Batcher(max_batch=4, max_wait_ms=0)
        busy.put(1)  # the model loop is busy elsewhere: read ahead
        await asyncio.wait_for(busy.handed_over(), 0.1)
        partial: Batcher[int] = Batcher(max_batch=4, max_wait_ms=50)
        waiter = asyncio.ensure_future(partial.next_batch())
        await asyncio.sleep(0)
        partial.put(1)  # not ready for 50 ms: more may be read meanwhile
        await asyncio.wait_for(partial.handed_over(), 0.01)
        assert await asyncio.wait_for(waiter, 1.0) == [1]

    asyncio.run(go())


def test_handed_over_is_not_left_waiting_by_a_cancelled_taker() -> None:
    async def go() -> None:
        b: Batcher[int] = Batcher(max_batch=4, max_wait_ms=0)
        taker = asyncio.ensure_future(b.next_batch())
        await asyncio.sleep(0)
        assert b._takers == 1
        taker.cancel()  # cancelled before it ran again: the put's wake-up never reaches it
        b.put(1)
        await asyncio.wait_for(b.handed_over(), 1.0)
        assert len(b) == 1

    asyncio.run(go())


def test_configure_validates_eagerly_and_applies() -> None:
    b: Batcher[int] = Batcher(max_batch=8, preferred_batch=4, max_wait_ms=5, clock=ManualClock())
    with pytest.raises(ConfigError, match="preferred_batch"):
        b.configure(preferred_batch=9)
    with pytest.raises(ConfigError, match="max_batch"):
        b.configure(max_batch=0)
    with pytest.raises(ConfigError, match="max_wait_ms"):
        b.configure(max_wait_ms=-1)
    b.configure(max_batch=2)  # the old preferred (4) is clipped to the new max
    assert (b.max_batch, b.preferred_batch) == (2, 2)
    b.configure(max_batch=16, preferred_batch=0)
    assert b.preferred_batch == 16


def test_no_lost_wakeups_with_concurrent_producers_room_waiters_and_consumer() -> None:
    """Two back-pressured producers and one consumer share the batcher's wakeups; none may
    sleep through a change meant for it (every item must come out, promptly)."""
    import random

    async def go(seed: int) -> list[int]:
        rng = random.Random(seed)
        b: Batcher[int] = Batcher(max_batch=4, preferred_batch=3, max_wait_ms=60_000)
        out: list[int] = []

        async def producer(start: int) -> None:
            for i in range(start, start + 200):
                await b.wait_for_room(4)
                b.put(i)
                if rng.random() < 0.5:
                    await asyncio.sleep(0)

        async def consumer() -> None:
            while True:
                batch = await b.next_batch()
                if batch is None:
                    return
                out.extend(batch)
                if rng.random() < 0.5:
                    await asyncio.sleep(0)

        eat = asyncio.ensure_future(consumer())
        await asyncio.wait_for(asyncio.gather(producer(0), producer(1000)), 5.0)
        b.close()
        await asyncio.wait_for(eat, 5.0)
        return out

    for seed in range(5):
        got = asyncio.run(go(seed))
        assert sorted(got) == list(range(200)) + list(range(1000, 1200))
