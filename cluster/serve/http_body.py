"""The JSON body of ``POST /v1/models/{model}/infer``, parsed and checked by hand.

Every bad body gets a wire error code (:mod:`headrace.client.errors`), never an exception
the web framework turns into a 500 or its own 422 format. The rules mirror the wire
protocol's (``docs/protocol.md``): the same limits, the same codes.

Body::

    {"text": "..."}                                   # text models
    {"inputs": {"x": {"dtype": "float32", "shape": [4], "data": [1, 2, 3, 4]}}}
    {"inputs": {"x": [[1, 2], [3, 4]]}}               # a bare (nested) list is float32
    optional: "timeout_s": <number > 0>
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import DEFAULT_LIMITS, MAX_DIMS, STRING, WIRE_DTYPES, Limits
from headrace.client.wire import element_count, strings_within

JSON_TYPES: Final = ("application/json",)
BODY_KEYS: Final = frozenset({"text", "inputs", "timeout_s"})
TENSOR_KEYS: Final = frozenset({"dtype", "shape", "data"})


@dataclass(frozen=True)
class InferCall:
    """One parsed call: a text or named arrays, and the caller's timeout (None: default)."""

    text: str | None = None
    inputs: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    timeout_s: float | None = None


def _no_constants(token: str) -> Any:
    raise E.DecodeError(f"the body is not valid JSON: {token} is not a JSON number")


def check_content_type(content_type: str | None) -> None:
    """Raises: ProtocolError (``decode_error``) for a body that does not say it is JSON."""
    if not content_type:
        return  # curl --data without -H, most HTTP clients' default: try it as JSON
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in JSON_TYPES or (mime.startswith("application/") and mime.endswith("+json")):
        return
    raise E.DecodeError(f"Content-Type {mime!r} is not JSON; send the body as application/json")


# Deepest bracket nesting a body may have. A tensor needs at most MAX_DIMS levels of lists
# inside two objects; anything deeper is refused before json.loads sees it, because the C
# decoder recurses per level and only the interpreter's recursion limit stops it, a limit any
# library in the process may raise (onnx2tf sets it to 2**31-1 at import), after which a body
# of 100,000 brackets overflows the C stack and kills the replica.
MAX_JSON_DEPTH: Final[int] = MAX_DIMS + 8

_OPEN, _CLOSE, _QUOTE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8), ord('"')


def json_depth(raw: bytes) -> int:
    """The deepest ``[``/``{`` nesting of ``raw`` outside JSON strings (vectorised: about
    10 ms per MB). Escaped quotes and backslashes are taken out first, so what is left of
    the quotes toggles in and out of strings."""
    flat = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    b = np.frombuffer(flat, np.uint8)
    if b.size == 0:
        return 0
    outside = (np.cumsum(b == _QUOTE) % 2) == 0
    step = np.isin(b, _OPEN).astype(np.int32) - np.isin(b, _CLOSE).astype(np.int32)
    return int(np.cumsum(step * outside).max(initial=0))


