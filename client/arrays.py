"""The array path of the SDK (``Client.map_arrays``/``imap_arrays``): samples in as arrays
with a leading sample axis, answers out as the same, with no Python object per sample.

A *block* is one mapping of input name -> array whose leading axis is the sample axis (all
inputs share its length), or, for a text model, a list of texts. It goes out as consecutive
multi-sample entries of at most ``chunk_size`` samples, each a slice (a view) of the block's
arrays (or texts); each entry's ``stacked``
result rows are copied into one output array per name, and the block is answered by one
:class:`ArrayResults`: the outputs, a bool per sample, and the result of each sample that
is not ok.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.chunks import Chunk
from headrace.client.results import Result, SampleResults
from headrace.client.wire import STATUS_EXPIRED, STATUS_OK


@dataclass(frozen=True)
class ArrayResults:
    """The answers to one block of samples.

    Attributes:
        outputs: output name -> array with one row per sample of the block, in input order
            (rows of samples that are not ok are zeros; names are those the ok samples
            returned: empty when none was ok).
        ok: a bool per sample, True where the sample's status is ``ok``.
        failures: sample index -> its :class:`Result` (``error``, ``expired`` or
            ``rejected``, with the stable ``code`` and ``message``), for each sample not ok.
        model / version: what answered (of the last entry read).
    """

    outputs: Mapping[str, np.ndarray[Any, Any]]
    ok: np.ndarray[Any, Any]
    failures: Mapping[int, Result]
    model: str = ""
    version: str = ""

    def __len__(self) -> int:
        return int(self.ok.shape[0])

    @property
    def all_ok(self) -> bool:
        return not self.failures

    def raise_for_status(self) -> ArrayResults:
        """Return self when every sample is ok.

        Raises:
            RequestExpired: the first failed sample (lowest index) passed its deadline.
            InferenceFailed: the first failed sample failed otherwise (its ``code``).
        """
        if not self.failures:
            return self
        i = min(self.failures)
        res = self.failures[i]
        where = f"sample {i} of {len(self)} (request {res.request_id}; {len(self.failures)} failed in all)"
        if res.status == STATUS_EXPIRED:
            raise E.RequestExpired(f"{where}: {res.message or 'deadline passed before it ran'}",
                                   request_id=res.request_id, result=res)
        raise E.InferenceFailed(f"{where}: {res.message}", code=res.code or E.INTERNAL_ERROR,
                                request_id=res.request_id, result=res)

    def __repr__(self) -> str:
        outs = ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}" for k, v in self.outputs.items())
        return f"ArrayResults({len(self)} samples, {len(self.failures)} failed, outputs={{{outs}}})"


def block_arrays(block: Any) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """The block's inputs as C-contiguous arrays (copied only when they are not) and its
    sample count.

    Raises:
        ProtocolError: ``block`` is not a non-empty mapping (``bad_value``); an input without
            a leading axis, inputs whose leading axes differ, or no samples (``bad_shape``).
    """
    if not isinstance(block, Mapping) or not block:
        raise E.ProtocolError("a block is a non-empty mapping of input name -> array with a leading sample axis, "
                              f"got {type(block).__name__}", code=E.BAD_VALUE)
    # asarray(order="C"), not ascontiguousarray, which would make a 0-d input shape (1,)
    try:
        arrays = {str(k): np.asarray(v, order="C") for k, v in block.items()}
    except (ValueError, TypeError) as e:  # ragged lists; objects numpy cannot take
        raise E.InvalidTensorError(f"an input of the block is not one array: {str(e).split('. ')[0]}",
                                   code=E.BAD_SHAPE) from e
    counts = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise E.InvalidTensorError(f"every input of a block needs the same leading (sample) axis, got {counts} "
                                   f"(None: a single value, with no sample axis)", code=E.BAD_SHAPE)
    n = next(iter(counts.values()))
    assert n is not None
    if n < 1:
        raise E.InvalidTensorError("a block needs at least one sample", code=E.BAD_SHAPE)
    return arrays, n


class BlockAssembler:
    """Builds one block's :class:`ArrayResults` from the results of its entries, which may
    come in any order (each names its first sample's index and its size)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._outputs: dict[str, np.ndarray[Any, Any]] = {}
        self._ok = np.zeros(count, dtype=bool)
        self._failures: dict[int, Result] = {}
        self._filled = 0
        self._model = self._version = ""

    @property
    def complete(self) -> bool:
        return self._filled >= self.count

    def add(self, offset: int, size: int, result: Result) -> None:
        """Take the result of the entry holding samples ``offset .. offset + size - 1``.

        Raises:
            ProtocolError: an ok result whose samples do not match the entry (``decode_error``),
                or an output whose row shape or dtype differs between entries (``bad_shape``:
                use ``map`` for such a model).
        """
        self._filled += size
        self._model, self._version = result.model or self._model, result.version or self._version
        if result.status != STATUS_OK:  # refused as a whole: every sample gets its result
            self._failures.update(dict.fromkeys(range(offset, offset + size), result))
            return
        samples = result.samples
        if not samples and size == 1:
            samples = (result,)
        if len(samples) != size:
            raise E.DecodeError(f"result {result.request_id} holds {len(samples)} samples for an entry of {size}")
        if isinstance(samples, SampleResults):
            for name, rows in samples.stacked.items():
                self._column(name, rows.shape[1:], rows.dtype)[offset:offset + size] = rows
            mask = samples.ok_mask()
            self._ok[offset:offset + size] = mask
            for j in np.flatnonzero(~mask).tolist():
                self._failures[offset + j] = samples[j]
            return
        for j, res in enumerate(samples):
            if res.status != STATUS_OK:
                self._failures[offset + j] = res
                continue
            self._ok[offset + j] = True
            for name, row in res.outputs.items():
                row = np.asarray(row)
                self._column(name, row.shape, row.dtype)[offset + j] = row

    def _column(self, name: str, row_shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        col = self._outputs.get(name)
        if col is None:
            col = self._outputs[name] = np.zeros((self.count, *row_shape), dtype=dtype)
        elif col.shape[1:] != tuple(row_shape) or col.dtype != dtype:
            raise E.InvalidTensorError(
                f"output {name!r} came as {dtype}{list(row_shape)} rows after {col.dtype}{list(col.shape[1:])} "
                "rows: the array path needs one row shape per output; use map() for this model", code=E.BAD_SHAPE)
        return col

    def finish(self) -> ArrayResults:
        return ArrayResults(outputs=self._outputs, ok=self._ok, failures=self._failures, model=self._model,
                            version=self._version)


Plan = collections.deque[tuple[BlockAssembler, int]]
"""Per entry sent, in input order: its block's assembler and the entry's first sample index."""


def one_block(inputs: Mapping[str, Any] | None, texts: Sequence[str] | None) -> tuple[Any, int]:
    """``map_arrays``' one block (arrays or texts) and its sample count.

    Raises:
        ProtocolError: not exactly one of ``inputs`` and ``texts``; a malformed block.
    """
    if (inputs is None) == (texts is None):
        raise E.ProtocolError("give either inputs (arrays) or texts", code=E.BAD_VALUE)
    if inputs is not None:
        return block_arrays(inputs)
    listed = block_texts(texts)
    return listed, len(listed)


def block_texts(block: Any) -> list[str]:
    """The texts of a block of a text model (a list, tuple or 1-d str array of str).

    Raises:
        ProtocolError: a bare str, an item that is not a str (``bad_value``), or no texts
            (``bad_shape``).
    """
    if isinstance(block, (str, bytes)) or not isinstance(block, (list, tuple, np.ndarray)):
        raise E.ProtocolError("a block of texts is a list of str (one text per sample), "
                              f"got {type(block).__name__}", code=E.BAD_VALUE)
    texts = list(block.tolist() if isinstance(block, np.ndarray) else block)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise E.ProtocolError(f"text {bad} of the block is a {type(texts[bad]).__name__}, not a str",
                              code=E.BAD_VALUE)
    if not texts:
        raise E.InvalidTensorError("a block needs at least one sample", code=E.BAD_SHAPE)
    return texts


def array_entries(blocks: Iterable[Any], chunk_size: int, plan: Plan) -> Iterator[Chunk]:
    """The entries of ``blocks`` (lazily, one block at a time), each a :class:`Chunk` of
    views (or texts) of at most ``chunk_size`` samples; each entry's place goes onto
    ``plan`` as it is read.

    Raises:
        ProtocolError: a malformed block (see :func:`block_arrays`, :func:`block_texts`).
    """
    for block in blocks:
        if isinstance(block, Mapping):
            arrays, n = block_arrays(block)
            texts: list[str] = []
        else:
            arrays, texts = {}, block_texts(block)
            n = len(texts)
        asm = BlockAssembler(n)
        for start in range(0, n, chunk_size):
            size = min(chunk_size, n - start)
            plan.append((asm, start))
            if texts:
                yield Chunk(size, texts=texts[start:start + size])
            else:
                yield Chunk(size, inputs={k: a[start:start + size] for k, a in arrays.items()})
