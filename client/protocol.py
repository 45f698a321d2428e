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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from headrace.client import errors as E
from headrace.client.results import (
    RESULT_LIMITS,
    Result,
    Timings,
    decode_result,
    encode_result,
    error_result,
    samples_from_wire,
    samples_to_wire,
)
from headrace.client.wire import (
    DEFAULT_LIMITS,
    DTYPES,
    ID_RE,
    KEY_RE,
    MAX_DIMS,
    MS_RE,
    PROTOCOL_VERSION,
    STATUS_ERROR,
    STATUS_EXPIRED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUSES,
    STRING,
    SUPPORTED_VERSIONS,
    WIRE_DTYPES,
    Limits,
    Status,
    decode_tensor,
    encode_named,
    encode_tensor,
    field_bytes,
    field_text,
    now_ms,
    numpy_dtype,
    quote,
    unpack_msgpack,
    utf8_strings,
)

# The protocol's public names, wherever they are defined: ``protocol`` is the one import
# for producers and workers (messages here, the vocabulary in ``wire``, results in ``results``).
__all__ = [
    "DEFAULT_LIMITS", "DTYPES", "MAX_DIMS", "PROTOCOL_VERSION", "RESULT_LIMITS", "STATUSES", "STATUS_ERROR",
    "STATUS_EXPIRED", "STATUS_OK", "STATUS_REJECTED", "STRING", "SUPPORTED_VERSIONS", "WIRE_DTYPES", "Envelope", "Limits", "Request",
    "Result", "Status", "Timings", "check_reply_to", "check_request_id", "decode_body", "decode_body_map",
    "decode_envelope", "decode_request", "decode_result", "decode_tensor", "encode_request", "encode_result",
    "encode_tensor", "error_result", "now_ms", "numpy_dtype", "samples_from_wire", "samples_to_wire", "unpack_body",
]


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
        ProtocolError: neither or both of ``inputs`` and ``text`` are given, or the text is
            not valid UTF-8 (``bad_value``: a lone surrogate).
    """
    if (req.text is None) == (not req.inputs):
        raise E.ProtocolError("a request carries either inputs or text, exactly one of them",
                              code=E.MISSING_FIELD)
    body: dict[str, Any] = (
        {"text": utf8_strings([req.text], "the text is", E.ProtocolError)[0]} if req.text is not None
        else {"inputs": encode_named(req.inputs, "input")}
    )
    env = req.envelope
    fields = {
        b"v": field_bytes(env.version),
        b"id": field_bytes(env.request_id),
        b"reply_to": field_bytes(env.reply_to),
        b"deadline_ms": field_bytes(env.deadline_ms),
        b"ts_ms": field_bytes(env.ts_ms or now_ms()),
        b"body": msgpack.packb(body, use_bin_type=True),
    }
    if env.model:
        fields[b"model"] = field_bytes(env.model)
    return fields


def check_request_id(request_id: str) -> None:
    """Apply the wire rule for request ids: 1-128 chars of ``[A-Za-z0-9._:-]``.

    Raises:
        DecodeError: ``request_id`` breaks the rule (or is not a str).
    """
    if not isinstance(request_id, str) or not ID_RE.fullmatch(request_id):
        shown = request_id[:64] if isinstance(request_id, str) else request_id
        raise E.DecodeError(f"request id {shown!r} must be 1-128 chars of [A-Za-z0-9._:-]")


def check_reply_to(reply_to: str) -> None:
    """Apply the wire rule for ``reply_to``: a 1-512 character key without control characters.

    Raises:
        DecodeError: ``reply_to`` breaks the rule.
    """
    if not isinstance(reply_to, str) or not KEY_RE.fullmatch(reply_to):
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
    if not MS_RE.fullmatch(data):
        raise E.DecodeError(f"entry field {key.decode()!r} must be 1-18 ASCII digits (Unix ms), got "
                            f"{quote(bytes(data[:40]))}")
    return int(data)


def decode_envelope(fields: Mapping[bytes, bytes]) -> Envelope:
    """Decode and check the routing fields of a request entry.

    Raises:
        MissingFieldError: ``v``, ``id`` or ``reply_to`` is absent.
        UnsupportedVersionError: ``v`` is not a version this code speaks.
        DecodeError: a field breaks its rule (id, reply_to, ``deadline_ms``/``ts_ms``).
    """
    version = field_text(fields, b"v")
    assert version is not None
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedVersionError(
            f"protocol version {version!r} is not supported; this worker speaks {sorted(SUPPORTED_VERSIONS)}")
    request_id = field_text(fields, b"id")
    reply_to = field_text(fields, b"reply_to")
    assert request_id is not None and reply_to is not None
    check_request_id(request_id)
    check_reply_to(reply_to)
    deadline_ms, ts_ms = _ms(fields, b"deadline_ms"), _ms(fields, b"ts_ms")
    return Envelope(request_id=request_id, reply_to=reply_to, version=version,
                    deadline_ms=deadline_ms, ts_ms=ts_ms, model=field_text(fields, b"model", required=False))


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
    return unpack_msgpack(data, limits)


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
