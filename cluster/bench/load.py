"""Load generators for ``headrace bench`` and the benchmark scripts.

Two ways to offer load to a :class:`Target` (anything with ``async call(index, timeout_s)``):

* **closed loop** (:func:`closed_loop`): ``concurrency`` submitters, each sends a request,
  waits for its answer, sends the next. Finds the saturation throughput.
* **open loop** (:func:`open_loop`): requests arrive on a Poisson schedule at a fixed rate
  whatever the system does (:func:`poisson_schedule`), which is how latency at a given
  load is measured. If the generator itself falls behind the schedule (a starved CPU), the
  lateness is reported rather than hidden.

Both are bounded: they stop sending after ``warmup_s + duration_s`` or ``max_requests``,
whichever comes first, and wait at most ``timeout_s`` for the answers still out. Latencies
run from the actual send to the answer (``time.perf_counter``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from headrace.client.errors import ConfigError
from headrace.cluster.bench.gcwatch import GcWatch
from headrace.cluster.bench.stats import STATUS_SEND_ERROR, STATUS_TIMEOUT, Sample, percentile

log = logging.getLogger(__name__)

SHED = "shed"  # open loop: not sent because max_in_flight requests were already out


@dataclass(frozen=True)
class Outcome:
    """The answer to one request, as a target reports it.

    Attributes:
        status: ``ok``, a wire status, ``timeout`` or ``send_error``.
        code: wire error code of a failure.
        queue_ms / infer_ms / batch_size: the system's own timings, when it reports them.
        done_s: ``time.perf_counter()`` when the answer arrived, if the target captured it
            more precisely than "when ``call`` returned".
        key: the request id, when the system has one.
    """

    status: str
    code: str = ""
    queue_ms: float | None = None
    infer_ms: float | None = None
    batch_size: int = 0
    done_s: float | None = None
    key: str = ""


class Target(Protocol):
    """A system under load. ``call`` sends request number ``index`` (targets cycle through
    a pool of inputs) and returns its :class:`Outcome`; it should not raise for a failed
    request, and must give up after about ``timeout_s`` with status ``timeout``."""

    name: str

    async def call(self, index: int, timeout_s: float) -> Outcome: ...


@dataclass(frozen=True)
class RunLimits:
    """Bounds of one load run.

    Attributes:
        duration_s: measured window (s), after the warm-up.
        warmup_s: load offered before the window opens (s), excluded from the figures.
        max_requests: never send more than this many requests in total.
        timeout_s: longest wait for any one answer (s); the run ends at most this long
            after the last send.
    """

    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 1_000_000
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ConfigError(f"duration_s must be > 0 s, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ConfigError(f"warmup_s must be >= 0 s, got {self.warmup_s}")
        if self.max_requests < 1:
            raise ConfigError(f"max_requests must be >= 1, got {self.max_requests}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 s, got {self.timeout_s}")

    @property
    def total_s(self) -> float:
        return self.warmup_s + self.duration_s


@dataclass
class RunResult:
    """Samples of one run and its measurement window (seconds since the run started).

    ``lateness_ms``: open loop only, how late each send was against its schedule.
    ``origin``: the ``time.perf_counter()`` value the run's times are relative to.
    """

    samples: list[Sample]
    start_s: float
    end_s: float
    lateness_ms: list[float] = field(default_factory=list)
    shed: int = 0
    origin: float = 0.0
    gc: dict[str, Any] = field(default_factory=dict)

    def generator_stats(self) -> dict[str, Any]:
        """How well the generator kept its schedule (open loop) and its own garbage
        collections during the run (:class:`~headrace.cluster.bench.gcwatch.GcWatch`)."""
        if not self.lateness_ms:
            return {"shed": self.shed, **self.gc}
        return {"late_p50_ms": percentile(self.lateness_ms, 50), "late_p99_ms": percentile(self.lateness_ms, 99),
                "shed": self.shed, **self.gc}


def poisson_schedule(rate_per_s: float, duration_s: float, *, seed: int = 0,
                     max_count: int | None = None) -> list[float]:
    """Send times (s from the start, ascending) of a Poisson process of ``rate_per_s``
    over ``[0, duration_s)``: exponential gaps of mean ``1 / rate_per_s``, seeded so
    every system in a comparison gets the very same arrivals. At most ``max_count``.

    Raises:
        ConfigError: a rate or duration <= 0.
    """
    if not rate_per_s > 0:
        raise ConfigError(f"rate must be > 0 requests/s, got {rate_per_s}")
    if not duration_s > 0:
        raise ConfigError(f"duration must be > 0 s, got {duration_s}")
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s and (max_count is None or len(out) < max_count):
        out.append(t)
        t += rng.expovariate(rate_per_s)
    return out


Progress = Callable[[int], None]  # called with the number of answers just received


def _sample(t0: float, sent: float, out: Outcome) -> Sample:
    if out.status in (STATUS_TIMEOUT, STATUS_SEND_ERROR, SHED):
        return Sample(sent - t0, None, out.status, out.code, key=out.key)
    done = out.done_s if out.done_s is not None else time.perf_counter()
    return Sample(sent - t0, max(0.0, (done - sent) * 1000.0), out.status, out.code,
                  out.queue_ms, out.infer_ms, out.batch_size, out.key)


async def _call(target: Target, index: int, timeout_s: float) -> Outcome:
    """``target.call`` that never raises: a target bug becomes a ``send_error`` sample,
    and a target that ignores its timeout is cut off a little after it."""
    try:
        return await asyncio.wait_for(target.call(index, timeout_s), timeout_s + 5.0)
    except asyncio.TimeoutError:
        return Outcome(STATUS_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - one failed request must not end the run
        log.debug("request %d to %s failed: %r", index, target.name, e)
        return Outcome(STATUS_SEND_ERROR, code=type(e).__name__)


async def closed_loop(target: Target, concurrency: int, limits: RunLimits,
                      progress: Progress | None = None) -> RunResult:
    """``concurrency`` submitters in lock-step with their answers (see module doc).

    Raises:
        ConfigError: ``concurrency < 1``.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    samples: list[Sample] = []
    next_index = 0
    t0 = stop_at = 0.0

    async def user() -> None:
        nonlocal next_index
        while next_index < limits.max_requests and time.perf_counter() < stop_at:
            i = next_index
            next_index += 1
            sent = time.perf_counter()
            out = await _call(target, i, limits.timeout_s)
            samples.append(_sample(t0, sent, out))
            if progress is not None:
                progress(1)

    with GcWatch() as watch:  # entered before t0: its one collection is not the run's time
        t0 = time.perf_counter()
        stop_at = t0 + limits.total_s
        await asyncio.gather(*(user() for _ in range(concurrency)))
    return RunResult(samples, limits.warmup_s, limits.total_s, origin=t0, gc=watch.stats())


