"""Wire protocol v1: typed messages with explicit encode/decode (msgpack only, never pickle).

A request is one stream entry in ``<ns>:{<model>}:requests`` whose fields are:

    v            protocol version, "1"
    id           request id chosen by the producer (1-128 chars of [A-Za-z0-9._:-])
    reply_to     the stream that receives the result
    deadline_ms  absolute Unix time in ms after which the request is answered ``expired``
                 without running ("0" or absent: no deadline)
    ts_ms        producer's submit time, Unix ms (optional; used for queue timings)
    model        the model name (optional; when present it must match the stream's model)
    body         msgpack map: {"inputs": {name: tensor}} or {"text": "..."}

A tensor is the msgpack map ``{"dtype": "float32", "shape": [3, 4], "data": <bin>}`` with
the raw little-endian, C-order bytes of the array. A request carries one sample: tensors
have no batch dimension (the worker stacks samples into a batch).

A result is one entry in the request's ``reply_to`` stream with fields ``v``, ``id``,
``status`` (``ok|error|expired|rejected``), ``code``, ``message`` and ``body`` (msgpack map:
``{"outputs": {name: tensor}, "timings": {...}, "model": ..., "version": ...}``).

See ``docs/protocol.md`` for the language-neutral description.
"""

from __future__ import annotations

import math
import re
import reprlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import msgpack
import numpy as np

from headrace.client import errors as E

PROTOCOL_VERSION: Final = "1"
SUPPORTED_VERSIONS: Final = frozenset({PROTOCOL_VERSION})

Status = Literal["ok", "error", "expired", "rejected"]
"""A result's status (see :class:`Result`)."""
STATUS_OK: Final[Status] = "ok"
STATUS_ERROR: Final[Status] = "error"
STATUS_EXPIRED: Final[Status] = "expired"
STATUS_REJECTED: Final[Status] = "rejected"
STATUSES: Final[frozenset[str]] = frozenset({STATUS_OK, STATUS_ERROR, STATUS_EXPIRED, STATUS_REJECTED})

# dtype strings accepted on the wire, mapped to little-endian numpy dtypes.
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32",
        "int64", "uint64", "float16", "float32", "float64",
    )
}
MAX_DIMS: Final = 8
# Used with fullmatch: "$" would also accept the string with one trailing newline.
_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Stream keys are bytes to Redis; we bound them and forbid control characters.
_KEY_RE = re.compile(r"[^\x00-\x1f\x7f]{1,512}")
# deadline_ms / ts_ms: empty (= not given) or decimal ASCII only (int() would also take "1_000", " 7" or
# Arabic-Indic digits), at most 18 digits so every value fits an int64 and a float.
_MS_RE = re.compile(rb"[0-9]{1,18}")


@dataclass(frozen=True)
class Limits:
    """Decoder limits; everything beyond them is refused before allocation.

    Attributes:
        max_payload_bytes: largest accepted ``body`` (bytes).
        max_elements: largest element count of one tensor.
        max_text_chars: longest accepted text input.
        max_inputs: most named inputs in one request.
    """

    max_payload_bytes: int = 4 * 1024 * 1024
    max_elements: int = 16 * 1024 * 1024
    max_text_chars: int = 100_000
    max_inputs: int = 32


DEFAULT_LIMITS: Final = Limits()

# Error messages quote what the producer sent; reprlib bounds depth and length, because a
# plain repr() of a 1000-level nested list (msgpack accepts ~1023) raises RecursionError.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxstring, _QUOTE.maxother = 3, 10, 40, 40


def _quote(value: Any) -> str:
    return _QUOTE.repr(value)


# --- tensors -----------------------------------------------------------------------------


