"""Property-based fuzzing of the wire decoder (``client/protocol.py``).

Whatever bytes arrive, decoding either yields a request or raises a
:class:`~headrace.client.errors.ProtocolError` with one of the specific input codes; where the
kind of damage pins the code down (truncated msgpack, huge shapes, wrong dtypes, oversize,
missing fields, non-UTF-8...), it is exactly that code. The same holds for the SDK's
result decoder, which reads whatever lands in a reply stream.

Example counts scale with ``HEADRACE_FUZZ_SCALE``; ``benchmarks/fuzz.py`` runs the long mode
and prints how many cases of each family were tried and how each was answered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.samples import declared_count, decode_samples, is_multi
from headrace.workers.backends.fake import AffineServable
from headrace.workers.backends.validate import check_finite
from tests.support.fuzz_cases import (
    INPUT_CODES,
    OK,
    Case,
    any_case,
    dump_outcomes,
    examples,
    msgpack_values,
    oversize,
    pack,
    record,
)


def fuzz(n: int) -> settings:
    """``n`` examples (times HEADRACE_FUZZ_SCALE); derandomized in CI so a red run can be
    reproduced, random with ``HEADRACE_FUZZ_RANDOM=1`` (the long fuzz run)."""
    return settings(max_examples=examples(n), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    derandomize=os.environ.get("HEADRACE_FUZZ_RANDOM", "") == "")
AFFINE = AffineServable()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    out = os.environ.get("HEADRACE_FUZZ_REPORT")
    if out:
        dump_outcomes(out)


def decode_outcome(case: Case) -> str:
    """``ok`` or the code the decoder raised. Anything but a ProtocolError fails the test."""
    try:
        # The worker's order: envelope, body, the sample count, then one or N samples.
        env = P.decode_envelope(case.fields)
        body = P.unpack_body(case.fields.get(b"body"))
        declared = declared_count(case.fields)
        if is_multi(body):
            slots = decode_samples(env, body, declared, 1024)
            assert all(s.request is not None or (s.code in INPUT_CODES and s.message) for s in slots)
            return OK
        if declared not in (None, 1):
            raise E.ProtocolError("n says several samples, the body carries one", code=E.BAD_VALUE)
        req = P.decode_body_map(env, body)
    except E.ProtocolError as err:
        assert err.code in INPUT_CODES, f"{case.family}: unspecific code {err.code}: {err}"
        assert err.message, "an error result must say what was wrong"
        return err.code
    assert isinstance(req, P.Request)
    assert (req.text is None) != (not req.inputs), "exactly one of text / inputs"
    for arr in req.inputs.values():
        assert arr.size <= P.DEFAULT_LIMITS.max_elements
    return OK


def check_outcome(case: Case) -> str:
    """What the model's input check says about a request the decoder accepted."""
    req = P.decode_request(case.fields)
    try:
        check_finite(req)
        AFFINE.check(req)
    except E.ProtocolError as err:
        assert err.code in INPUT_CODES, f"{case.family}: unspecific code {err.code}: {err}"
        return err.code
    return OK


@fuzz(500)
@given(any_case)
def test_decoder_answers_every_input_with_a_request_or_a_specific_code(case: Case) -> None:
    outcome = decode_outcome(case)
    record("decoder", case.family, outcome)
    if case.expect is None:
        return
    if case.by_check:
        assert outcome == OK, f"{case.family}: the decoder should accept it, got {outcome}"
        assert check_outcome(case) == case.expect, case.family
    else:
        assert outcome == case.expect, f"{case.family}: expected {case.expect}, got {outcome}"


@fuzz(25)
@given(oversize())
def test_oversize_entries_are_refused_as_too_large(case: Case) -> None:
    # Separate from the mixed run so every oversize flavour (body, text, inputs, msgpack map
    # cap) is drawn in CI, not only when the mixed strategy happens to pick it.
    outcome = decode_outcome(case)
    record("decoder", case.family, outcome)
    assert outcome == E.PAYLOAD_TOO_LARGE


@fuzz(100)
@given(st.binary(max_size=2000), st.integers(16, 1 << 20))
def test_size_limits_hold_for_any_limit(body: bytes, max_payload: int) -> None:
    limits = P.Limits(max_payload_bytes=max_payload, max_elements=max_payload)
    env = P.Envelope("r", "k")
    try:
        req = P.decode_body(env, body, limits)
    except E.ProtocolError as err:
        record("decoder", "random_body_any_limit", err.code)
        assert err.code in INPUT_CODES
        if len(body) > max_payload:
            assert err.code == E.PAYLOAD_TOO_LARGE
        return
    record("decoder", "random_body_any_limit", OK)
    assert len(body) <= max_payload
    assert all(a.size <= limits.max_elements for a in req.inputs.values())


# --- the SDK side: whatever lands in a reply stream ---------------------------------------------