async def open_loop(target: Target, rate_per_s: float, limits: RunLimits, *, seed: int = 0,
                    max_in_flight: int = 10_000, progress: Progress | None = None) -> RunResult:
    """Poisson arrivals at ``rate_per_s`` (see module doc). A request whose send time
    comes while ``max_in_flight`` are already out is not sent and counted as ``shed``
    (the run stays bounded in memory even against a stalled system).

    Raises:
        ConfigError: a rate <= 0 or ``max_in_flight < 1``.
    """
    if max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
    schedule = poisson_schedule(rate_per_s, limits.total_s, seed=seed, max_count=limits.max_requests)
    samples: list[Sample] = []
    lateness: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()
    shed = 0
    t0 = 0.0

    async def one(i: int, sent: float) -> None:
        out = await _call(target, i, limits.timeout_s)
        samples.append(_sample(t0, sent, out))
        if progress is not None:
            progress(1)

    with GcWatch() as watch:  # entered before t0: its one collection is not the run's time
        t0 = time.perf_counter()
        for i, at in enumerate(schedule):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            lateness.append(max(0.0, (sent - t0 - at) * 1000.0))
            if len(in_flight) >= max_in_flight:
                shed += 1
                samples.append(Sample(sent - t0, None, SHED))
                continue
            task = asyncio.get_running_loop().create_task(one(i, sent))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*list(in_flight))
    return RunResult(samples, limits.warmup_s, limits.total_s, lateness, shed, t0, gc=watch.stats())


class Ticker:
    """A tqdm bar over the run's wall time, showing answers and answers/s as it goes.

    Usage: ``async with Ticker(total_s, label) as tick: ... tick(n)``.
    """

    def __init__(self, total_s: float, label: str, enabled: bool = True) -> None:
        self.total_s, self.label, self.enabled = total_s, label, enabled
        self.answers = 0
        self._bar: Any = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self, n: int) -> None:
        self.answers += n

    async def __aenter__(self) -> Ticker:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=round(self.total_s, 1), desc=self.label, unit="s", leave=False,
                             bar_format="{desc}: {bar} {n:.0f}/{total:.0f}s {postfix}")
            self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self) -> None:
        start, last_n, last_t = time.perf_counter(), 0, time.perf_counter()
        while True:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            rate = (self.answers - last_n) / max(1e-9, now - last_t)
            last_n, last_t = self.answers, now
            self._bar.n = min(self.total_s, now - start)
            self._bar.set_postfix_str(f"{self.answers} answers, {rate:.0f}/s")

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._bar is not None:
            self._bar.close()
