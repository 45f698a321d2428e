"""Wire protocol v1, the shared vocabulary: versions, statuses, the tensor codec, the
decoder limits and the field readers every message of ``protocol`` and ``results`` uses.

A tensor is the msgpack map ``{"dtype": "float32", "shape": [3, 4], "data": <bin>}`` with
the raw little-endian, C-order bytes of the array (``dtype`` one of :data:`DTYPES`, at
most :data:`MAX_DIMS` dimensions). msgpack only, never pickle. See ``docs/protocol.md``.
"""

from __future__ import annotations

import math
import re
import reprlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

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
# Strings: ``data`` is a msgpack array of UTF-8 str, one per element in C order (KServe's
# BYTES, Triton's TYPE_STRING); decoded into numpy object arrays, as onnxruntime takes and
# returns string tensors. Numeric dtypes stay in DTYPES (raw buffers) so no buffer path ever
# meets an object array.
STRING: Final = "string"
WIRE_DTYPES: Final[frozenset[str]] = frozenset(DTYPES) | {STRING}
_OBJECT: Final = np.dtype(object)
# dtype -> wire name, for the wire dtypes in every byte order: numpy computes ``dtype.name``
# in Python on each access (~3 us), which every tensor encode and check would pay.
_WIRE_NAMES: Final[dict[np.dtype[Any], str]] = {
    dt: name for name, base in DTYPES.items() for dt in (base, base.newbyteorder(">"), base.newbyteorder("="))
}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name`` (e.g. ``"float32"``), looked up for wire dtypes instead of computed;
    :data:`STRING` for numpy's str and object dtypes (an object array's elements are checked
    when it is encoded)."""
    name = _WIRE_NAMES.get(dtype)
    if name is not None:
        return name
    return STRING if dtype.kind in "UO" else dtype.name


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of wire dtype ``name`` (object for :data:`STRING`; other names as
    numpy reads them).

    Raises:
        TypeError: a name numpy does not know.
    """
    return _OBJECT if name == STRING else np.dtype(name)


def take_row(a: np.ndarray[Any, Any], i: int) -> np.ndarray[Any, Any]:
    """Row ``i`` of ``a``: what ``a[i]`` gives (a view, or a numpy scalar for 1-d numeric
    arrays), except that one element of a 1-d string tensor comes as a new 0-d object array
    rather than a bare str, so every output keeps a dtype and a shape."""
    row = a[i]
    if a.dtype.kind == "O" and a.ndim == 1:
        out = np.empty((), dtype=object)
        out[()] = row
        return out
    return row  # type: ignore[no-any-return]


def all_str(a: np.ndarray[Any, Any]) -> bool:
    """Whether every element of an object array is a str (it is then a string tensor)."""
    return all(isinstance(v, str) for v in a.flat)


def string_array(value: Any) -> np.ndarray[Any, Any]:
    """``value`` as an object array of str (what string tensors are everywhere in headrace).

    Raises:
        InvalidTensorError: an element is not a str (``bad_dtype``).
    """
    a = np.asarray(value)
    if a.dtype.kind == "U":
        return a.astype(object)
    a = np.asarray(value, dtype=object)
    if not all_str(a):
        bad = next(v for v in a.flat if not isinstance(v, str))
        raise E.InvalidTensorError(f"a string tensor holds a {type(bad).__name__}, not str", code=E.BAD_DTYPE)
    return a


def utf8_strings(strings: list[str], what: str = "a string tensor holds",
                 error: type[E.ProtocolError] = E.InvalidTensorError) -> list[str]:
    """``strings``, checked to be encodable as UTF-8 (a lone surrogate such as ``"\\udcff"``,
    e.g. from ``os.fsdecode`` of undecodable bytes, is not; msgpack would raise a bare
    ``UnicodeEncodeError``).

    Args:
        what: how the message introduces the string (``"a string tensor holds"``).
        error: the class raised (texts are not tensors: :class:`ProtocolError`).

    Raises:
        InvalidTensorError (or ``error``): ``bad_value``, naming the first string that is not.
    """
    for s in strings:
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise error(f"{what} {quote(s)}, which is not valid UTF-8 ({e.reason})", code=E.BAD_VALUE) from e
    return strings


# numpy 1.x's own limit (NPY_MAXDIMS). A multi-sample block adds its sample axis to each
# sample's shape, so a sample of up to 31 dimensions travels in both forms.
MAX_DIMS: Final = 32
# Used with fullmatch: "$" would also accept the string with one trailing newline.
ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Stream keys are bytes to Redis; we bound them and forbid control characters.
KEY_RE = re.compile(r"[^\x00-\x1f\x7f]{1,512}")
# deadline_ms / ts_ms: empty (= not given) or decimal ASCII only (int() would also take "1_000", " 7" or
# Arabic-Indic digits), at most 18 digits so every value fits an int64 and a float.
MS_RE = re.compile(rb"[0-9]{1,18}")


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
    # A decoder's KV cache is two inputs per layer (an 80-layer model takes 160 of them);
    # the msgpack map cap derived from this still refuses a hostile map before building it.
    max_inputs: int = 512


DEFAULT_LIMITS: Final = Limits()

# Error messages quote what the producer sent; reprlib bounds depth and length, because a
# plain repr() of a 1000-level nested list (msgpack accepts ~1023) raises RecursionError.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxstring, _QUOTE.maxother = 3, 10, 40, 40


def quote(value: Any) -> str:
    """A bounded repr of producer-sent ``value`` for error messages (never raises on depth)."""
    return _QUOTE.repr(value)


# --- tensors -----------------------------------------------------------------------------


