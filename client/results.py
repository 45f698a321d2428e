"""Wire protocol v1, results: one entry of a request's ``reply_to`` stream.

Fields ``v``, ``id``, ``status`` (``ok|error|expired|rejected``), ``code``, ``message`` and
``body`` (msgpack map: ``{"outputs": {name: tensor}, "timings": {...}, "model": ...,
"version": ...}``; a multi-sample entry's result adds ``samples``, one slot per sample, and
may carry the ok slots' outputs ``stacked``). See ``docs/protocol.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast, overload

import msgpack
import numpy as np

from headrace.client import errors as E
from headrace.client.wire import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    STATUS_ERROR,
    STATUS_EXPIRED,
    STATUS_OK,
    STATUSES,
    SUPPORTED_VERSIONS,
    Limits,
    Status,
    decode_tensor,
    encode_named,
    encode_tensor,
    field_bytes,
    field_text,
    quote,
    take_row,
    unpack_msgpack,
)


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in milliseconds.

    Attributes:
        queue_ms: from the producer's ``ts_ms`` until the worker took it into a batch.
        infer_ms: the batch's model run (shared by every request of the batch).
        batch_size: how many requests ran together.
        worker: the consumer name that answered.
    """

    queue_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    worker: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"queue_ms": self.queue_ms, "infer_ms": self.infer_ms,
                "batch_size": self.batch_size, "worker": self.worker}

    @classmethod
    def from_wire(cls, obj: Any) -> Timings:
        if not isinstance(obj, dict):
            return cls()
        return cls(queue_ms=float(obj.get("queue_ms", 0.0)), infer_ms=float(obj.get("infer_ms", 0.0)),
                   batch_size=int(obj.get("batch_size", 0)), worker=str(obj.get("worker", "")))


@dataclass(frozen=True)
class Result:
    """The answer to one request.

    Attributes:
        request_id: the request's id.
        status: ``ok``, ``error`` (``code`` says why), ``expired`` (its deadline passed
            before it ran) or ``rejected`` (treated like ``error``).
        outputs: the model's outputs for this sample (numpy arrays, no batch dimension).
        code / message: the stable error code and a human-readable detail (not ``ok``).
        timings: where the time went (queue, model run, batch size, worker).
        model / version: what answered.
    """

    request_id: str
    status: Status
    outputs: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    code: str = ""
    message: str = ""
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    version: str = ""
    #: per-sample results of a multi-sample entry, in order (empty for a single sample); a
    #: decoded result with ``stacked`` outputs holds a :class:`SampleResults`, which builds
    #: each sample's :class:`Result` only when it is looked at.
    samples: Sequence[Result] = ()

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def __repr__(self) -> str:
        # Compact: arrays by dtype and shape (an embedding would print hundreds of floats).
        outs = ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}" for k, v in self.outputs.items())
        parts = [f"request_id={self.request_id!r}", f"status={self.status!r}"]
        if self.code:
            parts.append(f"code={self.code!r}")
        if self.message:
            parts.append(f"message={quote(self.message)}")
        parts.append(f"outputs={{{outs}}}")
        if self.model:
            parts.append(f"model={self.model!r}" + (f", version={self.version!r}" if self.version else ""))
        t = self.timings
        parts.append(f"timings=(queue_ms={t.queue_ms:.1f}, infer_ms={t.infer_ms:.1f}, batch_size={t.batch_size})")
        return f"Result({', '.join(parts)})"

    def encode(self) -> dict[bytes, bytes]:
        return encode_result(self)

    def raise_for_status(self) -> Result:
        """Return self when ok, else raise the matching :class:`ResultError` (its ``request_id``
        and ``result`` are this result's)."""
        if self.status == STATUS_OK:
            return self
        if self.status == STATUS_EXPIRED:
            raise E.RequestExpired(f"request {self.request_id}: {self.message or 'deadline passed before it ran'}",
                                   request_id=self.request_id, result=self)
        raise E.InferenceFailed(f"request {self.request_id}: {self.message}", code=self.code or E.INTERNAL_ERROR,
                                request_id=self.request_id, result=self)


def error_result(request_id: str, code: str, message: str, status: Status = STATUS_ERROR,
                 **kw: Any) -> Result:
    return Result(request_id=request_id, status=status, code=code, message=message[:1000], **kw)


def encode_result(res: Result) -> dict[bytes, bytes]:
    """Encode a result as reply-stream entry fields."""
    body: dict[str, Any] = {
        "outputs": encode_named(res.outputs, "output"),
        "timings": res.timings.to_wire(),
        "model": res.model,
        "version": res.version,
    }
    if res.samples:
        body["samples"], stacked = samples_to_wire(res.samples)
        if stacked is not None:
            body["stacked"] = stacked
    return _result_fields(res.request_id, res.status, res.code, res.message, body)


