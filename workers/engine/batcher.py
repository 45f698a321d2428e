"""Dynamic batching: when to run, which requests run together.

The worker's reader puts checked requests in; the inference loop takes batches out.

* A batch is ready when ``preferred_batch`` requests wait, when the oldest has waited
  ``max_wait_ms``, or when the batcher is closed (draining: no more waiting).
* It holds at most ``max_batch`` requests. When more are waiting and they have different
  lengths (text), the batch is the ``max_batch`` requests of closest length around the
  oldest one: the oldest request always goes (no starvation) and padding stays small.
* An item may weigh more than one sample (a block of a multi-sample entry): sizes, readiness
  and room are counted in samples, and a queue holding blocks is taken oldest first up to
  ``max_batch`` samples, the block that does not fit cut by the ``split`` function (its
  tail stays first in line).
* :func:`split_by_length` cuts a batch of very different lengths into buckets that run as
  separate model calls, when that saves more padded work than the extra call costs.

Everything but :meth:`Batcher.next_batch` is synchronous and clock-injectable, so the
decisions are unit-testable without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Item(Generic[T]):
    payload: T
    length: int
    enqueued_s: float
    seq: int
    weight: int = 1


def select_window(lengths: Sequence[int], oldest: int, size: int) -> list[int]:
    """Indices of ``size`` items of closest length that include index ``oldest``.

    Sorts by length, then slides a window of ``size`` over the sorted order among the
    positions that contain ``oldest`` and keeps the one with the smallest length spread.
    """
    n = len(lengths)
    if size >= n:
        return list(range(n))
    if min(lengths) == max(lengths):  # fixed-size inputs: what the sort below picks, without it
        start = max(0, oldest - size + 1)
        return list(range(start, start + size))
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    pos = order.index(oldest)
    best_start, best_spread = 0, None
    for start in range(max(0, pos - size + 1), min(pos, n - size) + 1):
        spread = lengths[order[start + size - 1]] - lengths[order[start]]
        if best_spread is None or spread < best_spread:
            best_start, best_spread = start, spread
    return sorted(order[best_start:best_start + size])


def split_by_length(lengths: Sequence[int], call_cost: int = 64) -> list[list[int]]:
    """Partition indices into length buckets minimising padded work.

    The cost of a bucket is ``len(bucket) * max_length + call_cost`` (``call_cost`` in the
    same units as the lengths, e.g. characters: the fixed price of one more model call).
    Optimal contiguous partition of the sorted lengths by dynamic programming; for large
    batches (> 128) a single bucket is returned (the O(n^2) search would cost milliseconds).

    Returns buckets of indices, each sorted by length ascending.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    if n <= 1 or n > 128 or lengths[order[0]] == lengths[order[-1]]:
        return [order] if n else []
    srt = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * srt[j - 1] + call_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    buckets: list[list[int]] = []
    j = n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


