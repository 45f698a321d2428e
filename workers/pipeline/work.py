"""Admitted work and what one commit writes for it.

A :class:`Work` is a checked request waiting for (or in) a model call. A :class:`Unit`
collects the ops of one batch (or one admission round) with what the writer reports once
they are committed (:class:`Meta`) and the model calls that produced them (:class:`Call`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from headrace.client.protocol import STATUS_OK, Request
from headrace.workers.pipeline.entry import Entry, elapsed_ms
from headrace.workers.pipeline.group import Group
from headrace.workers.pipeline.ops import Op
from headrace.workers.pipeline.stats import BatchStats


@dataclass(frozen=True)
class Work:
    """A checked request: ``read_ms`` is when it was read (Unix ms); ``length`` the
    servable's batching cost hint (computed once, at admission). A sample of a multi-sample
    entry names its ``group`` and its ``index`` there; a ``block`` is ``count`` consecutive
    samples of one from ``index`` on, its inputs stacked on a leading axis of ``count`` rows
    (one array per input: no per-sample objects); a text block carries its ``texts`` and
    their length hints (``row_lengths``) instead, its request has neither inputs nor text."""

    entry: Entry
    request: Request
    read_ms: int
    length: int = 0
    group: Group | None = None
    index: int = 0
    count: int = 1
    block: bool = False
    texts: Sequence[str] = ()
    row_lengths: Sequence[int] = ()


def split_work(work: Work, k: int) -> tuple[Work, Work]:
    """A block cut into its first ``k`` samples and the rest (row views, no copies); the
    batcher's ``split``. Only blocks are ever cut (a single sample weighs 1)."""
    if not work.block or not 0 < k < work.count:
        raise ValueError(f"cannot cut {k} samples off a work of {work.count}")
    req, texts, lengths = work.request, work.texts, work.row_lengths
    head = Request(req.envelope, inputs={n: a[:k] for n, a in req.inputs.items()})
    tail = Request(req.envelope, inputs={n: a[k:] for n, a in req.inputs.items()})
    return (dataclasses.replace(work, request=head, count=k, texts=texts[:k], row_lengths=lengths[:k]),
            dataclasses.replace(work, request=tail, index=work.index + k, count=work.count - k, texts=texts[k:],
                                row_lengths=lengths[k:]))


@dataclass(frozen=True)
class Meta:
    """What the writer reports for an op once it is committed: ``ts_ms`` the producer's
    submit time (0 when unknown), ``queue_s`` from submit to batch (seconds)."""

    status: str
    code: str
    ts_ms: int
    queue_s: float


@dataclass(frozen=True)
class Call:
    """One model call: how many requests ran together and how long it took (seconds)."""

    size: int
    infer_s: float


@dataclass
class Unit:
    """Ops of one batch (or one admission round), committed together."""

    ops: list[Op] = field(default_factory=list)
    meta: list[Meta | None] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def add(self, op: Op, meta: Meta | None) -> None:
        self.ops.append(op)
        self.meta.append(meta)

    @property
    def batch(self) -> int:
        """Requests that ran in a model call."""
        return sum(c.size for c in self.calls)

    @property
    def infer_ms(self) -> float:
        return sum(c.infer_s for c in self.calls) * 1000.0

    def stats_line(self, worker: str, at_ms: int) -> BatchStats:
        """This unit's line of the stats stream, latencies measured up to ``at_ms``
        (requests without a plausible submit time have none)."""
        answered = [m for m in self.meta if m is not None]
        ok = sum(1 for m in answered if m.status == STATUS_OK)
        lat = [lat for m in answered if (lat := elapsed_ms(at_ms, m.ts_ms)) > 0]
        return BatchStats(worker, self.batch, ok, len(answered) - ok, round(self.infer_ms, 3), lat)