def encode_tensor(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Encode an array as a wire tensor map (little-endian, C order).

    Raises:
        InvalidTensorError: the dtype is not a wire dtype.
    """
    a = np.asarray(arr)
    name = a.dtype.name
    if name not in DTYPES:
        raise E.InvalidTensorError(f"dtype {name!r} is not a wire dtype; use one of {sorted(DTYPES)}",
                                   code=E.BAD_DTYPE)
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d scalars into shape (1,).
    a = np.asarray(a, dtype=DTYPES[name], order="C")
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}


def decode_tensor(obj: Any, limits: Limits = DEFAULT_LIMITS, name: str = "tensor") -> np.ndarray[Any, Any]:
    """Decode a wire tensor map into a (read-only view) numpy array in native byte order.

    Raises:
        MissingFieldError: ``dtype``, ``shape`` or ``data`` is absent.
        InvalidTensorError: unknown dtype (``bad_dtype``), or a shape that is malformed,
            has a dimension no array can have, or does not match the byte length (``bad_shape``).
        PayloadTooLargeError: more elements than ``limits.max_elements``.
    """
    if not isinstance(obj, Mapping):
        raise E.DecodeError(f"{name}: a tensor must be a map with dtype/shape/data")
    for key in ("dtype", "shape", "data"):
        if key not in obj:
            raise E.MissingFieldError(f"{name}: tensor field {key!r} is missing")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise E.InvalidTensorError(f"{name}: dtype {_quote(dtype_name)} is not one of {sorted(DTYPES)}",
                                   code=E.BAD_DTYPE)
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise E.InvalidTensorError(f"{name}: shape must be a list of at most {MAX_DIMS} "
                                   f"non-negative integers, got {_quote(shape)}", code=E.BAD_SHAPE)
    if not isinstance(data, (bytes, bytearray)):
        raise E.DecodeError(f"{name}: tensor data must be msgpack bin (raw bytes)")
    # math.prod on Python ints cannot overflow; compare before trusting any allocation.
    n = math.prod(shape)
    if n > limits.max_elements:
        raise E.PayloadTooLargeError(f"{name}: {n} elements exceed the limit of {limits.max_elements}")
    # An empty tensor may still name absurd dimensions ([0, 2**63]); numpy refuses any shape
    # whose non-zero dimensions multiply beyond its size limit, so bound them the same way.
    if math.prod(d or 1 for d in shape) > limits.max_elements:
        raise E.InvalidTensorError(f"{name}: shape {_quote(shape)} has dimensions beyond "
                                   f"{limits.max_elements} elements", code=E.BAD_SHAPE)
    dt = DTYPES[dtype_name]
    if n * dt.itemsize != len(data):
        raise E.InvalidTensorError(
            f"{name}: shape {list(shape)} of {dtype_name} needs {n * dt.itemsize} bytes, got {len(data)}",
            code=E.BAD_SHAPE)
    arr = np.frombuffer(bytes(data), dtype=dt).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)


# --- messages ----------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _s(fields: Mapping[bytes, bytes], key: bytes, required: bool = True) -> str | None:
    raw = fields.get(key)
    if raw is None:
        if required:
            raise E.MissingFieldError(f"entry field {key.decode()!r} is missing")
        return None
    try:
        return raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError as e:
        raise E.DecodeError(f"entry field {key.decode()!r} is not UTF-8") from e


def _unpack(data: bytes, limits: Limits) -> Any:
    if len(data) > limits.max_payload_bytes:
        raise E.PayloadTooLargeError(
            f"body of {len(data)} bytes exceeds max_payload_bytes={limits.max_payload_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=limits.max_payload_bytes, max_str_len=limits.max_payload_bytes,
            max_array_len=limits.max_elements, max_map_len=limits.max_inputs * 4 + 16,
            max_ext_len=0,
        )
    except ValueError as e:
        # msgpack's own length caps (max_map_len etc.) refuse a huge container before
        # building it; to the producer that is "too large", not "undecodable". Extension
        # types (max_ext_len=0) are not part of the protocol at all: those stay decode errors.
        if "exceeds max_" in str(e) and "max_ext_len" not in str(e):
            raise E.PayloadTooLargeError(f"body holds a container beyond the decoder's limits: {e}") from e
        raise E.DecodeError(f"body is not valid msgpack: {type(e).__name__}: {e}") from e
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, UnicodeDecodeError...)
        raise E.DecodeError(f"body is not valid msgpack: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Envelope:
    """The routing part of a request entry: enough to send an answer back."""

    request_id: str
    reply_to: str
    version: str = PROTOCOL_VERSION
    deadline_ms: int = 0
    ts_ms: int = 0
    model: str | None = None

    def expired(self, at_ms: int | None = None) -> bool:
        return self.deadline_ms > 0 and (now_ms() if at_ms is None else at_ms) > self.deadline_ms


@dataclass(frozen=True)
class Request:
    """One inference request: one sample, either named tensors or a text."""

    envelope: Envelope
    inputs: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    text: str | None = None

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    def encode(self) -> dict[bytes, bytes]:
        """Stream entry fields for ``XADD``."""
        return encode_request(self)


def encode_request(req: Request) -> dict[bytes, bytes]:
    """Encode a request as stream entry fields (``XADD``-ready, bytes to bytes).

    Raises:
        InvalidTensorError: an input has a dtype that is not a wire dtype.
        ProtocolError: neither or both of ``inputs`` and ``text`` are given.
    """
    if (req.text is None) == (not req.inputs):
        raise E.ProtocolError("a request carries either inputs or text, exactly one of them",
                              code=E.MISSING_FIELD)
    body: dict[str, Any] = (
        {"text": req.text} if req.text is not None
        else {"inputs": {k: encode_tensor(v) for k, v in req.inputs.items()}}
    )
    env = req.envelope
    fields = {
        b"v": _b(env.version),
        b"id": _b(env.request_id),
        b"reply_to": _b(env.reply_to),
        b"deadline_ms": _b(env.deadline_ms),
        b"ts_ms": _b(env.ts_ms or now_ms()),
        b"body": msgpack.packb(body, use_bin_type=True),
    }
    if env.model:
        fields[b"model"] = _b(env.model)
    return fields


def check_request_id(request_id: str) -> None:
    """Apply the wire rule for request ids: 1-128 chars of ``[A-Za-z0-9._:-]``.

    Raises:
        DecodeError: ``request_id`` breaks the rule (or is not a str).
    """
    if not isinstance(request_id, str) or not _ID_RE.fullmatch(request_id):
        shown = request_id[:64] if isinstance(request_id, str) else request_id
        raise E.DecodeError(f"request id {shown!r} must be 1-128 chars of [A-Za-z0-9._:-]")


def check_reply_to(reply_to: str) -> None:
    """Apply the wire rule for ``reply_to``: a 1-512 character key without control characters.

    Raises:
        DecodeError: ``reply_to`` breaks the rule.
    """
    if not isinstance(reply_to, str) or not _KEY_RE.fullmatch(reply_to):
        raise E.DecodeError("reply_to must be a 1-512 character key without control characters")


def _ms(fields: Mapping[bytes, bytes], key: bytes) -> int:
    """An optional Unix-ms field: absent or empty is 0, else 1-18 ASCII digits.

    Raises:
        DecodeError: anything else (signs, spaces, ``_``, non-ASCII digits, too long).
    """
    raw = fields.get(key)
    if not raw:
        return 0
    data = raw if isinstance(raw, (bytes, bytearray)) else str(raw).encode()
    if not _MS_RE.fullmatch(data):
        raise E.DecodeError(f"entry field {key.decode()!r} must be 1-18 ASCII digits (Unix ms), got "
                            f"{_quote(bytes(data[:40]))}")
    return int(data)


def decode_envelope(fields: Mapping[bytes, bytes]) -> Envelope:
    """Decode and check the routing fields of a request entry.

    Raises:
        MissingFieldError: ``v``, ``id`` or ``reply_to`` is absent.
        UnsupportedVersionError: ``v`` is not a version this code speaks.
        DecodeError: a field breaks its rule (id, reply_to, ``deadline_ms``/``ts_ms``).
    """
    version = _s(fields, b"v")
    assert version is not None
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedVersionError(
            f"protocol version {version!r} is not supported; this worker speaks {sorted(SUPPORTED_VERSIONS)}")
    request_id = _s(fields, b"id")
    reply_to = _s(fields, b"reply_to")
    assert request_id is not None and reply_to is not None
    check_request_id(request_id)
    check_reply_to(reply_to)
    deadline_ms, ts_ms = _ms(fields, b"deadline_ms"), _ms(fields, b"ts_ms")
    return Envelope(request_id=request_id, reply_to=reply_to, version=version,
                    deadline_ms=deadline_ms, ts_ms=ts_ms, model=_s(fields, b"model", required=False))


def decode_body(envelope: Envelope, data: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode the msgpack body of a request whose envelope is already decoded.

    Raises:
        PayloadTooLargeError, DecodeError, MissingFieldError, InvalidTensorError, and
        ProtocolError with code ``bad_value`` for a ``text`` that is not a str.
    """
    return decode_body_map(envelope, unpack_body(data, limits), limits)


def unpack_body(data: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The msgpack-decoded ``body`` field of a request entry.

    Raises:
        MissingFieldError: no body; PayloadTooLargeError, DecodeError: see :func:`decode_body`.
    """
    if data is None:
        raise E.MissingFieldError("entry field 'body' is missing")
    return _unpack(data, limits)


def decode_body_map(envelope: Envelope, body: Any, limits: Limits = DEFAULT_LIMITS) -> Request:
    """The single-sample request of an unpacked body (see :func:`decode_body`)."""
    if not isinstance(body, dict):
        raise E.DecodeError("body must be a msgpack map with 'inputs' or 'text'")
    if "text" in body and "inputs" in body:
        raise E.DecodeError("body carries both 'text' and 'inputs'; send exactly one")
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str):
            raise E.ProtocolError(f"'text' must be a UTF-8 msgpack str, got {type(text).__name__}",
                                  code=E.BAD_VALUE)
        if len(text) > limits.max_text_chars:
            raise E.PayloadTooLargeError(f"text of {len(text)} chars exceeds {limits.max_text_chars}")
        return Request(envelope=envelope, text=text)
    if "inputs" not in body:
        raise E.MissingFieldError("body needs 'inputs' (named tensors) or 'text'")
    raw_inputs = body["inputs"]
    if not isinstance(raw_inputs, dict) or not raw_inputs:
        raise E.DecodeError("'inputs' must be a non-empty map of name -> tensor")
    if len(raw_inputs) > limits.max_inputs:
        raise E.PayloadTooLargeError(f"{len(raw_inputs)} inputs exceed the limit of {limits.max_inputs}")
    inputs = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in raw_inputs.items()}
    return Request(envelope=envelope, inputs=inputs)


def decode_request(fields: Mapping[bytes, bytes], limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode a whole request entry. See :func:`decode_envelope` and :func:`decode_body`."""
    env = decode_envelope(fields)
    return decode_body(env, fields.get(b"body"), limits)


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
    #: per-sample results of a multi-sample entry, in order (empty for a single sample).
    samples: tuple[Result, ...] = ()

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
            parts.append(f"message={_quote(self.message)}")
        parts.append(f"outputs={{{outs}}}")
        if self.model:
            parts.append(f"model={self.model!r}" + (f", version={self.version!r}" if self.version else ""))
        t = self.timings
        parts.append(f"timings=(queue_ms={t.queue_ms:.1f}, infer_ms={t.infer_ms:.1f}, batch_size={t.batch_size})")
        return f"Result({', '.join(parts)})"

    def encode(self) -> dict[bytes, bytes]:
        return encode_result(self)

    def raise_for_status(self) -> Result:
        """Return self when ok, else raise the matching :class:`ResultError`."""
        if self.status == STATUS_OK:
            return self
        if self.status == STATUS_EXPIRED:
            raise E.RequestExpired(f"request {self.request_id}: {self.message or 'deadline passed before it ran'}")
        raise E.InferenceFailed(f"request {self.request_id}: {self.message}", code=self.code or E.INTERNAL_ERROR)


def error_result(request_id: str, code: str, message: str, status: Status = STATUS_ERROR,
                 **kw: Any) -> Result:
    return Result(request_id=request_id, status=status, code=code, message=message[:1000], **kw)


def encode_result(res: Result) -> dict[bytes, bytes]:
    """Encode a result as reply-stream entry fields."""
    body: dict[str, Any] = {
        "outputs": {k: encode_tensor(v) for k, v in res.outputs.items()},
        "timings": res.timings.to_wire(),
        "model": res.model,
        "version": res.version,
    }
    if res.samples:
        body["samples"], stacked = samples_to_wire(res.samples)
        if stacked is not None:
            body["stacked"] = stacked
    return {
        b"v": _b(PROTOCOL_VERSION),
        b"id": _b(res.request_id),
        b"status": _b(res.status),
        b"code": _b(res.code),
        b"message": _b(res.message),
        b"body": msgpack.packb(body, use_bin_type=True),
    }


# A client trusts its workers' results far more than a worker trusts requests: these bounds
# only stop a corrupt entry from allocating without limit. One shared instance, because the
# reply reader decodes every result with it.
_RESULT_LIMITS: Final = Limits(max_payload_bytes=1 << 30, max_elements=1 << 30)


def decode_result(fields: Mapping[bytes, bytes], limits: Limits = DEFAULT_LIMITS) -> Result:
    """Decode a reply-stream entry.

    Raises:
        DecodeError, MissingFieldError, UnsupportedVersionError.
    """
    version = _s(fields, b"v")
    assert version is not None
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedVersionError(f"result protocol version {version!r} is not supported")
    request_id = _s(fields, b"id")
    status = _s(fields, b"status")
    assert request_id is not None and status is not None
    if status not in STATUSES:
        raise E.DecodeError(f"result status {status!r} is not one of {sorted(STATUSES)}")
    body_raw = fields.get(b"body")
    body = _unpack(body_raw, _RESULT_LIMITS) if body_raw else {}
    if not isinstance(body, dict):
        raise E.DecodeError("result body must be a msgpack map")
    outputs_raw = body.get("outputs") or {}
    # Only ProtocolError may leave here: the SDK's reply reader skips an undecodable result,
    # but any other exception would make it re-read the same entry forever.
    if not isinstance(outputs_raw, dict):
        raise E.DecodeError("result outputs must be a map of name -> tensor")
    outputs = {str(k): decode_tensor(v, _RESULT_LIMITS, name=str(k)) for k, v in outputs_raw.items()}
    try:
        timings = Timings.from_wire(body.get("timings"))
    except (TypeError, ValueError) as e:
        raise E.DecodeError(f"result timings are malformed: {e}") from e
    model, version = str(body.get("model") or ""), str(body.get("version") or "")
    samples: tuple[Result, ...] = ()
    if "samples" in body:
        samples = samples_from_wire(request_id, body, timings, model, version, _RESULT_LIMITS)
    return Result(
        request_id=request_id, status=cast(Status, status), outputs=outputs,
        code=_s(fields, b"code", required=False) or "",
        message=_s(fields, b"message", required=False) or "",
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
        arr = np.zeros((len(samples), *shape), dtype=dtype)
        for i, s in enumerate(samples):
            if s.status == STATUS_OK and s.outputs:
                arr[i] = s.outputs[name]
        stacked[name] = encode_tensor(arr)
    return [_slot_to_wire(s, with_outputs=False) for s in samples], stacked


def _slot_to_wire(res: Result, with_outputs: bool) -> dict[str, Any]:
    slot: dict[str, Any] = {"status": res.status}
    if with_outputs and res.outputs:
        slot["outputs"] = {k: encode_tensor(v) for k, v in res.outputs.items()}
    if res.code:
        slot["code"], slot["message"] = res.code, res.message
    return slot


def samples_from_wire(request_id: str, body: Mapping[str, Any], timings: Timings, model: str, version: str,
                      limits: Limits) -> tuple[Result, ...]:
    """The per-sample results of a multi-sample result body (each a :class:`Result` with the
    entry's request id, timings, model and version; ``stacked`` outputs become per-slot views).

    Raises:
        DecodeError: a slot is malformed.
    """
    raw, stacked_raw = body.get("samples"), body.get("stacked") or {}
    if not isinstance(raw, list) or not isinstance(stacked_raw, dict):
        raise E.DecodeError("result 'samples' must be a list and 'stacked' a map of name -> tensor")
    stacked = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in stacked_raw.items()}
    if any(a.ndim == 0 or a.shape[0] != len(raw) for a in stacked.values()):
        raise E.DecodeError("result 'stacked' outputs need a leading dimension of one row per sample")
    out: list[Result] = []
    for i, slot in enumerate(raw):
        if not isinstance(slot, dict) or slot.get("status") not in STATUSES:
            raise E.DecodeError("each result sample needs a status of ok|error|expired|rejected")
        outs = slot.get("outputs") or {}
        if not isinstance(outs, dict):
            raise E.DecodeError("result sample outputs must be a map of name -> tensor")
        status: Status = slot["status"]
        mine = {str(k): decode_tensor(v, limits, name=str(k)) for k, v in outs.items()}
        if status == STATUS_OK and not mine:
            mine = {k: a[i] for k, a in stacked.items()}
        out.append(Result(request_id, status, mine, code=str(slot.get("code") or ""),
                          message=str(slot.get("message") or ""), timings=timings, model=model, version=version))
    return tuple(out)