def encode_stacked_result(request_id: str, outputs: Mapping[str, np.ndarray[Any, Any]], timings: Timings,
                          model: str = "", version: str = "") -> dict[bytes, bytes]:
    """Encode the result of a multi-sample entry whose samples are all ``ok``, from their
    outputs stacked on a leading axis of one row per sample: the same entry
    :func:`encode_result` makes of a :class:`Result` with those samples, without a result
    object per sample.

    Raises:
        InvalidTensorError: an output dtype that is not a wire dtype.
        ValueError: outputs without a common leading axis.
    """
    rows = {int(np.shape(v)[0]) if np.ndim(v) else -1 for v in outputs.values()}
    if len(rows) != 1 or -1 in rows:
        raise ValueError(f"stacked outputs need one common leading axis, got {sorted(rows)}")
    count = rows.pop()
    body: dict[str, Any] = {
        "outputs": {}, "timings": timings.to_wire(), "model": model, "version": version,
        # the slot every sample gets (msgpack writes one map per sample)
        "samples": [{"status": STATUS_OK}] * count,
        "stacked": encode_named(outputs, "output"),
    }
    return _result_fields(request_id, STATUS_OK, "", "", body)


def _result_fields(request_id: str, status: str, code: str, message: str, body: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {
        b"v": field_bytes(PROTOCOL_VERSION),
        b"id": field_bytes(request_id),
        b"status": field_bytes(status),
        b"code": field_bytes(code),
        b"message": field_bytes(message),
        b"body": msgpack.packb(body, use_bin_type=True),
    }


# A client trusts its workers' results far more than a worker trusts requests: these bounds
# only stop a corrupt entry from allocating without limit. One shared instance, because the
# reply reader decodes every result with it.
RESULT_LIMITS: Final = Limits(max_payload_bytes=1 << 30, max_elements=1 << 30, max_text_chars=1 << 30)


def decode_result(fields: Mapping[bytes, bytes], limits: Limits = DEFAULT_LIMITS) -> Result:
    """Decode a reply-stream entry.

    Raises:
        DecodeError, MissingFieldError, UnsupportedVersionError.
    """
    version = field_text(fields, b"v")
    assert version is not None
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedVersionError(f"result protocol version {version!r} is not supported")
    request_id = field_text(fields, b"id")
    status = field_text(fields, b"status")
    assert request_id is not None and status is not None
    if status not in STATUSES:
        raise E.DecodeError(f"result status {status!r} is not one of {sorted(STATUSES)}")
    body_raw = fields.get(b"body")
    body = unpack_msgpack(body_raw, RESULT_LIMITS) if body_raw else {}
    if not isinstance(body, dict):
        raise E.DecodeError("result body must be a msgpack map")
    outputs_raw = body.get("outputs") or {}
    # Only ProtocolError may leave here: the SDK's reply reader skips an undecodable result,
    # but any other exception would make it re-read the same entry forever.
    if not isinstance(outputs_raw, dict):
        raise E.DecodeError("result outputs must be a map of name -> tensor")
    outputs = {str(k): decode_tensor(v, RESULT_LIMITS, name=str(k)) for k, v in outputs_raw.items()}
    try:
        timings = Timings.from_wire(body.get("timings"))
    except (TypeError, ValueError) as e:
        raise E.DecodeError(f"result timings are malformed: {e}") from e
    model, version = str(body.get("model") or ""), str(body.get("version") or "")
    samples: Sequence[Result] = ()
    if "samples" in body:
        samples = samples_from_wire(request_id, body, timings, model, version, RESULT_LIMITS)
    return Result(
        request_id=request_id, status=cast(Status, status), outputs=outputs,
        code=field_text(fields, b"code", required=False) or "",
        message=field_text(fields, b"message", required=False) or "",
        timings=timings, model=model, version=version, samples=samples,
    )


# --- the slots of a multi-sample result (client/samples.py) -------------------------------


def samples_to_wire(samples: Sequence[Result]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The slots of a multi-sample result body, and its ``stacked`` outputs: when every ok
    slot has the same output names, dtypes and shapes, they are sent as one tensor per
    output with a leading sample dimension (rows of other slots are zeros), one buffer per
    entry instead of one per sample; else each ok slot carries its own ``outputs``.

    Raises:
        InvalidTensorError: an output dtype that is not a wire dtype.
    """
    ok = [s for s in samples if s.status == STATUS_OK and s.outputs]
    sig = {tuple((k, v.shape, v.dtype.str) if isinstance(v, np.ndarray) else (k, np.shape(v), np.asarray(v).dtype.str)
                 for k, v in s.outputs.items()) for s in ok}
    if len(sig) != 1:
        return [_slot_to_wire(s, with_outputs=True) for s in samples], None
    stacked: dict[str, Any] = {}
    for name, shape, dtype in next(iter(sig)):
        # rows of failed samples: zeros, or empty strings for a string output
        arr = np.full((len(samples), *shape), "" if np.dtype(dtype).kind in "UO" else 0, dtype=dtype)
        for i, s in enumerate(samples):
            if s.status == STATUS_OK and s.outputs:
                arr[i, ...] = s.outputs[name]  # "...": a 0-d string row assigns its str, not itself
        stacked[name] = encode_tensor(arr)
    return [_slot_to_wire(s, with_outputs=False) for s in samples], stacked


def _slot_to_wire(res: Result, with_outputs: bool) -> dict[str, Any]:
    slot: dict[str, Any] = {"status": res.status}
    if with_outputs and res.outputs:
        slot["outputs"] = encode_named(res.outputs, "output")
    if res.code:
        slot["code"], slot["message"] = res.code, res.message
    return slot


def samples_from_wire(request_id: str, body: Mapping[str, Any], timings: Timings, model: str, version: str,
                      limits: Limits) -> Sequence[Result]:
    """The per-sample results of a multi-sample result body (each a :class:`Result` with the
    entry's request id, timings, model and version). When no slot carries outputs of its
    own, they are a :class:`SampleResults` over the ``stacked`` outputs (rows made into
    results on access); else a tuple of decoded results.

    Raises:
        DecodeError: a slot is malformed (every slot is checked here, never on access).
    """
    raw, stacked_raw = body.get("samples"), body.get("stacked") or {}
    if not isinstance(raw, list) or not isinstance(stacked_raw, dict):
        raise E.DecodeError("result 'samples' must be a list and 'stacked' a map of name -> tensor")
    stacked = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in stacked_raw.items()}
    if any(a.ndim == 0 or a.shape[0] != len(raw) for a in stacked.values()):
        raise E.DecodeError("result 'stacked' outputs need a leading dimension of one row per sample")
    own = False
    statuses: list[str] = []
    for slot in raw:
        if not isinstance(slot, dict) or slot.get("status") not in STATUSES:
            raise E.DecodeError("each result sample needs a status of ok|error|expired|rejected")
        statuses.append(slot["status"])
        own = own or "outputs" in slot
    if not own:
        return SampleResults(request_id, raw, stacked, timings, model, version, statuses)
    out: list[Result] = []
    for i, slot in enumerate(raw):
        outs = slot.get("outputs") or {}
        if not isinstance(outs, dict):
            raise E.DecodeError("result sample outputs must be a map of name -> tensor")
        mine = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in outs.items()}
        if slot["status"] == STATUS_OK and not mine:
            mine = {k: take_row(a, i) for k, a in stacked.items()}
        out.append(_slot_result(request_id, slot, mine, timings, model, version))
    return tuple(out)


def _slot_result(request_id: str, slot: Mapping[str, Any], outputs: Mapping[str, np.ndarray[Any, Any]],
                 timings: Timings, model: str, version: str) -> Result:
    """One sample's :class:`Result` from its checked wire slot and its outputs."""
    status: Status = slot["status"]
    return Result(request_id, status, outputs, code=str(slot.get("code") or ""),
                  message=str(slot.get("message") or ""), timings=timings, model=model, version=version)


class SampleResults(Sequence[Result]):
    """The per-sample results of a multi-sample result whose ok samples' outputs came
    ``stacked`` (one array per output, a row per sample): a read-only sequence of
    :class:`Result` built on access, so reading a result costs no object per sample.
    :attr:`stacked` and :meth:`ok_mask` give the whole entry as arrays (the array path of
    ``Client.map_arrays``). Compares equal to any sequence of the same results.
    """

    __slots__ = ("_request_id", "_slots", "_stacked", "_timings", "_model", "_version", "_statuses")

    def __init__(self, request_id: str, slots: Sequence[Mapping[str, Any]],
                 stacked: Mapping[str, np.ndarray[Any, Any]], timings: Timings, model: str, version: str,
                 statuses: list[str]) -> None:
        """``slots`` are checked wire slots; ``statuses`` their statuses, in order."""
        self._request_id, self._slots, self._stacked = request_id, slots, stacked
        self._timings, self._model, self._version = timings, model, version
        self._statuses = statuses

    @property
    def stacked(self) -> Mapping[str, np.ndarray[Any, Any]]:
        """The outputs, one array per name with a row per sample (rows of samples that are
        not ok are zeros)."""
        return self._stacked

    def ok_mask(self) -> np.ndarray[Any, Any]:
        """A bool per sample: True where its status is ``ok``."""
        n = len(self._statuses)
        if self._statuses.count(STATUS_OK) == n:  # the common case, counted in C
            return np.ones(n, dtype=bool)
        return np.fromiter((s == STATUS_OK for s in self._statuses), dtype=bool, count=n)

    def __len__(self) -> int:
        return len(self._slots)

    @overload
    def __getitem__(self, i: int) -> Result: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Result, ...]: ...

    def __getitem__(self, i: int | slice) -> Result | tuple[Result, ...]:
        if isinstance(i, slice):
            return tuple(self._result(j) for j in range(*i.indices(len(self._slots))))
        n = len(self._slots)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        return self._result(i % n)

    def __iter__(self) -> Iterator[Result]:
        return (self._result(i) for i in range(len(self._slots)))

    def _result(self, i: int) -> Result:
        outs = {k: take_row(a, i) for k, a in self._stacked.items()} if self._statuses[i] == STATUS_OK else {}
        return _slot_result(self._request_id, self._slots[i], outs, self._timings, self._model, self._version)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SampleResults({len(self)} samples of request {self._request_id!r})"
