"""The samples of one multi-sample entry, answered together (see ``client/samples.py``).

Each sample runs as its own :class:`~headrace.workers.pipeline.work.Work`, or, for a servable
that runs stacked samples, a whole run of them as one block (the batcher packs samples of
several entries into one model call and spreads a large entry over several); its outcome
fills the entry's slot(s). A block's outputs are kept as the stacked arrays the model call
returned: an entry answered by blocks alone is encoded from them without a result object
per sample. The entry is answered, with one result for all its
samples, by whichever batch fills its last slot: so it is committed once, like a
single-sample entry.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import DTYPES, STATUS_ERROR, STATUS_OK, Envelope, Result, Status, error_result
from headrace.client.wire import all_str, dtype_name, take_row
from headrace.workers.pipeline.entry import Entry

log = logging.getLogger(__name__)

#: what a slot answered by a block holds (its outputs are rows of the block's arrays).
IN_BLOCK: Final = Result("", STATUS_OK)

Arrays = dict[str, np.ndarray[Any, Any]]


class Group:
    """Slots of one multi-sample entry (only the event loop touches it).

    Attributes:
        entry / envelope: the entry and its routing fields.
        read_ms: when it was read (Unix ms).
        slots: one result per sample once known (no timings: the entry's result has them).
        infer_s: model time of the calls its samples ran in (seconds, summed).
        batch_size: the largest model call one of its samples ran in.
    """

    def __init__(self, entry: Entry, envelope: Envelope, read_ms: int, count: int) -> None:
        self.entry, self.envelope, self.read_ms = entry, envelope, read_ms
        self.slots: list[Result | None] = [None] * count
        self.left = count
        self.infer_s = 0.0
        self.batch_size = 0
        self.answered = False
        #: a failing sample of it was logged as a warning (the others go to DEBUG).
        self.warned = False
        #: (first index, count, outputs with a leading axis of count rows) of each block run.
        self.blocks: list[tuple[int, int, Arrays]] = []

    @property
    def complete(self) -> bool:
        return self.left == 0

    def fill(self, index: int, result: Result) -> bool:
        """Record sample ``index``'s outcome (the first one wins). True when this filled the
        last open slot: the caller answers the entry now."""
        if self.slots[index] is not None:
            return False
        self.slots[index] = result
        self.left -= 1
        return self.left == 0

    def fill_block(self, index: int, count: int, outputs: Arrays) -> bool:
        """Record the outcome of samples ``index .. index+count-1``, run as one block:
        ``outputs`` hold one row per sample. True when this filled the last open slot."""
        if self.slots[index:index + count].count(None) != count:  # some already known: first wins
            done = False
            for j in range(count):
                done = self.fill(index + j, Result(self.envelope.request_id, STATUS_OK,
                                                   {k: take_row(v, j) for k, v in outputs.items()})) or done
            return done
        self.slots[index:index + count] = [IN_BLOCK] * count
        self.blocks.append((index, count, outputs))
        self.left -= count
        return self.left == 0

    def fail(self, index: int, code: str, message: str, status: Status = STATUS_ERROR, count: int = 1) -> bool:
        """:meth:`fill` with an error outcome, for ``count`` samples from ``index`` on."""
        done = False
        for i in range(index, index + count):
            done = self.fill(i, error_result(self.envelope.request_id, code, message, status=status)) or done
        return done

    def stacked(self) -> Arrays | None:
        """The outputs of every sample stacked in sample order, when blocks answered them all
        with the same output names, row shapes and wire dtypes (one array per output, no
        object per sample); else None (:meth:`results` has them slot by slot)."""
        if not self.blocks or sum(c for _, c, _ in self.blocks) != len(self.slots):
            return None
        blocks = sorted(self.blocks, key=lambda b: b[0])
        first = blocks[0][2]
        sig = {k: (v.shape[1:], v.dtype) for k, v in first.items()}
        if not all(_encodable(v) for v in first.values()):
            return None
        for _, _, outs in blocks[1:]:
            if {k: (v.shape[1:], v.dtype) for k, v in outs.items()} != sig:
                return None
        if len(blocks) == 1:
            return dict(first)
        return {k: np.concatenate([outs[k] for _, _, outs in blocks]) for k in first}

    def ran(self, infer_s: float, size: int) -> None:
        """Note a model call one of its samples ran in."""
        self.infer_s += infer_s
        self.batch_size = max(self.batch_size, size)

    def results(self) -> tuple[Result, ...]:
        """The slots, each output checked encodable (a non-wire dtype fails that sample only)."""
        slots = list(self.slots)
        for index, count, outputs in self.blocks:
            for j in range(count):
                slots[index + j] = Result(self.envelope.request_id, STATUS_OK,
                                          {k: take_row(v, j) for k, v in outputs.items()})
        out: list[Result] = []
        for res in slots:
            assert res is not None, "results() of an incomplete group"
            bad = [k for k, v in res.outputs.items() if not _encodable(v)]
            if bad:
                log.warning("request %s: a sample's model output %r cannot be sent (%s); that sample is answered "
                            "model_error", res.request_id, bad[0], type(res.outputs[bad[0]]).__name__)
                res = error_result(res.request_id, E.MODEL_ERROR, f"cannot encode the model output {bad[0]!r}: its "
                                   "dtype is not a wire dtype, or it is a string tensor holding a non-str")
            out.append(res)
        return tuple(out)


def _encodable(value: Any) -> bool:
    """Whether ``value`` has a wire dtype (checked per sample: the fast name lookup; an object
    array's elements must all be str)."""
    dt = getattr(value, "dtype", None)
    if not isinstance(dt, np.dtype):
        return False
    if dt.kind in "UO":
        return dt.kind == "U" or all_str(value)
    return dtype_name(dt) in DTYPES
