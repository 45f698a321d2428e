"""Bad-input generators for the fuzz tests (``test_fuzz_*.py``) and ``benchmarks/fuzz.py``.

Each strategy draws a :class:`Case`: a request entry's fields (bytes to bytes, exactly what
``XREADGROUP`` hands the worker), the family of mutation it came from, and, where the
family pins it down, the one error code the decoder must answer. Families follow the
issue's list: random bytes, truncated msgpack, deep nesting, huge declared shapes with
small data, wrong dtypes, NaN/Inf, non-UTF-8 text, oversize entries, missing and extra
fields; plus valid requests, so a batch mixes good and bad.

The number of examples scales with ``HEADRACE_FUZZ_SCALE`` (default 1 for CI; the long fuzz
run in ``benchmarks/fuzz.py`` sets it higher).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.samples import MultiRequest

REPLY = "headrace:{affine}:reply:fuzz"
# Codes a bad request may be answered with: specific protocol codes, never internal_error
# or model_error (those would mean the input reached code that was not ready for it).
INPUT_CODES = frozenset({E.DECODE_ERROR, E.MISSING_FIELD, E.BAD_DTYPE, E.BAD_SHAPE, E.BAD_VALUE,
                         E.PAYLOAD_TOO_LARGE, E.UNSUPPORTED_VERSION, E.TOO_MANY_SAMPLES})
OK = "ok"
_ids = itertools.count()


def scale() -> int:
    """Multiplier of every fuzz test's example count (``HEADRACE_FUZZ_SCALE``, >= 1)."""
    try:
        return max(1, int(os.environ.get("HEADRACE_FUZZ_SCALE", "1")))
    except ValueError:
        return 1


def examples(n: int) -> int:
    return n * scale()


@dataclass(frozen=True)
class Case:
    """One fuzzed entry. ``expect``: the exact outcome (a wire code, or ``"ok"`` for a request
    that must be answered with the affine model's output) when the family determines it,
    else None (any of :data:`INPUT_CODES` or ok)."""

    family: str
    fields: dict[bytes, bytes]
    expect: str | None = None
    by_check: bool = False  # the decoder accepts it; the model's input check gives ``expect``

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep multi-MB bodies short
        short = {k: (v if len(v) <= 80 else v[:60] + b"...<%d bytes>" % len(v)) for k, v in self.fields.items()}
        return f"Case({self.family!r}, {short!r}, expect={self.expect!r}, by_check={self.by_check})"


def unique_id(prefix: str = "f") -> str:
    """Request ids unique across all examples of a process: the worker fuzz keeps one worker
    (and its dedupe markers) for many examples."""
    return f"{prefix}{os.getpid()}-{next(_ids)}"


def valid_fields(rid: str | None = None, x: np.ndarray[Any, Any] | None = None) -> dict[bytes, bytes]:
    x = np.arange(4, dtype=np.float32) if x is None else x
    env = P.Envelope(request_id=rid or unique_id(), reply_to=REPLY, ts_ms=P.now_ms())
    return P.encode_request(P.Request(envelope=env, inputs={"x": x}))


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw_str(data: bytes) -> bytes:
    """A msgpack ``str`` header followed by ``data`` as is (lets us send non-UTF-8 "text",
    which msgpack's packer would refuse to produce)."""
    n = len(data)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n < 256:
        head = b"\xd9" + bytes([n])
    else:
        head = b"\xda" + n.to_bytes(2, "big")
    return head + data


def tensor(dtype: Any = "float32", shape: Any = (4,), data: Any = None) -> dict[str, Any]:
    if data is None:
        data = b"\0" * 16
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data": data}


def with_body(body: bytes, rid: str | None = None) -> dict[bytes, bytes]:
    f = valid_fields(rid)
    f[b"body"] = body
    return f


# --- strategies ------------------------------------------------------------------------------

# msgpack-able values of every type the decoder may meet where it expects something else.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)

finite_x = st.lists(st.floats(-1e6, 1e6, width=32), min_size=4, max_size=4).map(
    lambda v: np.asarray(v, dtype=np.float32))


@st.composite
def valid_case(draw: st.DrawFn) -> Case:
    return Case("valid", valid_fields(x=draw(finite_x)), OK)


@st.composite
def random_bytes_body(draw: st.DrawFn) -> Case:
    return Case("random_bytes", with_body(draw(st.binary(max_size=300))))


