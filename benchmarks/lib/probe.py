"""A standalone worker with timing probes, for measuring what the queue itself costs.

``python -m benchmarks.lib.probe [the flags of python -m headrace.workers]`` runs
the ordinary :class:`~headrace.workers.engine.worker.StreamWorker` loop on the ordinary
:class:`~headrace.workers.broker.redis_broker.RedisBroker` and servable, wrapped to note per request:

* ``read``: when ``XREADGROUP`` returned the entry,
* ``infer0`` / ``infer1``: start and end of the model call that ran it,
* ``commit0`` / ``commit1``: start and end of the commit script that answered it.

The stamps are ``time.perf_counter()`` = ``CLOCK_MONOTONIC`` on Linux, one clock for every
process of the machine, so they line up with the load generator's send and receive times.
On exit (SIGTERM, after the drain) the probes are written as JSON lines
``{"id", "read", "infer0", "infer1", "commit0", "commit1"}`` to ``$HEADRACE_PROBE_OUT``.

:func:`split_overhead` then splits each request's end-to-end latency into the queue's
part (send -> read, commit start -> received) and the worker's serving part (admission,
batch formation, waiting for the model, the model runs of its batch).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.protocol import Request
from headrace.cluster.bench.stats import LatencySummary
from headrace.workers.backends.base import Servable
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.ops import Op
from headrace.workers.pipeline.stats import BatchStats
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

PROBE_ENV = "HEADRACE_PROBE_OUT"


class Probes:
    """Per-request stamps, keyed by request id (and entry id until the id is known)."""

    def __init__(self) -> None:
        self.by_id: dict[str, dict[str, float]] = {}
        self.entry_to_id: dict[str, str] = {}

    def note(self, request_id: str, what: str, t: float) -> None:
        self.by_id.setdefault(request_id, {})[what] = t

    def dump(self, path: str | os.PathLike[str]) -> int:
        with open(path, "w", encoding="utf-8") as fh:
            for rid, stamps in self.by_id.items():
                fh.write(json.dumps({"id": rid, **stamps}) + "\n")
        return len(self.by_id)


class ProbeBroker(RedisBroker):
    """:class:`RedisBroker` noting read and commit times."""

    def __init__(self, settings: WorkerSettings, probes: Probes) -> None:
        super().__init__(settings)
        self.probes = probes

    async def read(self, count: int, block_ms: int, budget_bytes: int | None = None) -> list[Entry]:
        entries = await super().read(count, block_ms, budget_bytes)
        t = time.perf_counter()
        for e in entries:
            raw = e.fields.get(b"id")
            if raw is not None:
                rid = raw.decode(errors="replace")
                self.probes.entry_to_id[e.entry_id] = rid
                self.probes.note(rid, "read", t)
        return entries

    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        t0 = time.perf_counter()
        out = await super().commit(ops, stats)
        t1 = time.perf_counter()
        for op in ops:
            rid = self.probes.entry_to_id.pop(op.entry_id, None)
            if rid is not None:
                self.probes.note(rid, "commit0", t0)
                self.probes.note(rid, "commit1", t1)
        return out


class ProbeServable(Servable):
    """Delegates to ``inner``, noting the start and end of each model call."""

    def __init__(self, inner: Servable, probes: Probes) -> None:
        self.thread_safe = inner.thread_safe
        self.inner, self.probes = inner, probes
        self.name, self.version = inner.name, inner.version
        self.accepts_text, self.inputs, self.outputs = inner.accepts_text, inner.inputs, inner.outputs

    def check(self, request: Request) -> None:
        self.inner.check(request)

    def length(self, request: Request) -> int:
        return self.inner.length(request)

    def lengths(self, requests: Sequence[Request]) -> list[int]:
        return self.inner.lengths(requests)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        return self.inner.plan(requests)

    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        t0 = time.perf_counter()
        out = self.inner.infer(requests)
        t1 = time.perf_counter()
        for r in requests:
            self.probes.note(r.request_id, "infer0", t0)
            self.probes.note(r.request_id, "infer1", t1)
        return out

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def split_overhead(sent: float, received: float, stamps: Mapping[str, float]) -> dict[str, float] | None:
    """Split one request's latency (all times ``perf_counter`` seconds) into ms parts:

    * ``wire_in``: send -> the worker's ``XREADGROUP`` returned it (submit script, stream,
      the worker loop getting to it);
    * ``serve``: read -> start of its commit (decode, batch formation, waiting for the
      model, the model calls of its whole batch, result encoding): the worker serving it;
    * ``infer``: its own model call (part of ``serve``);
    * ``deliver``: start of the commit script -> the client decoded the result (commit
      script with result, dedupe marker and ack; the client's ``XREAD``; decoding);
    * ``commit``: the commit call as the worker saw it (part of ``deliver``; includes the
      worker loop's delay in resuming after the reply);
    * ``queue``: ``wire_in + deliver``, the part of the latency the queue adds.

    ``commit1`` is not used as a boundary: it is noted when the worker's event loop
    resumes, which can be after the client already has the result.

    None when a stamp is missing (e.g. a request answered without running).
    """
    try:
        read, c0, c1 = stamps["read"], stamps["commit0"], stamps["commit1"]
        i0, i1 = stamps["infer0"], stamps["infer1"]
    except KeyError:
        return None
    parts = {"wire_in": read - sent, "serve": c0 - read, "infer": i1 - i0, "deliver": received - c0,
             "commit": c1 - c0}
    out = {k: v * 1000.0 for k, v in parts.items()}
    out["queue"] = out["wire_in"] + out["deliver"]
    return out


def queue_split(rr: Any, probes: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Percentiles (ms) of each latency part (see :func:`split_overhead`) over the ok
    requests of a load run ``rr`` sent inside its window, joined with the worker's probes."""
    parts: dict[str, list[float]] = {}
    joined = 0
    for s in rr.samples:
        if not (s.ok and rr.start_s <= s.sent_s < rr.end_s and s.key in probes):
            continue
        sent = rr.origin + s.sent_s
        split = split_overhead(sent, sent + (s.e2e_ms or 0.0) / 1000.0, probes[s.key])
        if split is None:
            continue
        joined += 1
        for k, v in split.items():
            parts.setdefault(k, []).append(v)
    return {"joined": joined, **{k: asdict(LatencySummary.of(v)) for k, v in parts.items()}}


def load_probes(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Probes written by a probe worker: request id -> stamps."""
    out: dict[str, dict[str, float]] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            rid = str(d.pop("id"))
            out[rid] = {k: float(v) for k, v in d.items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.lib.probe``: :mod:`benchmarks.lib.bench_worker` with probes
    to ``$HEADRACE_PROBE_OUT`` (required)."""
    from benchmarks.lib.bench_worker import main as worker_main

    if not os.environ.get(PROBE_ENV):
        logging.basicConfig()
        log.error("set %s to the file the probes go to", PROBE_ENV)
        return 2
    return worker_main(argv)


if __name__ == "__main__":
    sys.exit(main())
