"""What ``headrace bench`` and the benchmark scripts put load on, and with which inputs.

* :class:`Payloads`: a fixed pool of inputs (real sentences for text models, seeded random
  tensors for tensor models) that every system in a comparison cycles through in the same
  order.
* :class:`HeadraceTarget`: requests through Redis with the SDK (:class:`AsyncClient`).
* :class:`InProcessTarget`: the reference without a queue: the worker's own batcher
  (:class:`~headrace.workers.engine.batcher.Batcher`, same length bucketing) and the same servable
  in one process. The latency headrace adds over it at equal load is the queue overhead.
* :func:`raw_throughput`: the physical limit: the servable's ``infer`` on back-to-back
  batches of a fixed size, the same batch code path the worker runs.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import STATUS_ERROR, STATUS_OK, Envelope, Request
from headrace.cluster.bench.load import Outcome
from headrace.cluster.bench.stats import STATUS_SEND_ERROR, STATUS_TIMEOUT

if TYPE_CHECKING:
    from headrace.client.aio import AsyncClient
    from headrace.workers.backends.base import Servable

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payloads:
    """A pool of request inputs: either ``texts`` or ``tensors`` (one sample each)."""

    texts: tuple[str, ...] = ()
    tensors: tuple[Mapping[str, Array], ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if bool(self.texts) == bool(self.tensors):
            raise E.ConfigError("a payload pool holds either texts or tensors, and at least one item")

    def __len__(self) -> int:
        return len(self.texts) or len(self.tensors)

    @property
    def is_text(self) -> bool:
        return bool(self.texts)

    def item(self, index: int) -> tuple[Mapping[str, Array] | None, str | None]:
        """``(inputs, text)`` of request ``index`` (the pool is cycled)."""
        if self.texts:
            return None, self.texts[index % len(self.texts)]
        return self.tensors[index % len(self.tensors)], None

    def request(self, index: int, request_id: str | None = None) -> Request:
        """Request ``index`` as a decoded :class:`Request` (for in-process runs)."""
        inputs, text = self.item(index)
        env = Envelope(request_id or f"bench-{index}", "bench:reply")
        return Request(env, text=text) if text is not None else Request(env, inputs=dict(inputs or {}))

    def describe(self) -> dict[str, Any]:
        if self.texts:
            return {"kind": "text", "items": len(self.texts), "source": self.source,
                    "mean_chars": round(sum(map(len, self.texts)) / len(self.texts), 1)}
        first = self.tensors[0]
        return {"kind": "tensor", "items": len(self.tensors), "source": self.source,
                "inputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in first.items()}}


def text_payloads(n: int = 512, *, seed: int = 0, text_file: str | Path | None = None) -> Payloads:
    """``n`` real sentences: lines of ``text_file``, else held-out sentences of the offline
    corpus (Python's own documentation, see :mod:`headrace.models.builtin.corpus`).

    Raises:
        ConfigError: the file is unreadable or has no non-empty line.
    """
    if text_file:
        try:
            lines = [ln.strip() for ln in Path(text_file).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise E.ConfigError(f"cannot read text file {text_file}: {e}") from e
        lines = [ln for ln in lines if ln]
        if not lines:
            raise E.ConfigError(f"text file {text_file} has no non-empty line")
        return Payloads(texts=tuple(lines[:n]), source=str(text_file))
    from headrace.models.builtin.corpus import load_corpus, sample

    corpus = load_corpus(("pydoc",))
    return Payloads(texts=tuple(sample(corpus.held_out, n, seed=seed)), source="corpus:pydoc held-out")


def tensor_payloads(specs: Sequence[Mapping[str, Any]], n: int = 256, *, seed: int = 0,
                    dynamic_len: int = 16) -> Payloads:
    """``n`` seeded random samples for a tensor signature (``[{name, dtype, shape}]``,
    per sample, ``-1`` = dynamic axis, set to ``dynamic_len``). Floats are standard
    normal, integers uniform in [0, 100), booleans fair coins.

    Raises:
        ConfigError: an empty signature or an unknown dtype.
    """
    if not specs:
        raise E.ConfigError("the model declares no inputs; pass --text-file for a text model")
    rng = np.random.default_rng(seed)
    pool: list[dict[str, Array]] = []
    for _ in range(n):
        sample: dict[str, Array] = {}
        for s in specs:
            shape = tuple(dynamic_len if int(d) < 0 else int(d) for d in s.get("shape", ()))
            try:
                dt = np.dtype(str(s.get("dtype", "float32")))
            except TypeError as e:
                raise E.ConfigError(f"input {s.get('name')!r}: unknown dtype {s.get('dtype')!r}") from e
            if dt.kind == "f":
                arr = rng.standard_normal(shape).astype(dt)
            elif dt.kind in "iu":
                arr = rng.integers(0, 100, size=shape).astype(dt)
            elif dt.kind == "b":
                arr = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise E.ConfigError(f"input {s.get('name')!r}: cannot generate dtype {dt.name}")
            sample[str(s["name"])] = arr
        pool.append(sample)
    return Payloads(tensors=tuple(pool), source=f"random(seed={seed})")


def payloads_for(describe: Mapping[str, Any] | None, n: int = 512, *, seed: int = 0,
                 text_file: str | None = None, dynamic_len: int = 16) -> Payloads:
    """Inputs for a served model from its registry description (``Servable.describe()``).

    Raises:
        ConfigError: neither a description nor a text file says what to send.
    """
    if text_file:
        return text_payloads(n, seed=seed, text_file=text_file)
    if describe is None:
        raise E.ConfigError("no worker has registered this model, so its inputs are unknown; start a worker "
                            "or pass --text-file for a text model")
    if describe.get("accepts_text"):
        return text_payloads(n, seed=seed)
    return tensor_payloads(list(describe.get("inputs") or []), n, seed=seed, dynamic_len=dynamic_len)


# --- systems under load -------------------------------------------------------------------


class HeadraceTarget:
    """Requests through Redis Streams with the asyncio SDK.

    The answer time is taken in the ticket's done-callback, i.e. when the client's reader
    decoded the result, not when the awaiting coroutine next ran.
    """

    def __init__(self, client: AsyncClient, model: str, payloads: Payloads, name: str = "headrace") -> None:
        self.client, self.model, self.payloads, self.name = client, model, payloads, name
        self._reported: set[str] = set()

    async def call(self, index: int, timeout_s: float) -> Outcome:
        inputs, text = self.payloads.item(index)
        arrived: list[float] = []
        try:
            ticket = await self.client.submit(self.model, inputs, text)
        except E.HeadraceError as e:
            kind = f"{type(e).__name__}:{e.code}"
            if kind not in self._reported:  # once per kind: a run may fail thousands of times alike
                self._reported.add(kind)
                log.warning("submitting request %d to %s failed: %s", index, self.model, e)
            return Outcome(STATUS_SEND_ERROR, e.code)
        ticket.add_done_callback(lambda _t: arrived.append(time.perf_counter()))
        try:
            res = await ticket.wait(timeout_s)
        except E.ResultTimeout:
            return Outcome(STATUS_TIMEOUT, key=ticket.request_id)
        t = res.timings
        return Outcome(res.status, res.code, t.queue_ms, t.infer_ms, t.batch_size,
                       arrived[0] if arrived else None, ticket.request_id)


@dataclass
class _Pending:
    request: Request
    length: int
    future: asyncio.Future[Outcome] = field(repr=False)


class InProcessTarget:
    """The queue-less reference: the worker's batching policy and the servable in this
    process (see module doc). Use as ``async with InProcessTarget(...) as target``.

    Args:
        servable: the loaded model.
        payloads: inputs, cycled.
        max_batch / preferred_batch / max_wait_ms / instances: as the worker's settings.
    """

    def __init__(self, servable: Servable, payloads: Payloads, *, max_batch: int = 32, preferred_batch: int = 0,
                 max_wait_ms: float = 5.0, name: str = "in-process", instances: int = 1) -> None:
        from headrace.workers.engine.batcher import Batcher

        self.servable, self.payloads, self.name = servable, payloads, name
        self._requests = [payloads.request(i) for i in range(len(payloads))]
        self._batcher: Batcher[_Pending] = Batcher(max_batch, preferred_batch, max_wait_ms)
        self._instances = instances
        self._executor = ThreadPoolExecutor(instances, thread_name_prefix="bench-infer")
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> InProcessTarget:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve()) for _ in range(self._instances)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._batcher.close()
        await asyncio.gather(*self._tasks)
        self._executor.shutdown(wait=True)

    async def call(self, index: int, timeout_s: float) -> Outcome:
        k = index % len(self._requests)
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        # Costed on arrival, as the worker's admission does (text servables keep the tokens).
        length = int(self.servable.length(self._requests[k]))
        self._batcher.put(_Pending(self._requests[k], length, fut), length)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            return Outcome(STATUS_TIMEOUT)

    async def _serve(self) -> None:
        from headrace.workers.engine.batcher import split_by_length

        loop = asyncio.get_running_loop()
        while True:
            batch = await self._batcher.next_batch()
            if batch is None:
                return
            # The worker's own bucketing: text batches of very different lengths run as
            # several model calls when that saves padded work.
            buckets = (split_by_length([p.length for p in batch]) if self.servable.accepts_text
                       else [list(range(len(batch)))])
            for bucket in buckets:
                works = [batch[i] for i in bucket]
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(self._executor, _infer, self.servable, [w.request for w in works])
                    status, code = STATUS_OK, ""
                except Exception as e:  # noqa: BLE001 - a failed batch answers its requests, the loop goes on
                    log.warning("in-process reference batch of %d failed: %s", len(works), e)
                    status, code = STATUS_ERROR, E.MODEL_ERROR
                t1 = time.perf_counter()
                for w in works:
                    if not w.future.done():
                        w.future.set_result(Outcome(status, code, 0.0, (t1 - t0) * 1000.0, len(works), t1))


def _infer(servable: Servable, requests: list[Request]) -> Any:
    """``servable.infer(requests)``, failing with an exception the awaiting future accepts
    (:func:`~headrace.workers.engine.daemon.future_safe`): through ``run_in_executor`` a
    stray ``StopIteration`` would leave the batch's callers waiting forever."""
    from headrace.workers.engine.daemon import future_safe

    try:
        return servable.infer(requests)
    except StopIteration as e:
        raise future_safe(e) from e


def raw_throughput(servable: Servable, payloads: Payloads, batch: int, seconds: float, *,
                   min_batches: int = 3, bucketing: bool = True, instances: int = 1) -> dict[str, float]:
    """The limit: ``servable.infer`` on back-to-back batches of ``batch`` consecutive pool
    items for about ``seconds`` (at least ``min_batches``), after one warm-up batch. With
    ``bucketing`` a text batch is split by length exactly as the worker splits it. With
    ``instances`` > 1, that many threads run batches at once on the one servable, as a
    worker with ``instances`` does.

    Returns ``{"batch", "rps", "instances", "batch_ms_p50", "batches", "seconds"}``.

    Raises:
        ModelError: the servable failed.
    """
    from headrace.workers.engine.batcher import split_by_length

    requests = [payloads.request(i) for i in range(len(payloads))]

    def run(start: int) -> None:
        chosen = [requests[(start + k) % len(requests)] for k in range(batch)]
        # The length hint is part of the timed work, as in the worker (it admits each
        # request with its length, and text servables keep the tokens for the batch).
        buckets = (split_by_length([int(servable.length(r)) for r in chosen])
                   if bucketing and servable.accepts_text else [list(range(batch))])
        for b in buckets:
            servable.infer([chosen[j] for j in b])

    run(0)
    lat: list[float] = []
    done = [0] * instances
    t_start = time.perf_counter()

    def loop(k: int) -> None:
        # Each instance walks its own stretch of the pool, as concurrent batches would.
        start_index = k * batch * 1000
        n = 0
        while time.perf_counter() - t_start < seconds or n < min_batches:
            t0 = time.perf_counter()
            run(start_index)
            lat.append(time.perf_counter() - t0)
            done[k] += batch
            start_index += batch
            n += 1

    if instances == 1:
        loop(0)
    else:
        threads = [threading.Thread(target=loop, args=(k,), name=f"raw-{k}") for k in range(instances)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    total = time.perf_counter() - t_start
    done_total = sum(done)
    return {"batch": float(batch), "rps": done_total / total, "instances": float(instances),
            "batch_ms_p50": statistics.median(lat) * 1000.0,
            "batches": float(len(lat)), "seconds": total}