@st.composite
def result_fields(draw: st.DrawFn) -> dict[bytes, bytes]:
    ok = P.Result("r1", P.STATUS_OK, {"y": np.arange(4, dtype=np.float32)}, model="m", version="1",
                  timings=P.Timings(1.0, 2.0, 3, "w"))
    fields = dict(ok.encode())
    where = draw(st.sampled_from(["body", "outputs", "timings", "tensor", "field", "bytes"]))
    value: Any = draw(msgpack_values)
    if where == "body":
        fields[b"body"] = pack(value)
    elif where == "outputs":
        fields[b"body"] = pack({"outputs": value, "timings": {}, "model": "m", "version": "1"})
    elif where == "timings":
        fields[b"body"] = pack({"outputs": {}, "timings": value if draw(st.booleans()) else {"queue_ms": value,
                                "batch_size": value}, "model": value, "version": value})
    elif where == "tensor":
        fields[b"body"] = pack({"outputs": {"y": value}})
    elif where == "field":
        fields[draw(st.sampled_from([b"v", b"id", b"status", b"code", b"message"]))] = draw(st.binary(max_size=20))
    else:
        fields[b"body"] = draw(st.binary(max_size=200))
    return fields


@fuzz(150)
@given(result_fields())
def test_result_decoder_raises_only_protocol_errors(fields: dict[bytes, bytes]) -> None:
    # The SDK's reply reader resolves tickets on ProtocolError and would stall on anything
    # else (the entry is re-read forever), so this is what keeps one bad result from
    # blocking every later result of the client.
    try:
        res = P.decode_result(fields)
    except E.ProtocolError as err:
        record("result", "garbage", err.code)
        return
    record("result", "garbage", OK)
    assert res.status in P.STATUSES
    assert isinstance(res.timings, P.Timings)
    assert all(isinstance(v, np.ndarray) for v in res.outputs.values())


def test_result_decoder_on_wrongly_typed_outputs_and_timings() -> None:
    # Minimal examples the property above found; kept as plain regression tests.
    base = dict(P.Result("r1", P.STATUS_OK).encode())
    for body in ({"outputs": [1, 2]}, {"outputs": "x"}, {"timings": {"batch_size": None}},
                 {"timings": {"queue_ms": "fast"}}, {"timings": {"queue_ms": [1]}}):
        with pytest.raises(E.ProtocolError) as info:
            P.decode_result({**base, b"body": msgpack.packb(body, use_bin_type=True)})
        assert info.value.code == E.DECODE_ERROR


def test_many_inputs_beyond_the_msgpack_map_cap_are_too_large_not_undecodable() -> None:
    # The msgpack map-length cap (max_inputs * 4 + 16) refuses huge maps before building
    # them; the producer should still hear "too large", like 33..144 inputs do.
    t = {"dtype": "float32", "shape": [4], "data": b"\0" * 16}
    for n in (P.DEFAULT_LIMITS.max_inputs + 1, 1000):
        body = pack({"inputs": {f"i{i}": t for i in range(n)}})
        with pytest.raises(E.PayloadTooLargeError):
            P.decode_body(P.Envelope("r", "k"), body)


def test_a_garbage_reply_entry_does_not_block_later_results_of_the_client() -> None:
    # Before the decoder fix, outputs=[...] raised AttributeError inside TicketBook.deliver;
    # the SDK reader then retried the same XREAD batch forever (its cursor never moved).
    from headrace.client.keys import ModelKeys
    from headrace.client.submit import prepare_request
    from headrace.client.tickets import Ticket, TicketBook

    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    book = TicketBook()
    tickets = [Ticket(prepare_request(keys, reply, {"x": np.zeros(4, np.float32)}, None, request_id=f"t{i}",
                                      deadline_s=0)) for i in range(2)]
    for t in tickets:
        book.add(t)
    good = P.Result("t1", P.STATUS_OK, {"y": np.ones(4, np.float32)}).encode()
    bad = {**P.Result("t0", P.STATUS_OK).encode(), b"body": pack({"outputs": [1, 2]})}
    deleted = book.deliver(reply, [(b"1-1", bad), (b"1-2", good)])
    assert deleted == ["1-1", "1-2"] and book.cursors()[reply] == "1-2"
    assert tickets[0].result(0).code == E.DECODE_ERROR  # the bad one resolves as an error
    np.testing.assert_array_equal(tickets[1].result(0).outputs["y"], np.ones(4))


@pytest.mark.parametrize("where", ["shape", "dtype"])
def test_nesting_just_below_the_msgpack_stack_limit_is_a_specific_error(where: str) -> None:
    # msgpack accepts ~1023 levels, Python's repr() only ~1000: an error message that
    # repr()'d the attacker's value raised RecursionError (answered internal_error).
    tensor = {"dtype": "float32", "data": b"\0" * 16, "shape": [4]}
    del tensor[where]
    t = pack({"inputs": {"x": {**tensor, where: None}}})  # the nested value goes last
    assert t.endswith(b"\xc0")
    for depth in (999, 1000, 1010, 1022):
        body = t[:-1] + b"\x91" * depth + b"\xc0"
        with pytest.raises(E.ProtocolError) as info:
            P.decode_body(P.Envelope("r", "k"), body)
        assert info.value.code in ({E.BAD_SHAPE, E.DECODE_ERROR} if where == "shape" else {E.BAD_DTYPE, E.DECODE_ERROR})
        assert len(info.value.message) < 2000