@st.composite
def random_fields(draw: st.DrawFn) -> Case:
    """Arbitrary field maps: random names and values, sometimes the real names."""
    names = st.sampled_from([b"v", b"id", b"reply_to", b"body", b"deadline_ms", b"ts_ms", b"model"]) \
        | st.binary(min_size=1, max_size=12)
    fields = draw(st.dictionaries(names, st.binary(max_size=60), max_size=8))
    return Case("random_fields", fields)


@st.composite
def truncated_msgpack(draw: st.DrawFn) -> Case:
    body = valid_fields()[b"body"]
    cut = draw(st.integers(0, len(body) - 1))
    # An empty body is "not msgpack" too; every proper prefix of a map is incomplete input.
    return Case("truncated_msgpack", with_body(body[:cut]), E.DECODE_ERROR)


@st.composite
def bitflip_body(draw: st.DrawFn) -> Case:
    body = bytearray(valid_fields()[b"body"])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(body) - 1))
        body[i] = draw(st.integers(0, 255))
    return Case("bitflip", with_body(bytes(body)))


@st.composite
def structured_garbage(draw: st.DrawFn) -> Case:
    """A random msgpack value where the body, the inputs, a tensor or one tensor field
    should be."""
    value = draw(msgpack_values)
    where = draw(st.sampled_from(["body", "inputs", "tensor", "dtype", "shape", "data", "text", "extra"]))
    if where == "body":
        body: Any = value
    elif where == "inputs":
        body = {"inputs": value}
    elif where == "tensor":
        body = {"inputs": {"x": value}}
    elif where == "text":
        body = {"text": value}
    elif where == "extra":
        # Unknown keys in the body and in a tensor are ignored (forward compatibility).
        return Case("extra_fields", with_body(pack({"inputs": {"x": {**tensor(), "zz": value}}, "zz": value})), OK)
    else:
        t = tensor()
        t[where] = value
        body = {"inputs": {"x": t}}
    return Case(f"structured_{where}", with_body(pack(body)))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    # Around 1000 levels: msgpack's stack limit (~1023) and Python's recursion limit (1000)
    # meet there, which is where a decoder that recursed or repr()'d the value would break.
    depth = draw(st.integers(50, 5000) | st.integers(990, 1030))
    kind = draw(st.sampled_from([b"\x91", b"\x81\xa1k"]))  # [x] or {"k": x}
    nested = kind * depth + b"\xc0"
    where = draw(st.sampled_from(["body", "shape", "dtype", "text"]))
    if where == "body":
        # A deep list is not a map; a shallow enough map of maps has neither inputs nor text.
        return Case("deep_nesting", with_body(nested), E.DECODE_ERROR if kind == b"\x91" else None)
    if where == "dtype":
        prefix = pack({"inputs": {"x": {"data": b"\0" * 16, "shape": [4], "dtype": None}}})[:-1]
        return Case("deep_nesting", with_body(prefix + nested), None)
    # Splice the nested value into a valid map by hand (packb would recurse too).
    if where == "shape":
        prefix = pack({"inputs": {"x": {"dtype": "float32", "data": b"\0" * 16, "shape": None}}})[:-1]
        # Shallow enough to decode it is a bad shape; too deep it is not msgpack we accept.
        return Case("deep_nesting", with_body(prefix + nested), None)
    prefix = pack({"text": None})[:-1]
    # Shallow enough to decode it is a text of another type (bad_value); too deep it is not
    # msgpack we accept (decode_error).
    return Case("deep_nesting", with_body(prefix + nested), None)


@st.composite
def huge_shape(draw: st.DrawFn) -> Case:
    dims = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=P.MAX_DIMS))
    data = draw(st.binary(max_size=64))
    n = int(np.prod([float(d) for d in dims]))  # float: only to pick the flavour below
    if n * 4 == len(data):  # consistent by chance: make it inconsistent
        data += b"\0"
    # More elements than the limit is too large; anything else here is a bad shape (bytes
    # that do not match, or an empty tensor naming dimensions no array can have).
    expect = E.PAYLOAD_TOO_LARGE if math.prod(dims) > P.DEFAULT_LIMITS.max_elements else E.BAD_SHAPE
    return Case("huge_shape", with_body(pack({"inputs": {"x": tensor("float32", dims, data)}})), expect)


@st.composite
def wrong_dtype(draw: st.DrawFn) -> Case:
    bogus = draw(st.sampled_from(["float128", "complex64", "object", "<f4", "f4", "str", "", "FLOAT32",
                                  "float32 ", "bfloat16"]) | st.text(max_size=12))
    if bogus in P.DTYPES:
        bogus += "?"
    return Case("wrong_dtype", with_body(pack({"inputs": {"x": tensor(bogus)}})), E.BAD_DTYPE)


