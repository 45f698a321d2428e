"""Saturate a served model through the SDK from a process of its own, and count what comes back.

    python -m benchmarks.lib.saturate REDIS_URL NAMESPACE MODEL KIND IN_FLIGHT WARMUP_S DURATION_S [CHUNK]
        [--arrays BLOCK]

``AsyncClient.imap`` (the SDK's bulk path: pipelined submits, at most ``IN_FLIGHT``
samples outstanding, in multi-sample entries of ``CHUNK`` samples, default 1) over an
endless stream of inputs: ``KIND`` ``affine`` sends float32 ``x`` of shape (4,), ``text``
cycles through real sentences (the held-out corpus, each numbered so no two are equal).
With ``--arrays BLOCK`` it drives ``AsyncClient.imap_arrays`` instead: endless blocks of
``BLOCK`` samples (one array each, or a list of texts), answered as arrays (the SDK's array
path). After
``WARMUP_S`` the answers arriving over ``DURATION_S`` are counted. The load generator runs
in its own process (its own interpreter and GIL), as the bare ceiling's producer and
reader do, so the benchmark driver's own work does not share its core time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def items(kind: str) -> Iterator[Any]:
    """Endless map items for ``kind`` (``affine`` or ``text``)."""
    if kind == "text":
        from headrace.cluster.bench.targets import text_payloads

        # A number on each text makes every one distinct, as live traffic mostly is: the
        # worker's tokeniser cache (a text sent again is not tokenised again) must not turn
        # the corpus' repeats into free tokenisation.
        texts = text_payloads(512, seed=0).texts
        return (f"{t} [{i}]" for i, t in enumerate(itertools.cycle(texts)))
    rng = np.random.default_rng(0)
    pool = [{"x": rng.standard_normal(4).astype(np.float32)} for _ in range(256)]
    return itertools.cycle(pool)


class _Window:
    """The measuring window: answers before ``warmup_s`` are the warm-up, answers from
    ``warmup_s`` to ``warmup_s + duration_s`` count; CPU counts from the first counted answer."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        t0 = time.perf_counter()
        self.start, self.end = t0 + warmup_s, t0 + warmup_s + duration_s
        self.c_start = 0.0

    def at(self) -> str:
        """``warmup``, ``in`` (count this answer) or ``over`` (stop)."""
        now = time.perf_counter()
        if now < self.start:
            return "warmup"
        if not self.c_start:
            self.c_start = time.process_time()
        return "over" if now >= self.end else "in"

    def cpu_s(self) -> float:
        return time.process_time() - self.c_start


async def saturate(url: str, namespace: str, model: str, kind: str, in_flight: int, warmup_s: float,
                   duration_s: float, chunk: int = 1, block: int = 0) -> dict[str, Any]:
    """Answers per second over the window, their statuses, and this process' CPU per answer
    (``block`` > 0: through the array path, ``affine`` inputs in blocks of that many samples)."""
    from headrace.client.aio import AsyncClient

    statuses: Counter[str] = Counter()
    batch_sizes: list[int] = []
    total = 0
    window = _Window(warmup_s, duration_s)
    async with AsyncClient(url, namespace=namespace, max_in_flight=in_flight, timeout_s=60.0) as client:
        if block:
            return await _saturate_arrays(client, model, kind, block, chunk, window, duration_s)
        stream: Any = client.imap(model, items(kind), progress=False, chunk_size=chunk)  # closable
        async with contextlib.aclosing(stream) as results:
            async for res in results:
                total += 1
                at = window.at()
                if at == "warmup":
                    continue
                if at == "over":
                    break
                statuses[res.status] += 1
                batch_sizes.append(res.timings.batch_size)
    n = sum(statuses.values())
    return {"samples_per_s": statuses["ok"] / duration_s, "answers": n, "answers_total": total, "chunk": chunk,
            "statuses": dict(statuses),
            "mean_batch": (sum(batch_sizes) / len(batch_sizes)) if batch_sizes else 0.0,
            "load_generator_cpu_us_per_sample": window.cpu_s() * 1e6 / max(1, n)}


def _blocks(kind: str, block: int) -> Iterator[Any]:
    """Endless blocks of ``block`` samples: ``{"x": array}`` (affine) or lists of distinct texts."""
    if kind == "text":
        texts = items("text")
        return (list(itertools.islice(texts, block)) for _ in itertools.count())
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((block, 4)).astype(np.float32) for _ in range(4)]
    return ({"x": x} for x in itertools.cycle(pool))


async def _saturate_arrays(client: Any, model: str, kind: str, block: int, chunk: int, window: _Window,
                           duration_s: float) -> dict[str, Any]:
    ok = failed = total = 0
    stream: Any = client.imap_arrays(model, _blocks(kind, block), progress=False, chunk_size=chunk,
                                     raise_on_error=False)
    async with contextlib.aclosing(stream) as results:
        async for res in results:
            total += len(res)
            at = window.at()
            if at == "warmup":
                continue
            if at == "over":
                break
            n_ok = int(res.ok.sum())
            ok, failed = ok + n_ok, failed + len(res) - n_ok
    n = ok + failed
    return {"samples_per_s": ok / duration_s, "answers": n, "answers_total": total, "chunk": chunk, "block": block,
            "statuses": {"ok": ok, "not ok": failed}, "mean_batch": 0.0,
            "load_generator_cpu_us_per_sample": window.cpu_s() * 1e6 / max(1, n)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("namespace")
    ap.add_argument("model")
    ap.add_argument("kind", choices=("affine", "text"))
    ap.add_argument("in_flight", type=int)
    ap.add_argument("warmup_s", type=float)
    ap.add_argument("duration_s", type=float)
    ap.add_argument("chunk", type=int, nargs="?", default=1)
    ap.add_argument("--arrays", type=int, default=0, metavar="BLOCK",
                    help="drive imap_arrays with blocks of BLOCK samples (arrays, or lists of texts)")
    a = ap.parse_args(argv)
    out = asyncio.run(saturate(a.url, a.namespace, a.model, a.kind, a.in_flight, a.warmup_s, a.duration_s, a.chunk,
                               a.arrays))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