def encode_tensor(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Encode an array as a wire tensor map (little-endian, C order).

    Raises:
        InvalidTensorError: the dtype is not a wire dtype.
    """
    a = np.asarray(arr)
    name = dtype_name(a.dtype)
    if name == STRING:
        a = string_array(a)
        return {"dtype": STRING, "shape": list(a.shape), "data": utf8_strings(a.ravel().tolist())}
    if name not in DTYPES:
        raise E.InvalidTensorError(f"dtype {name!r} is not a wire dtype; use one of {sorted(WIRE_DTYPES)}",
                                   code=E.BAD_DTYPE)
    # asarray(order="C"), not ascontiguousarray: the latter turns 0-d scalars into shape (1,).
    a = np.asarray(a, dtype=DTYPES[name], order="C")
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}


def encode_named(tensors: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Named arrays (``what``: "input" or "output", for messages) as wire tensors.

    Raises:
        InvalidTensorError: naming the tensor whose dtype is not a wire dtype, or whose string
            tensor holds something that is not a str or not valid UTF-8.
    """
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        try:
            out[name] = encode_tensor(value)
        except E.InvalidTensorError as err:
            raise E.InvalidTensorError(f"{what} {name!r}: {err.message}", code=err.code) from err
    return out


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
    wire_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(wire_name, str) or wire_name not in WIRE_DTYPES:
        raise E.InvalidTensorError(f"{name}: dtype {quote(wire_name)} is not one of {sorted(WIRE_DTYPES)}",
                                   code=E.BAD_DTYPE)
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise E.InvalidTensorError(f"{name}: shape must be a list of at most {MAX_DIMS} "
                                   f"non-negative integers, got {quote(shape)}", code=E.BAD_SHAPE)
    if wire_name == STRING:
        return _decode_strings(name, shape, data, limits)
    if not isinstance(data, (bytes, bytearray)):
        raise E.DecodeError(f"{name}: tensor data must be msgpack bin (raw bytes)")
    n = element_count(name, shape, limits)
    dt = DTYPES[wire_name]
    if n * dt.itemsize != len(data):
        raise E.InvalidTensorError(
            f"{name}: shape {list(shape)} of {wire_name} needs {n * dt.itemsize} bytes, got {len(data)}",
            code=E.BAD_SHAPE)
    arr = np.frombuffer(bytes(data), dtype=dt).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)


def element_count(name: str, shape: Sequence[int], limits: Limits) -> int:
    """The element count of a well-formed ``shape``, held to ``limits`` before anything is
    allocated for it.

    Raises:
        PayloadTooLargeError: more than ``limits.max_elements`` elements.
        InvalidTensorError: ``bad_shape``, dimensions no array can have.
    """
    # math.prod on Python ints cannot overflow; compare before trusting any allocation.
    n = math.prod(shape)
    if n > limits.max_elements:
        raise E.PayloadTooLargeError(f"{name}: {n} elements exceed the limit of {limits.max_elements}")
    # An empty tensor may still name absurd dimensions ([0, 2**63]); numpy refuses any shape
    # whose non-zero dimensions multiply beyond its size limit, so bound them the same way.
    if math.prod(d or 1 for d in shape) > limits.max_elements:
        raise E.InvalidTensorError(f"{name}: shape {quote(shape)} has dimensions beyond "
                                   f"{limits.max_elements} elements", code=E.BAD_SHAPE)
    return n


def strings_within(name: str, strings: Sequence[str], limits: Limits) -> np.ndarray[Any, Any]:
    """``strings`` (all str) as a 1-d object array, each held to ``limits.max_text_chars``.

    Raises:
        PayloadTooLargeError: a longer string.
    """
    longest = max(map(len, strings), default=0)
    if longest > limits.max_text_chars:
        raise E.PayloadTooLargeError(f"{name}: a string of {longest} chars exceeds {limits.max_text_chars}")
    arr = np.empty(len(strings), dtype=object)
    arr[:] = strings
    return arr


def _decode_strings(name: str, shape: Sequence[int], data: Any, limits: Limits) -> np.ndarray[Any, Any]:
    n = element_count(name, shape, limits)
    if not isinstance(data, (list, tuple)) or not all(isinstance(v, str) for v in data):
        raise E.DecodeError(f"{name}: string tensor data must be a msgpack array of str")
    if len(data) != n:
        raise E.InvalidTensorError(f"{name}: shape {list(shape)} needs {n} strings, got {len(data)}",
                                   code=E.BAD_SHAPE)
    return strings_within(name, data, limits).reshape(shape)


# --- entry fields ------------------------------------------------------------------------


def now_ms() -> int:
    """Unix time in ms (the clock of ``ts_ms`` and ``deadline_ms``)."""
    return int(time.time() * 1000)


def field_bytes(value: Any) -> bytes:
    """An entry field value as bytes (``str(value)`` UTF-8 encoded unless already bytes)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def field_text(fields: Mapping[bytes, bytes], key: bytes, required: bool = True) -> str | None:
    """Entry field ``key`` as text; None when absent and not ``required``.

    Raises:
        MissingFieldError: absent and ``required``.
        DecodeError: not UTF-8.
    """
    raw = fields.get(key)
    if raw is None:
        if required:
            raise E.MissingFieldError(f"entry field {key.decode()!r} is missing")
        return None
    try:
        return raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    except UnicodeDecodeError as e:
        raise E.DecodeError(f"entry field {key.decode()!r} is not UTF-8") from e


def unpack_msgpack(data: bytes, limits: Limits) -> Any:
    """Decode a msgpack body within ``limits`` (containers beyond them are refused before
    they are built; extension types are never accepted).

    Raises:
        PayloadTooLargeError: ``data`` or a container in it is beyond ``limits``.
        DecodeError: not valid msgpack (any decoder failure).
    """
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