class Batcher(Generic[T]):
    """Holds checked requests until a batch is ready. See module doc.

    Args:
        max_batch: most requests per batch.
        preferred_batch: run as soon as this many wait (0 = ``max_batch``).
        max_wait_ms: longest time the oldest request waits for batch-mates (ms).
        clock: monotonic seconds.
        split: ``split(payload, k)`` cuts an item of weight > k into its first ``k`` samples
            and the rest (None: an item that does not fit waits for the next batch, or goes
            alone when it is the oldest).

    Raises:
        ConfigError: invalid sizes.
    """

    def __init__(self, max_batch: int, preferred_batch: int = 0, max_wait_ms: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 split: Callable[[T, int], tuple[T, T]] | None = None) -> None:
        self._items: list[_Item[T]] = []
        self._samples = 0  # the items' weights added up
        self._split = split
        self._seq = 0
        self._clock = clock
        self._closed = False
        # Waiters hold the current change future and every change resolves it: unlike a
        # shared Event that each waiter clears, no waiter can clear away another's wakeup.
        self._changed: asyncio.Future[None] | None = None
        self.max_batch = 1
        self.preferred_batch = 1
        self._preferred_raw = 0
        self.max_wait_ms = 0.0
        self._takers = 0  # next_batch callers waiting
        self.configure(max_batch=max_batch, preferred_batch=preferred_batch, max_wait_ms=max_wait_ms)

    def configure(self, max_batch: int | None = None, preferred_batch: int | None = None,
                  max_wait_ms: float | None = None) -> None:
        """Change batching parameters; applies to the next batch.

        Raises:
            ConfigError: ``max_batch < 1``, ``preferred_batch`` outside [0, max_batch],
                or negative ``max_wait_ms``.
        """
        from headrace.client.errors import ConfigError

        mb = self.max_batch if max_batch is None else max_batch
        raw = min(self._preferred_raw, mb) if preferred_batch is None else preferred_batch
        mw = self.max_wait_ms if max_wait_ms is None else max_wait_ms
        if mb < 1:
            raise ConfigError(f"max_batch must be >= 1, got {mb}")
        if not 0 <= raw <= mb:
            raise ConfigError(f"preferred_batch must be between 0 (= max_batch) and max_batch={mb}, got {raw}")
        if mw < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {mw}")
        self.max_batch, self._preferred_raw, self.max_wait_ms = mb, raw, float(mw)
        self.preferred_batch = raw or mb
        self._wake()

    def __len__(self) -> int:
        """Samples queued (an item weighs its samples)."""
        return self._samples

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, payload: T, length: int = 0, weight: int = 1) -> None:
        """Queue one request; ``length`` is its padding cost proxy (0 for fixed-size),
        ``weight`` the samples it carries (>= 1)."""
        weight = max(1, int(weight))
        self._items.append(_Item(payload, int(length), self._clock(), self._seq, weight))
        self._samples += weight
        self._seq += 1
        self._wake()

    def close(self) -> None:
        """Stop waiting for batch-mates: what is queued is handed out at once, then
        :meth:`next_batch` returns None."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    def _change(self) -> asyncio.Future[None]:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def wake(self) -> None:
        """Make waiters re-check their conditions (e.g. a stop flag of ``wait_for_room``)."""
        self._wake()

    def time_to_ready(self) -> float | None:
        """Seconds until a batch is ready: 0 when ready now, None when nothing is queued."""
        if not self._items:
            return None
        if self._closed or self._samples >= self.preferred_batch:
            return 0.0
        waited_s = self._clock() - self._items[0].enqueued_s
        return max(0.0, self.max_wait_ms / 1000.0 - waited_s)

    def take(self) -> list[T]:
        """Remove and return the next batch regardless of readiness (empty when none)."""
        if not self._items:
            return []
        if self._samples != len(self._items):
            return self._take_weighted()
        picked = select_window([it.length for it in self._items], 0, self.max_batch)
        chosen = set(picked)
        batch = [self._items[i].payload for i in picked]
        self._items = [it for i, it in enumerate(self._items) if i not in chosen]
        self._samples -= len(batch)
        self._wake()
        return batch

    def _take_weighted(self) -> list[T]:
        """Oldest first up to ``max_batch`` samples; the item that does not fit is cut (its
        tail keeps its place and age) or, without ``split``, waits (unless it is the oldest:
        then it goes alone, so nothing starves)."""
        batch: list[T] = []
        room = self.max_batch
        taken = 0
        while taken < len(self._items) and room > 0:
            it = self._items[taken]
            if it.weight <= room:
                batch.append(it.payload)
                room -= it.weight
                taken += 1
                continue
            if self._split is not None:
                head, tail = self._split(it.payload, room)
                batch.append(head)
                self._items[taken] = dataclasses.replace(it, payload=tail, weight=it.weight - room)
                room = 0
            elif not batch:
                batch.append(it.payload)
                room -= it.weight
                taken += 1
            break
        del self._items[:taken]
        self._samples -= self.max_batch - room  # what went out: the room it filled
        self._wake()
        return batch

    def take_ready(self) -> list[T] | None:
        """The next batch if one is ready now, else None."""
        ttr = self.time_to_ready()
        if ttr is None or ttr > 0:
            return None
        return self.take()

    async def next_batch(self) -> list[T] | None:
        """Wait for a ready batch. Returns None once closed and empty."""
        while True:
            changed = self._change()  # taken before the checks: no change can slip between
            batch = self.take_ready()
            if batch:
                return batch
            if self._closed and not self._items:
                return None
            # asyncio.wait, not wait_for: it never loses a cancellation (CPython gh-86296)
            # and never cancels the shared future.
            self._takers += 1
            try:
                await asyncio.wait({changed}, timeout=self.time_to_ready())
            except asyncio.CancelledError:
                self._takers -= 1
                self._wake()  # a handed_over caller counting on this taker looks again
                raise
            self._takers -= 1

    async def handed_over(self) -> None:
        """Wait until a ready batch is taken by a :meth:`next_batch` caller already waiting
        for one; return at once when none waits (the model is busy: the caller reads ahead)
        or no batch is ready."""
        while self._takers and self.time_to_ready() == 0:
            await asyncio.wait({self._change()})

    async def wait_for_room(self, limit: int, until: Callable[[], bool] | None = None) -> None:
        """Wait until fewer than ``limit`` samples are queued (reader back-pressure), the
        batcher is closed, or ``until()`` is true (checked on every :meth:`wake`)."""
        while True:
            changed = self._change()
            if self._samples < limit or self._closed or (until is not None and until()):
                return
            await asyncio.wait({changed})
