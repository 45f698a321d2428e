"""Multi-sample entries (wire protocol v1): one request entry carrying N samples.

A multi-sample entry is a request entry whose body is

    {"texts": ["first", "second", ...]}                                   # text models
    {"samples": N, "inputs": {name: <tensor with a leading dim of N>}}     # tensor models

with the optional entry field ``n`` (decimal ASCII) equal to N: the submit function counts
backlog in samples from it. It is answered by one result entry whose body holds one slot per
sample, in order:

    {"samples": [{"status": "ok", "outputs": {name: tensor}},
                 {"status": "error", "code": "bad_value", "message": "..."}, ...], ...}

The result's own ``status`` is ``ok`` when the entry was run (each sample has its own
status); an entry refused as a whole (undecodable, too many samples, past its deadline)
gets the usual single error result. Single-sample entries and results are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import (
    DEFAULT_LIMITS,
    Envelope,
    Limits,
    Request,
    decode_tensor,
    encode_request,
)
from headrace.client.wire import encode_named, quote, take_row, utf8_strings

#: the entry field holding the sample count of a multi-sample entry.
SAMPLES_FIELD: Final = b"n"
#: most digits of the ``n`` field.
MAX_COUNT_DIGITS: Final = 9


@dataclass(frozen=True)
class MultiRequest:
    """N samples in one entry: ``texts``, or ``inputs`` whose arrays have a leading dim of N."""

    envelope: Envelope
    inputs: Mapping[str, np.ndarray[Any, Any]] | None = None
    texts: Sequence[str] | None = None

    @property
    def count(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        first = next(iter((self.inputs or {}).values()), None)
        return 0 if first is None or first.ndim == 0 else int(first.shape[0])

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields for the submit function.

        Raises:
            ProtocolError: neither or both of ``inputs`` and ``texts``, no samples, inputs
                whose leading dims differ (``bad_shape``), or a text that is not valid UTF-8
                (``bad_value``).
            InvalidTensorError: an input dtype that is not a wire dtype.
        """
        import msgpack

        if (self.texts is None) == (self.inputs is None):
            raise E.ProtocolError("a multi-sample request carries either inputs or texts", code=E.MISSING_FIELD)
        n = self.count
        if n < 1:
            raise E.ProtocolError("a multi-sample request needs at least one sample", code=E.BAD_VALUE)
        body: dict[str, Any]
        if self.texts is not None:
            body = {"texts": utf8_strings(list(self.texts), "a text of the entry is", E.ProtocolError)}
        else:
            arrays = {k: np.asarray(v) for k, v in (self.inputs or {}).items()}
            if any(a.ndim == 0 or a.shape[0] != n for a in arrays.values()):
                raise E.InvalidTensorError(f"every input needs the leading (sample) dim {n}", code=E.BAD_SHAPE)
            body = {"samples": n, "inputs": encode_named(arrays, "input")}
        # The envelope fields come from the single-sample encoder (one source of truth).
        fields = encode_request(Request(self.envelope, text=""))
        fields[b"body"] = msgpack.packb(body, use_bin_type=True)
        fields[SAMPLES_FIELD] = str(n).encode()
        return fields


def is_multi(body: Any) -> bool:
    """True for a decoded body map of a multi-sample entry."""
    return isinstance(body, dict) and ("texts" in body or "samples" in body)


@dataclass(frozen=True)
class SampleSlot:
    """One sample of a multi-sample entry as decoded: its request, or why it is refused."""

    request: Request | None
    code: str = ""
    message: str = ""
    #: False when a float input of this sample holds NaN or Inf (checked for the whole
    #: entry at once; texts: always True).
    finite: bool = True


def declared_count(fields: Mapping[bytes, bytes]) -> int | None:
    """The entry's ``n`` field: None when absent.

    Raises:
        DecodeError: not 1-9 ASCII digits.
    """
    raw = fields.get(SAMPLES_FIELD)
    if raw is None:
        return None
    data = bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw).encode()
    if not (0 < len(data) <= MAX_COUNT_DIGITS and data.isdigit() and data.isascii()):
        raise E.DecodeError(f"entry field 'n' must be 1-{MAX_COUNT_DIGITS} ASCII digits (the sample count)")
    return int(data)


def decode_samples(envelope: Envelope, body: dict[str, Any], declared: int | None, max_samples: int,
                   limits: Limits = DEFAULT_LIMITS) -> list[SampleSlot]:
    """Split a decoded multi-sample body into one slot per sample.

    A text that is not a str or is too long refuses that sample alone; tensors share one
    array per input, so their faults refuse the entry.

    Raises:
        ProtocolError: ``too_many_samples`` past ``max_samples``; ``bad_value`` for a count
            that is not a positive int or differs from ``declared``; ``decode_error`` for a
            body that mixes forms; tensor errors (``bad_shape``, ``bad_dtype``, ...).
    """
    if "texts" in body:
        return [_text_slot(envelope, t, limits) for t in decode_texts(body, declared, max_samples)]
    arrays, finite = decode_sample_arrays(body, declared, max_samples, limits)
    return slots_of(envelope, arrays, finite)


