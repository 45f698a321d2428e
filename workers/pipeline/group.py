"""The samples of one multi-sample entry, answered together (see ``client/samples.py``).

Each sample runs as its own :class:`~headrace.workers.pipeline.work.Work` (the batcher packs
samples of several entries into one model call and spreads a large entry over several);
its outcome fills the entry's slot. The entry is answered, with one result for all its
samples, by whichever batch fills its last slot: so it is committed once, like a
single-sample entry.
"""

from __future__ import annotations

from headrace.client import errors as E
from headrace.client.protocol import DTYPES, STATUS_ERROR, Envelope, Result, Status, error_result
from headrace.workers.pipeline.entry import Entry


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

    def fail(self, index: int, code: str, message: str, status: Status = STATUS_ERROR) -> bool:
        """:meth:`fill` with an error outcome."""
        return self.fill(index, error_result(self.envelope.request_id, code, message, status=status))

    def ran(self, infer_s: float, size: int) -> None:
        """Note a model call one of its samples ran in."""
        self.infer_s += infer_s
        self.batch_size = max(self.batch_size, size)

    def results(self) -> tuple[Result, ...]:
        """The slots, each output checked encodable (a non-wire dtype fails that sample only)."""
        out: list[Result] = []
        for res in self.slots:
            assert res is not None, "results() of an incomplete group"
            bad = [k for k, v in res.outputs.items() if getattr(getattr(v, "dtype", None), "name", None) not in DTYPES]
            if bad:
                res = error_result(res.request_id, E.MODEL_ERROR, f"cannot encode the model output {bad[0]!r}: its "
                                   "dtype is not a wire dtype")
            out.append(res)
        return tuple(out)