def parse_body(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> InferCall:
    """Parse and check a request body.

    Raises:
        DecodeError: not JSON, not an object, unknown keys, both ``text`` and ``inputs``,
            a tensor that is not an object of dtype/shape/data.
        MissingFieldError: neither ``text`` nor ``inputs``, or a tensor key is missing.
        ProtocolError: ``bad_value`` for a ``text`` that is not a string, values that do
            not fit the dtype, or a bad ``timeout_s``.
        InvalidTensorError: ``bad_dtype`` / ``bad_shape``.
        PayloadTooLargeError: too many inputs or elements, a text too long.
    """
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise E.DecodeError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except E.HeadraceError:
        raise
    except (ValueError, RecursionError) as e:
        raise E.DecodeError(f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise E.DecodeError("the body must be a JSON object with 'text' or 'inputs'")
    unknown = sorted(set(body) - BODY_KEYS)
    if "request_id" in unknown:
        raise E.DecodeError("request_id is chosen by the server (the X-Request-Id header of the answer); "
                            "to retry safely send an Idempotency-Key header")
    if unknown:
        raise E.DecodeError(f"unknown key(s) {unknown[:5]}; the body takes {sorted(BODY_KEYS)}")
    timeout_s = _timeout(body.get("timeout_s"))
    if "text" in body and "inputs" in body:
        raise E.DecodeError("the body carries both 'text' and 'inputs'; send exactly one")
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str):
            raise E.ProtocolError(f"'text' must be a string, got {_kind(text)}", code=E.BAD_VALUE)
        if len(text) > limits.max_text_chars:
            raise E.PayloadTooLargeError(f"text of {len(text)} chars exceeds {limits.max_text_chars}")
        return InferCall(text=text, timeout_s=timeout_s)
    if "inputs" not in body:
        raise E.MissingFieldError("the body needs 'text' or 'inputs'")
    return InferCall(inputs=parse_inputs(body["inputs"], limits), timeout_s=timeout_s)


def parse_inputs(raw: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray[Any, Any]]:
    """JSON inputs (name -> tensor object or bare nested list) as arrays. Raises as
    :func:`parse_body`."""
    if not isinstance(raw, dict) or not raw:
        raise E.DecodeError("'inputs' must be a non-empty object of name -> tensor")
    if len(raw) > limits.max_inputs:
        raise E.PayloadTooLargeError(f"{len(raw)} inputs exceed the limit of {limits.max_inputs}")
    return {name: _tensor(name, value, limits) for name, value in raw.items()}


def _tensor(name: str, value: Any, limits: Limits) -> np.ndarray[Any, Any]:
    if isinstance(value, list):
        return _nested(name, value, limits)
    if not isinstance(value, dict):
        raise E.DecodeError(f"input {name!r} must be a tensor object {{dtype, shape, data}} or a nested list, "
                            f"got {_kind(value)}")
    unknown = sorted(set(value) - TENSOR_KEYS)
    if unknown:
        raise E.DecodeError(f"input {name!r}: unknown key(s) {unknown[:5]}; a tensor has dtype, shape, data")
    for key in ("shape", "data"):
        if key not in value:
            raise E.MissingFieldError(f"input {name!r}: tensor key {key!r} is missing")
    dtype = value.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise E.InvalidTensorError(f"input {name!r}: dtype {str(dtype)[:20]!r} is not one of {sorted(WIRE_DTYPES)}",
                                   code=E.BAD_DTYPE)
    shape = _shape(name, value["shape"], limits)
    data = value["data"]
    if not isinstance(data, list):
        raise E.DecodeError(f"input {name!r}: data must be a flat list of values, got {_kind(data)}")
    if len(data) != math.prod(shape):
        raise E.InvalidTensorError(f"input {name!r}: {len(data)} values do not fill shape {shape}",
                                   code=E.BAD_SHAPE)
    if dtype == STRING:
        return _strings(name, data, limits).reshape(shape)
    return _values(name, data, dtype).reshape(shape)


def _strings(name: str, data: list[Any], limits: Limits) -> np.ndarray[Any, Any]:
    """Flat JSON strings as a 1-d object array (a string tensor), each within ``max_text_chars``."""
    if not all(isinstance(v, str) for v in data):
        raise E.ProtocolError(f"input {name!r}: values of a string tensor must be JSON strings", code=E.BAD_VALUE)
    return strings_within(f"input {name!r}", data, limits)


def _shape(name: str, shape: Any, limits: Limits) -> list[int]:
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise E.InvalidTensorError(f"input {name!r}: shape must be a list of at most {MAX_DIMS} non-negative "
                                   f"integers, got {str(shape)[:60]}", code=E.BAD_SHAPE)
    element_count(f"input {name!r}", shape, limits)
    return shape


def _values(name: str, data: list[Any], dtype: str) -> np.ndarray[Any, Any]:
    """Flat JSON values as a 1-d array of ``dtype``, refusing what does not fit it exactly."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        ok = all(isinstance(v, bool) or (type(v) is int and v in (0, 1)) for v in data)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        ok = all(type(v) is int and info.min <= v <= info.max for v in data)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    if not ok:
        raise E.ProtocolError(f"input {name!r}: values must be {_expected(dt)}", code=E.BAD_VALUE)
    if dt.kind != "f":
        return np.asarray(data, dtype=dt)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.asarray(data, dtype=dt)
    if arr.size and not bool(np.isfinite(arr).all()):
        raise E.ProtocolError(f"input {name!r}: a value does not fit {dtype} (its range is ±{np.finfo(dt).max:.4g})",
                              code=E.BAD_VALUE)
    return arr


def _nested(name: str, value: list[Any], limits: Limits) -> np.ndarray[Any, Any]:
    """A bare nested list: rectangular, numbers only, float32."""
    shape: list[int] = []
    level: Any = value
    while isinstance(level, list):
        shape.append(len(level))
        if len(shape) > MAX_DIMS:
            raise E.InvalidTensorError(f"input {name!r}: more than {MAX_DIMS} nesting levels", code=E.BAD_SHAPE)
        level = level[0] if level else None
    _shape(name, shape, limits)
    flat: list[Any] = [value]
    for depth in range(len(shape)):
        nxt: list[Any] = []
        for item in flat:
            if not isinstance(item, list) or len(item) != shape[depth]:
                raise E.InvalidTensorError(f"input {name!r}: the nested list is not rectangular (shape {shape})",
                                           code=E.BAD_SHAPE)
            nxt.extend(item)
        flat = nxt
    return _values(name, flat, "float32").reshape(shape)


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise E.ProtocolError(f"timeout_s must be a number of seconds > 0, got {str(value)[:20]}", code=E.BAD_VALUE)
    return float(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _expected(dt: np.dtype[Any]) -> str:
    if dt.kind == "b":
        return "true/false (or 0/1)"
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return f"integers from {info.min} to {info.max} ({dt.name})"
    return f"numbers ({dt.name})"
