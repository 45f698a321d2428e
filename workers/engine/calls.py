"""How a batch of admitted work becomes model calls, and how a failing call is split.

Pure functions of :class:`~headrace.workers.pipeline.work.Work` lists, used by
:class:`~headrace.workers.engine.inference.BatchRunner`: which rows may be stacked together
(:func:`row_signature`), the stacked inputs (:func:`stack_rows`) or texts (:func:`text_rows`)
of a call, text calls run per length bucket (:func:`infer_text_buckets`), calls cut to a
model's own largest call (:func:`cut_calls`) and the parts a failing call is re-run in
(:func:`isolation_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.workers.backends.base import Servable
from headrace.workers.pipeline.work import Work, split_work

#: a failing call of more requests than this is split in halves; up to this many are re-run
#: one request at a time: as few calls as halving them (<= 8 against 6), and each batch-mate
#: runs only once more.
SPLIT_ABOVE = 8


def row_signature(w: Work) -> tuple[Any, ...]:
    """What rows must share to be stacked together: each input's name, row shape and dtype
    (texts: nothing, the servable tokenises and pads them)."""
    if w.texts or w.request.text is not None:
        return ("texts",)
    return tuple(sorted((n, a.shape[1:] if w.block else a.shape, a.dtype.str) for n, a in w.request.inputs.items()))


def stack_rows(works: Sequence[Work]) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs of ``works`` (of one :func:`row_signature`) on one leading axis: blocks as
    they are, single samples as one row each (no copy for a lone block)."""
    names = list(works[0].request.inputs)
    if len(works) == 1 and works[0].block:
        return dict(works[0].request.inputs)
    return {n: np.concatenate([w.request.inputs[n] if w.block else w.request.inputs[n][None] for w in works])
            for n in names}


def text_rows(works: Sequence[Work]) -> tuple[list[str], list[int]]:
    """The texts of ``works`` in row order (a block's texts, a single sample's text) and the
    length hint of each."""
    texts: list[str] = []
    lengths: list[int] = []
    for w in works:
        if w.block:
            texts.extend(w.texts)
            lengths.extend(w.row_lengths if len(w.row_lengths) == w.count else [w.length] * w.count)
        else:
            texts.append(w.request.text or "")
            lengths.append(w.length)
    return texts, lengths


def infer_text_buckets(servable: Servable, texts: list[str], ids: list[str],
                       buckets: list[list[int]]) -> dict[str, np.ndarray[Any, Any]]:
    """``servable.infer_texts`` once per length bucket (row indices, see
    :func:`~headrace.workers.engine.batcher.split_by_length`: texts of similar length are padded
    together), the outputs put back in row order. Runs on the inference thread.

    Raises:
        ModelError: the servable failed, or its buckets' outputs do not fit together (row
            counts, names, row shapes or dtypes differ).
    """
    if len(buckets) == 1 and len(buckets[0]) == len(texts):
        return servable.infer_texts(texts, ids)
    out: dict[str, np.ndarray[Any, Any]] = {}
    for idx in buckets:
        part = servable.infer_texts([texts[i] for i in idx], [ids[i] for i in idx])
        if out and set(part) != set(out):
            raise E.ModelError(f"outputs {sorted(part)} of one length bucket differ from {sorted(out)} of another")
        for name, value in part.items():
            v = np.asarray(value)
            if v.ndim == 0 or len(v) != len(idx):
                raise E.ModelError(f"output {name!r} has shape {list(v.shape)} for {len(idx)} texts; expected a row "
                                   "per text")
            if name not in out:
                out[name] = np.empty((len(texts), *v.shape[1:]), dtype=v.dtype)
            elif out[name].shape[1:] != v.shape[1:] or out[name].dtype != v.dtype:
                raise E.ModelError(f"output {name!r} rows of {v.dtype}{list(v.shape[1:])} in one length bucket, "
                                   f"{out[name].dtype}{list(out[name].shape[1:])} in another")
            out[name][idx] = v
    return out


def cut_calls(works: list[Work], cap: int) -> list[list[Work]]:
    """``works`` in calls of at most ``cap`` samples (0 = one call), in order; a block that
    straddles a boundary is cut there (row views)."""
    if cap <= 0 or sum(w.count for w in works) <= cap:
        return [works]
    calls: list[list[Work]] = []
    call: list[Work] = []
    room = cap
    for w in works:
        while w.count > room:
            head, w = split_work(w, room) if w.block and room > 0 else (None, w)
            if head is not None:
                call.append(head)
            calls.append(call)
            call, room = [], cap
        call.append(w)
        room -= w.count
        if room == 0:
            calls.append(call)
            call, room = [], cap
    if call:
        calls.append(call)
    return [c for c in calls if c]


def isolation_parts(works: list[Work]) -> list[list[Work]]:
    """How a failing call is re-run to isolate the failing sample: a lone block in halves;
    more than :data:`SPLIT_ABOVE` works in halves; else each work alone."""
    if len(works) == 1:
        head, tail = split_work(works[0], works[0].count // 2)
        return [[head], [tail]]
    half = len(works) // 2
    return [works[:half], works[half:]] if len(works) > SPLIT_ABOVE else [[w] for w in works]