@st.composite
def other_wire_dtype(draw: st.DrawFn) -> Case:
    """A valid wire dtype the affine model does not take: the servable's check answers it."""
    name = draw(st.sampled_from(sorted(set(P.DTYPES) - {"float32"})))
    arr = np.zeros(4, dtype=name)
    env = P.Envelope(request_id=unique_id(), reply_to=REPLY)
    return Case("model_dtype", P.encode_request(P.Request(env, inputs={"x": arr})), E.BAD_DTYPE, by_check=True)


@st.composite
def wrong_model_shape(draw: st.DrawFn) -> Case:
    shape = draw(st.lists(st.integers(0, 5), max_size=3).filter(lambda s: s != [4]))
    arr = np.zeros(shape, dtype=np.float32)
    env = P.Envelope(request_id=unique_id(), reply_to=REPLY)
    return Case("model_shape", P.encode_request(P.Request(env, inputs={"x": arr})), E.BAD_SHAPE, by_check=True)


@st.composite
def non_finite(draw: st.DrawFn) -> Case:
    x = draw(finite_x).copy()
    x[draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return Case("nan_inf", valid_fields(x=x), E.BAD_VALUE, by_check=True)


@st.composite
def non_utf8(draw: st.DrawFn) -> Case:
    bad = draw(st.binary(min_size=1, max_size=20).filter(lambda b: not _utf8(b)))
    where = draw(st.sampled_from(["text", "input_name", "v", "id", "reply_to", "deadline_ms"]))
    if where == "text":
        body = pack({"text": None})[:-1] + raw_str(bad)
        return Case("non_utf8", with_body(body), E.DECODE_ERROR)
    if where == "input_name":
        body = b"\x81" + raw_str(b"inputs") + b"\x81" + raw_str(bad) + pack(tensor())
        return Case("non_utf8", with_body(body), E.DECODE_ERROR)
    f = valid_fields()
    f[where.encode()] = bad
    return Case("non_utf8", f, E.DECODE_ERROR)


@st.composite
def oversize(draw: st.DrawFn) -> Case:
    what = draw(st.sampled_from(["body", "text", "inputs", "map"]))
    if what == "body":
        extra = draw(st.integers(1, 4096))
        blob = b"\0" * (P.DEFAULT_LIMITS.max_payload_bytes + extra)
        return Case("oversize", with_body(pack({"inputs": {"x": tensor(data=blob)}})), E.PAYLOAD_TOO_LARGE)
    if what == "text":
        n = P.DEFAULT_LIMITS.max_text_chars + draw(st.integers(1, 1000))
        return Case("oversize", with_body(pack({"text": "a" * n})), E.PAYLOAD_TOO_LARGE)
    # More named inputs than max_inputs; beyond the msgpack map-length cap too ("map").
    lo = P.DEFAULT_LIMITS.max_inputs + 1
    beyond_map_cap = P.DEFAULT_LIMITS.max_inputs * 4 + 17
    n = draw(st.integers(lo, lo + 50)) if what == "inputs" else draw(st.integers(beyond_map_cap, beyond_map_cap + 2000))
    body = pack({"inputs": {f"i{i}": tensor() for i in range(n)}})
    return Case("oversize", with_body(body), E.PAYLOAD_TOO_LARGE)


@st.composite
def missing_field(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from([b"v", b"id", b"reply_to", b"body", b"deadline_ms", b"ts_ms"]))
    f = valid_fields()
    del f[name]
    expect = {b"deadline_ms": OK, b"ts_ms": OK}.get(name, E.MISSING_FIELD)
    return Case("missing_field", f, expect)


@st.composite
def missing_tensor_part(draw: st.DrawFn) -> Case:
    t = tensor()
    del t[draw(st.sampled_from(["dtype", "shape", "data"]))]
    return Case("missing_field", with_body(pack({"inputs": {"x": t}})), E.MISSING_FIELD)


@st.composite
def extra_fields(draw: st.DrawFn) -> Case:
    f = valid_fields()
    for k, v in draw(st.dictionaries(st.binary(min_size=1, max_size=10), st.binary(max_size=30), max_size=4)).items():
        f.setdefault(b"x-" + k, v)  # never overwrite a protocol field
    if draw(st.booleans()):
        # An input the model does not have next to the one it does: refused, not ignored.
        body = pack({"inputs": {"x": tensor(), draw(st.text(min_size=1, max_size=8).filter(lambda s: s != "x")):
                                tensor()}})
        f[b"body"] = body
        return Case("extra_input", f, E.BAD_VALUE, by_check=True)
    return Case("extra_fields", f, OK)


@st.composite
def bad_envelope_values(draw: st.DrawFn) -> Case:
    f = valid_fields()
    where = draw(st.sampled_from([b"id", b"reply_to", b"deadline_ms", b"ts_ms", b"v"]))
    if where == b"id":
        f[b"id"] = draw(st.sampled_from([b"", b"a b", b"x" * 129, b"semi;colon", b"new\nline", b"\x00"]))
        expect = E.DECODE_ERROR
    elif where == b"reply_to":
        f[b"reply_to"] = draw(st.sampled_from([b"", b"bad\nkey", b"\x7f", b"k" * 513]))
        expect = E.DECODE_ERROR
    elif where == b"v":
        f[b"v"] = draw(st.sampled_from([b"2", b"0", b"1.0", b" 1", b"v1"]))
        expect = E.UNSUPPORTED_VERSION
    else:
        f[where] = draw(st.sampled_from([b"soon", b"1.5", b"1e3", b"", b"--1", b"0x10", b"1_000", b"-5", b" 7",
                                         "\u0661\u0660\u0660".encode(), b"9" * 19, b"9" * 400]))
        expect = OK if f[where] == b"" else E.DECODE_ERROR  # empty means "not given"
    return Case("bad_envelope", f, expect)


@st.composite
def multi_sample(draw: st.DrawFn) -> Case:
    """A multi-sample entry: finite samples, some with a NaN (refused in their slot alone),
    and now and then a fault of the whole entry (count, leading dim, too many samples) or
    texts sent to the tensor model (each slot refused)."""
    n = draw(st.integers(1, 6))
    xs = np.stack([draw(finite_x) for _ in range(n)])
    for i in draw(st.lists(st.integers(0, n - 1), max_size=2)):
        xs[i, draw(st.integers(0, 3))] = np.nan
    fault = draw(st.sampled_from(["none", "none", "none", "count", "lead", "texts", "too_many"]))
    if fault == "too_many":
        xs = np.zeros((1025, 4), np.float32)
    env = P.Envelope(request_id=unique_id(), reply_to=REPLY, ts_ms=P.now_ms())
    fields = MultiRequest(env, inputs={"x": xs}).encode()
    if fault == "count":
        fields[b"n"] = str(n + 1).encode()
    elif fault == "lead":
        fields[b"n"] = str(n + 1).encode()
        fields[b"body"] = pack({"samples": n + 1, "inputs": {"x": P.encode_tensor(xs)}})
    elif fault == "texts":
        fields[b"body"] = pack({"texts": ["not a tensor"] * n})
    expect = {"count": E.BAD_VALUE, "lead": E.BAD_SHAPE, "too_many": E.TOO_MANY_SAMPLES}.get(fault)
    return Case(f"multi_sample:{fault}", fields, expect)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# Every family, for the mixed fuzz; ``valid_case`` is weighted in so batches mix good and bad.
ALL_FAMILIES = (random_bytes_body, random_fields, truncated_msgpack, bitflip_body, structured_garbage,
                deep_nesting, huge_shape, wrong_dtype, other_wire_dtype, wrong_model_shape, non_finite,
                non_utf8, oversize, missing_field, missing_tensor_part, extra_fields, bad_envelope_values)
any_bad_case = st.one_of(*(f() for f in ALL_FAMILIES))
any_case = st.one_of(valid_case(), multi_sample(), any_bad_case)


# --- outcome bookkeeping (for the report) ------------------------------------------------------

OUTCOMES: Counter[tuple[str, str, str]] = Counter()


def record(layer: str, family: str, outcome: str) -> None:
    OUTCOMES[(layer, family, outcome)] += 1


def dump_outcomes(path: str | os.PathLike[str]) -> None:
    """Merge this process's counts into a JSON file (used by ``benchmarks/fuzz.py``)."""
    p = Path(path)
    old: dict[str, int] = json.loads(p.read_text()) if p.exists() else {}
    for (layer, family, outcome), n in OUTCOMES.items():
        key = f"{layer}|{family}|{outcome}"
        old[key] = old.get(key, 0) + n
    p.write_text(json.dumps(old, indent=1, sort_keys=True))
    OUTCOMES.clear()  # each module dumps at its end; never count a case twice
