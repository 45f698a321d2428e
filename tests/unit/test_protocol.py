"""Wire protocol v1 codec: round trips and every decode error code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from headrace.client import errors as E
from headrace.client import protocol as P

ROOT = Path(__file__).resolve().parents[2]


def _env(**kw: Any) -> P.Envelope:
    base: dict[str, Any] = {"request_id": "req-1", "reply_to": "headrace:{m}:reply:c1"}
    base.update(kw)
    return P.Envelope(**base)


def _fields(**overrides: Any) -> dict[bytes, bytes]:
    fields = P.encode_request(P.Request(envelope=_env(), inputs={"x": np.arange(4, dtype=np.float32)}))
    for k, v in overrides.items():
        key = k.encode()
        if v is None:
            fields.pop(key, None)
        else:
            fields[key] = v if isinstance(v, bytes) else str(v).encode()
    return fields


def _body(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _code(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(E.ProtocolError) as info:
        fn(*args, **kw)
    return info.value.code


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(P.DTYPES))
def test_tensor_round_trip_every_wire_dtype(dtype: str) -> None:
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    wire = P.encode_tensor(arr)
    assert wire["dtype"] == dtype and wire["shape"] == [2, 3, 4]
    assert len(wire["data"]) == arr.nbytes
    back = P.decode_tensor(wire)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_tensor_is_little_endian_and_c_order_on_the_wire() -> None:
    big = np.array([[1, 2], [3, 4]], dtype=">i4").T  # big-endian and Fortran-ordered view
    wire = P.encode_tensor(big)
    assert wire["data"] == np.ascontiguousarray(big, dtype="<i4").tobytes()
    assert wire["data"][:4] == (1).to_bytes(4, "little")
    np.testing.assert_array_equal(P.decode_tensor(wire), big)


def test_scalar_and_empty_tensors_round_trip() -> None:
    for arr in (np.float32(3.5), np.zeros((0, 4), np.int64)):
        back = P.decode_tensor(P.encode_tensor(np.asarray(arr)))
        assert back.shape == np.asarray(arr).shape
        np.testing.assert_array_equal(back, arr)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.float16]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_tensor_round_trip_property(arr: np.ndarray[Any, Any]) -> None:
    back = P.decode_tensor(P.encode_tensor(arr))
    assert back.shape == arr.shape and back.dtype == arr.dtype
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes()  # bit-exact, NaNs included


def test_request_with_inputs_round_trip() -> None:
    env = _env(deadline_ms=123_456, ts_ms=100, model="m")
    req = P.Request(envelope=env, inputs={"a": np.ones((2, 2), np.float32), "b": np.array([7], np.int64)})
    fields = req.encode()
    assert fields[b"v"] == b"1" and fields[b"id"] == b"req-1" and fields[b"model"] == b"m"
    back = P.decode_request(fields)
    assert back.envelope == env
    assert back.text is None and set(back.inputs) == {"a", "b"}
    np.testing.assert_array_equal(back.inputs["a"], req.inputs["a"])
    np.testing.assert_array_equal(back.inputs["b"], [7])


def test_request_with_text_round_trip_and_unicode() -> None:
    req = P.Request(envelope=_env(), text="naïve café ☕ — 東京")
    back = P.decode_request(req.encode())
    assert back.text == req.text and not back.inputs
    assert back.envelope.deadline_ms == 0 and back.envelope.model is None


def test_encode_request_sets_ts_ms_when_absent() -> None:
    before = P.now_ms()
    fields = P.encode_request(P.Request(envelope=_env(), text="x"))
    assert before <= int(fields[b"ts_ms"]) <= P.now_ms()


def test_envelope_expiry() -> None:
    assert not _env().expired()
    assert _env(deadline_ms=1000).expired(at_ms=1001)
    assert not _env(deadline_ms=1000).expired(at_ms=1000)


def test_request_needs_exactly_one_of_inputs_and_text() -> None:
    assert _code(P.encode_request, P.Request(envelope=_env())) == E.MISSING_FIELD
    both = P.Request(envelope=_env(), inputs={"x": np.ones(1)}, text="t")
    assert _code(P.encode_request, both) == E.MISSING_FIELD


def test_result_round_trip_ok_and_error() -> None:
    ok = P.Result(request_id="r1", status=P.STATUS_OK, outputs={"y": np.arange(3, dtype=np.float32)},
                  timings=P.Timings(queue_ms=1.5, infer_ms=2.5, batch_size=8, worker="w1"), model="m", version="3")
    back = P.decode_result(ok.encode())
    assert back.ok and back.request_id == "r1" and back.model == "m" and back.version == "3"
    assert back.timings == ok.timings
    np.testing.assert_array_equal(back.outputs["y"], [0, 1, 2])
    assert back.raise_for_status() is back

    err = P.error_result("r2", E.BAD_SHAPE, "x must be (4,)")
    back = P.decode_result(err.encode())
    assert back.status == P.STATUS_ERROR and back.code == E.BAD_SHAPE and not back.outputs
    with pytest.raises(E.InferenceFailed) as info:
        back.raise_for_status()
    assert info.value.code == E.BAD_SHAPE
    assert info.value.request_id == "r2" and info.value.result is back  # what an application logs
    late = P.decode_result(P.error_result("r3", E.DEADLINE_EXCEEDED, "late", status="expired").encode())
    with pytest.raises(E.RequestExpired) as expired:
        late.raise_for_status()
    assert expired.value.request_id == "r3" and expired.value.result is late


def test_expired_and_rejected_results_raise_their_errors() -> None:
    exp = P.decode_result(P.error_result("r", E.DEADLINE_EXCEEDED, "late", status=P.STATUS_EXPIRED).encode())
    with pytest.raises(E.RequestExpired) as info:
        exp.raise_for_status()
    assert info.value.code == E.DEADLINE_EXCEEDED
    rej = P.decode_result(P.error_result("r", E.UNKNOWN_MODEL, "no", status=P.STATUS_REJECTED).encode())
    with pytest.raises(E.InferenceFailed) as info2:
        rej.raise_for_status()
    assert info2.value.code == E.UNKNOWN_MODEL


def test_error_result_message_is_bounded() -> None:
    assert len(P.error_result("r", E.MODEL_ERROR, "x" * 5000).message) == 1000


def test_timings_from_garbage_defaults() -> None:
    assert P.Timings.from_wire("nope") == P.Timings()
    assert P.Timings.from_wire({"queue_ms": 2}).queue_ms == 2.0


# --- decode errors, one test per code -----------------------------------------------------


def test_unsupported_version() -> None:
    assert _code(P.decode_request, _fields(v="2")) == E.UNSUPPORTED_VERSION
    assert _code(P.decode_request, _fields(v="")) == E.UNSUPPORTED_VERSION
    res = P.error_result("r", E.MODEL_ERROR, "m").encode()
    res[b"v"] = b"9"
    assert _code(P.decode_result, res) == E.UNSUPPORTED_VERSION


@pytest.mark.parametrize("field", ["v", "id", "reply_to", "body"])
def test_missing_entry_fields(field: str) -> None:
    # `v` is required like the others (issue #10: a missing `v` said unsupported_version).
    assert _code(P.decode_request, _fields(**{field: None})) == E.MISSING_FIELD


@pytest.mark.parametrize("missing", ["dtype", "shape", "data"])
def test_missing_tensor_fields(missing: str) -> None:
    t = P.encode_tensor(np.ones(4, np.float32))
    del t[missing]
    assert _code(P.decode_request, _fields(body=_body({"inputs": {"x": t}}))) == E.MISSING_FIELD


def test_missing_inputs_and_text() -> None:
    assert _code(P.decode_request, _fields(body=_body({"other": 1}))) == E.MISSING_FIELD


@pytest.mark.parametrize("fields", [
    {"body": b"\xc1"},                                 # never-used msgpack byte
    {"body": _body([1, 2])},                           # not a map
    {"body": _body({"text": "t", "inputs": {}})},      # both
    {"body": _body({"inputs": {}})},                   # empty inputs
    {"body": _body({"inputs": {"x": [1, 2]}})},        # tensor not a map
    {"body": _body({"inputs": {"x": {"dtype": "float32", "shape": [1], "data": "abcd"}}})},  # data not bin
    {"id": "has space"},
    {"id": "x" * 129},
    {"id": b"\xff\xfe"},                               # not UTF-8
    {"reply_to": "bad\nkey"},
    {"reply_to": "headrace:{m}:reply:c\n"},          # a trailing newline passed a `$` regex
    {"id": "r-1\n"},
    {"deadline_ms": "soon"},
    {"ts_ms": "1.5"},
    {"deadline_ms": "1_000"},                          # int() takes these; the wire does not
    {"deadline_ms": "\u0661\u0660\u0660\u0660"},         # Arabic-Indic 1000
    {"deadline_ms": " 7"},
    {"deadline_ms": "-5"},
    {"ts_ms": "9" * 400},                              # overflowed the worker's float()
    {"ts_ms": "9" * 19},
])
def test_decode_error(fields: dict[str, Any]) -> None:
    assert _code(P.decode_request, _fields(**fields)) == E.DECODE_ERROR


def test_bad_dtype() -> None:
    t = {"dtype": "complex64", "shape": [1], "data": b"\0" * 8}
    assert _code(P.decode_request, _fields(body=_body({"inputs": {"x": t}}))) == E.BAD_DTYPE
    assert _code(P.encode_tensor, np.ones(2, np.complex64)) == E.BAD_DTYPE
    # an object array is a string tensor only when every element is a str
    assert _code(P.encode_tensor, np.array([{"a": 1}], dtype=object)) == E.BAD_DTYPE
    assert _code(P.encode_tensor, np.array(["a", None], dtype=object)) == E.BAD_DTYPE


@pytest.mark.parametrize("shape,data", [
    ([4], b"\0" * 12),                 # byte length does not match
    ([-1], b""),                       # negative
    ([1] * (P.MAX_DIMS + 1), b"\0" * 4),  # too many dims
    ("4", b"\0" * 16),                 # not a list
    ([True], b"\0" * 4),               # bool is not a dimension
    ([0, 1 << 63], b""),               # empty, but no array has that dimension (was model_error)
    ([0, 1 << 24, 1 << 24], b""),
])
def test_bad_shape(shape: Any, data: bytes) -> None:
    t = {"dtype": "float32", "shape": shape, "data": data}
    assert _code(P.decode_request, _fields(body=_body({"inputs": {"x": t}}))) == E.BAD_SHAPE


def test_text_of_another_type_is_bad_value() -> None:
    for text in (b"bytes", 5, None, ["t"]):
        assert _code(P.decode_request, _fields(body=_body({"text": text}))) == E.BAD_VALUE


def test_ms_fields_take_ascii_digits_up_to_18() -> None:
    env = P.decode_envelope(_fields(deadline_ms="0", ts_ms="9" * 18))
    assert (env.deadline_ms, env.ts_ms) == (0, 10**18 - 1)
    assert P.decode_envelope(_fields(deadline_ms=None, ts_ms=None)).deadline_ms == 0
    assert P.decode_envelope(_fields(deadline_ms="", ts_ms="")).ts_ms == 0  # empty = not given


def test_payload_too_large() -> None:
    # More elements than the limit is "too large" (the doc's word), not a bad shape.
    t = {"dtype": "float32", "shape": [1 << 40], "data": b""}
    assert _code(P.decode_request, _fields(body=_body({"inputs": {"x": t}}))) == E.PAYLOAD_TOO_LARGE
    small = P.Limits(max_payload_bytes=64, max_text_chars=10, max_inputs=2)
    assert _code(P.decode_request, _fields(body=_body({"text": "y" * 100})), small) == E.PAYLOAD_TOO_LARGE
    assert _code(P.decode_request, _fields(body=_body({"text": "y" * 11})), small) == E.PAYLOAD_TOO_LARGE
    three = {k: P.encode_tensor(np.ones(1, np.uint8)) for k in "abc"}
    assert _code(P.decode_request, _fields(body=_body({"inputs": three})), P.Limits(max_inputs=2)) \
        == E.PAYLOAD_TOO_LARGE


def test_result_decode_errors() -> None:
    res = P.error_result("r", E.MODEL_ERROR, "m").encode()
    assert _code(P.decode_result, {**res, b"status": b"weird"}) == E.DECODE_ERROR
    assert _code(P.decode_result, {**res, b"body": _body([1])}) == E.DECODE_ERROR
    no_id = dict(res)
    del no_id[b"id"]
    assert _code(P.decode_result, no_id) == E.MISSING_FIELD


def test_every_wire_code_is_documented_in_protocol_md() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, flags=re.M))
    assert E.ALL_CODES <= documented, sorted(E.ALL_CODES - documented)


def test_error_codes_are_stable_strings() -> None:
    assert all(re.fullmatch(r"[a-z_]+", c) for c in E.ALL_CODES)
    assert str(E.QueueFull("full")) == "[queue_full] full"
    assert E.InferenceFailed("x", code=E.BAD_VALUE).code == E.BAD_VALUE


def test_dtype_name_matches_numpy_for_every_byte_order_and_falls_back() -> None:
    from headrace.client.wire import DTYPES, dtype_name

    for base in DTYPES.values():
        for dt in (base, base.newbyteorder(">"), base.newbyteorder("="), base.newbyteorder("<")):
            assert dtype_name(dt) == dt.name
    for other in (np.dtype("complex64"), np.dtype("datetime64[s]"), np.dtype([("a", "<f4")]), np.dtype("S3")):
        assert dtype_name(other) == other.name
    # numpy str and object arrays are string tensors (their elements are checked on encode)
    assert dtype_name(np.dtype("U3")) == dtype_name(np.dtype(object)) == "string"
    with pytest.raises(E.InvalidTensorError):
        P.encode_tensor(np.ones(2, np.complex64))
    back = P.decode_tensor(P.encode_tensor(np.arange(3, dtype=">i4")))
    assert back.dtype == np.dtype("int32") and back.tolist() == [0, 1, 2]
