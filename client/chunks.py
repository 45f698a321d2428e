"""Chunks of ``map`` items sent as multi-sample entries (see ``client/samples.py``).

``map``/``imap`` group consecutive items that can share one entry (texts with texts,
tensor items with the same input names, shapes and dtypes) into chunks of at most
``chunk_size`` samples; one chunk is one entry, answered by one result whose per-sample
slots come back as the items' results, in input order. A lone item (chunk size 1, or an
item that fits none of its neighbours) is sent as a plain single-sample request.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.client import protocol
from headrace.client.keys import ModelKeys
from headrace.client.protocol import Result
from headrace.client.samples import MultiRequest
from headrace.client.submit import PreparedRequest, check_deadline, named_arrays, new_request_id, split_item


@dataclass(frozen=True)
class Chunk:
    """Several ``map`` items as one entry: ``texts``, or ``inputs`` stacked along a new
    leading (sample) axis."""

    size: int
    texts: Sequence[str] | None = None
    inputs: Mapping[str, np.ndarray[Any, Any]] | None = None


def chunked(items: Iterable[Any], chunk_size: int) -> Iterator[Any]:
    """``items`` with runs of compatible neighbours replaced by :class:`Chunk` s of at most
    ``chunk_size`` (lazily: it reads one item ahead of what it yields).

    Raises:
        ProtocolError: an item is neither ``str`` nor a mapping (``bad_value``).
    """
    if chunk_size <= 1:
        yield from items
        return
    run: list[tuple[Any, Mapping[str, Any] | None, str | None]] = []
    kind: Hashable = None
    for item in items:
        inputs, text = split_item(item)
        arrays = None if inputs is None else named_arrays(inputs)
        this = "text" if arrays is None else tuple((k, a.shape, a.dtype.str) for k, a in sorted(arrays.items()))
        if run and (this != kind or len(run) >= chunk_size):
            yield _pack(run)
            run = []
        run.append((item, arrays, text))
        kind = this
    if run:
        yield _pack(run)


def _pack(run: list[tuple[Any, Mapping[str, Any] | None, str | None]]) -> Any:
    if len(run) == 1:
        return run[0][0]
    if run[0][2] is not None:
        return Chunk(len(run), texts=[t for _, _, t in run if t is not None])
    first = run[0][1]
    assert first is not None
    return Chunk(len(run), inputs={k: np.stack([a[k] for _, a, _ in run if a is not None]) for k in first})


def prepare_chunk(keys: ModelKeys, reply_to: str, chunk: Chunk, *, request_id: str | None,
                  deadline_s: float) -> PreparedRequest:
    """Encode ``chunk`` as one multi-sample entry for ``keys.model``.

    Raises:
        ProtocolError: an invalid request id, or inputs that do not encode.
        ConfigError: a nan or infinite ``deadline_s``.
    """
    check_deadline(deadline_s)
    rid = request_id if request_id is not None else new_request_id()
    now = protocol.now_ms()
    env = protocol.Envelope(request_id=rid, reply_to=reply_to, model=keys.model, ts_ms=now,
                            deadline_ms=now + int(deadline_s * 1000) if deadline_s else 0)
    fields = MultiRequest(env, inputs=chunk.inputs, texts=chunk.texts).encode()
    protocol.check_request_id(rid)
    protocol.check_reply_to(reply_to)
    return PreparedRequest(model=keys.model, request_id=rid, stream=keys.requests, reply_to=reply_to,
                           deadline_ms=env.deadline_ms, fields=fields)


def expand(result: Result, size: int) -> list[Result]:
    """The per-item results of an entry of ``size`` items: its sample slots, or (the entry
    was refused as a whole, e.g. ``too_many_samples`` or past its deadline) its one result
    for each item."""
    if size <= 1 and not result.samples:
        return [result]
    if result.samples:
        return list(result.samples)
    return [result] * size