def decode_texts(body: dict[str, Any], declared: int | None, max_samples: int) -> list[Any]:
    """The ``texts`` list of a multi-sample text body, as sent (each item still to be checked
    a str within the limits: see :func:`all_valid_texts`).

    Raises:
        ProtocolError: as :func:`decode_samples`.
    """
    if "inputs" in body or "samples" in body or "text" in body:
        raise E.DecodeError("a body with 'texts' carries nothing else ('text', 'inputs', 'samples')")
    texts = body.get("texts")
    if not isinstance(texts, list):
        raise E.ProtocolError("'texts' must be a list of str", code=E.BAD_VALUE)
    _check_count(len(texts), declared, max_samples)
    return texts


def all_valid_texts(texts: list[Any], limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether every item of ``texts`` is a str within ``limits.max_text_chars`` (what
    :func:`decode_samples` would refuse sample by sample), in one pass without an object per
    text."""
    return all(type(t) is str for t in texts) and max(map(len, texts), default=0) <= limits.max_text_chars


def decode_sample_arrays(body: dict[str, Any], declared: int | None, max_samples: int,
                         limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """The tensors of a multi-sample tensor body, each with its leading (sample) axis, and
    which samples hold only finite floats (a bool per sample): the entry as arrays, for a
    worker that runs samples stacked. Refuses what :func:`decode_samples` refuses.

    Raises:
        ProtocolError: as :func:`decode_samples` (a ``texts`` body too: ``bad_value``).
    """
    if "texts" in body:
        raise E.ProtocolError("a text body has no sample arrays", code=E.BAD_VALUE)
    n = body.get("samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise E.ProtocolError(f"'samples' must be a positive int, got {quote(n)}", code=E.BAD_VALUE)
    _check_count(n, declared, max_samples)
    if "text" in body:
        raise E.DecodeError("a multi-sample body sends texts as 'texts', not 'text'")
    return _sample_arrays(body, n, limits)


def _sample_arrays(body: dict[str, Any], n: int,
                   limits: Limits) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    raw = body.get("inputs")
    if not isinstance(raw, dict) or not raw:
        raise E.MissingFieldError("a multi-sample body needs 'texts' or 'inputs' (tensors with a leading dim)")
    if len(raw) > limits.max_inputs:
        raise E.PayloadTooLargeError(f"{len(raw)} inputs exceed the limit of {limits.max_inputs}")
    arrays = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in raw.items()}
    for name, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise E.InvalidTensorError(f"{name}: shape {list(arr.shape)} needs a leading (sample) dim of {n}",
                                       code=E.BAD_SHAPE)
    finite = np.ones(n, dtype=bool)
    for arr in arrays.values():
        if arr.dtype.kind == "f" and arr.size:
            finite &= np.isfinite(arr.reshape(n, -1)).all(axis=1)
    return arrays, finite


def slots_of(envelope: Envelope, arrays: Mapping[str, np.ndarray[Any, Any]],
             finite: np.ndarray[Any, Any]) -> list[SampleSlot]:
    """One slot per sample of decoded sample arrays (row views: the samples share the
    entry's one buffer per input, no copies)."""
    names = list(arrays)
    # list() of a 1-d string tensor would give bare str: take_row keeps each a 0-d array
    rows = [[take_row(a, i) for i in range(len(a))] if a.dtype.kind == "O" else list(a) for a in arrays.values()]
    return [SampleSlot(Request(envelope, inputs=dict(zip(names, vals, strict=True))), finite=ok)
            for vals, ok in zip(zip(*rows, strict=True), finite.tolist(), strict=True)]


def _check_count(n: int, declared: int | None, max_samples: int) -> None:
    if n > max_samples:
        raise E.ProtocolError(f"entry carries {n} samples; this worker takes at most max_samples_per_entry="
                              f"{max_samples} per entry: send smaller chunks", code=E.TOO_MANY_SAMPLES)
    if n < 1:
        raise E.ProtocolError("a multi-sample entry needs at least one sample", code=E.BAD_VALUE)
    if declared is not None and declared != n:
        raise E.ProtocolError(f"entry field n={declared} but the body carries {n} samples", code=E.BAD_VALUE)


def _text_slot(envelope: Envelope, text: Any, limits: Limits) -> SampleSlot:
    if not isinstance(text, str):
        return SampleSlot(None, E.BAD_VALUE, f"text must be a UTF-8 msgpack str, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        return SampleSlot(None, E.PAYLOAD_TOO_LARGE, f"text of {len(text)} chars exceeds {limits.max_text_chars}")
    return SampleSlot(Request(envelope, text=text))
