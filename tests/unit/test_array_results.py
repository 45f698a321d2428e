"""The SDK's array path without Redis: stacked results decoded lazily (no Result per sample
until one is looked at), blocks cut into entry views, and entry results assembled into one
ArrayResults per block, errors in place."""

from __future__ import annotations

import collections
from typing import Any

import msgpack
import numpy as np
import pytest

from headrace.client import ArrayResults, InferenceFailed, RequestExpired
from headrace.client import errors as E
from headrace.client.arrays import BlockAssembler, Plan, array_entries, block_arrays
from headrace.client.protocol import Result, Timings
from headrace.client.results import SampleResults, decode_result, encode_result, encode_stacked_result

pytestmark = pytest.mark.timeout(30)


def stacked_result(rid: str, y: np.ndarray[Any, Any]) -> Result:
    return decode_result(encode_stacked_result(rid, {"y": y}, Timings(batch_size=len(y)), model="m", version="1"))


def test_a_stacked_result_decodes_to_lazy_samples_equal_to_the_eager_ones() -> None:
    y = np.arange(12, dtype=np.float32).reshape(4, 3)
    res = stacked_result("r1", y)
    assert isinstance(res.samples, SampleResults) and len(res.samples) == 4
    np.testing.assert_array_equal(res.samples.stacked["y"], y)
    assert res.samples.ok_mask().tolist() == [True] * 4
    for i, s in enumerate(res.samples):
        assert (s.request_id, s.status, s.model, s.version) == ("r1", "ok", "m", "1")
        np.testing.assert_array_equal(s.outputs["y"], y[i])
    np.testing.assert_array_equal(res.samples[-1].outputs["y"], y[3])
    assert [s.outputs["y"][0] for s in res.samples[1:3]] == [3.0, 6.0]
    with pytest.raises(IndexError):
        res.samples[4]
    with pytest.raises(IndexError):
        res.samples[-5]


def test_lazy_samples_keep_errors_in_their_slots() -> None:
    ok = Result("r", "ok", {"y": np.ones(2, np.float32)})
    bad = Result("r", "error", code=E.BAD_VALUE, message="sample 1: NaN")
    back = decode_result(encode_result(Result("r", "ok", samples=(ok, bad, ok))))
    assert isinstance(back.samples, SampleResults)
    assert back.samples.ok_mask().tolist() == [True, False, True]
    assert (back.samples[1].code, back.samples[1].message, dict(back.samples[1].outputs)) == (E.BAD_VALUE,
                                                                                               "sample 1: NaN", {})
    assert back.samples[1] == bad  # compares like the Result it stands for
    np.testing.assert_array_equal(back.samples.stacked["y"][1], np.zeros(2, np.float32))  # a zero row


def test_a_malformed_slot_is_refused_at_decode_never_on_access() -> None:
    fields = encode_stacked_result("r", {"y": np.ones((3, 2), np.float32)}, Timings())
    body = msgpack.unpackb(fields[b"body"])
    body["samples"][2] = {"status": "maybe"}
    fields[b"body"] = msgpack.packb(body)
    with pytest.raises(E.DecodeError, match="status"):
        decode_result(fields)
    body["samples"][2] = "ok"
    fields[b"body"] = msgpack.packb(body)
    with pytest.raises(E.DecodeError):
        decode_result(fields)


def test_slots_with_outputs_of_their_own_decode_eagerly() -> None:
    mixed = (Result("m", "ok", {"y": np.ones(3)}), Result("m", "ok", {"y": np.ones(5)}))
    back = decode_result(encode_result(Result("m", "ok", samples=mixed)))
    assert isinstance(back.samples, tuple) and [s.outputs["y"].shape for s in back.samples] == [(3,), (5,)]


def test_block_arrays_checks_the_sample_axis() -> None:
    arrays, n = block_arrays({"x": np.ones((5, 2), np.float32)[:, ::-1], "z": [[1], [2], [3], [4], [5]]})
    assert n == 5 and all(a.flags.c_contiguous for a in arrays.values())
    for bad, code in [([1, 2], E.BAD_VALUE), ({}, E.BAD_VALUE), ({"x": np.float32(1)}, E.BAD_SHAPE),
                      ({"x": np.ones((3, 2)), "z": np.ones(4)}, E.BAD_SHAPE), ({"x": np.ones((0, 2))}, E.BAD_SHAPE)]:
        with pytest.raises(E.ProtocolError) as info:
            block_arrays(bad)
        assert info.value.code == code, bad


def test_array_entries_are_views_in_order_with_their_places() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    plan: Plan = collections.deque()
    chunks = list(array_entries([{"x": x}, {"x": x[:3]}], 4, plan))
    assert [c.size for c in chunks] == [4, 4, 2, 3]
    assert [off for _, off in plan] == [0, 4, 8, 0]
    assert plan[0][0] is plan[2][0] and plan[3][0] is not plan[0][0]
    assert chunks[1].inputs is not None and np.shares_memory(chunks[1].inputs["x"], x)
    np.testing.assert_array_equal(chunks[2].inputs["x"] if chunks[2].inputs else None, x[8:])


def test_the_assembler_fills_rows_in_any_order_with_failures_in_place() -> None:
    y = np.arange(20, dtype=np.float32).reshape(10, 2)
    asm = BlockAssembler(10)
    asm.add(4, 4, stacked_result("b", y[4:8]))
    assert not asm.complete
    asm.add(8, 2, Result("c", "expired", message="deadline passed"))  # refused as a whole
    ok, bad = Result("a", "ok", {"y": y[0]}), Result("a", "error", code=E.BAD_VALUE, message="NaN")
    asm.add(0, 4, decode_result(encode_result(Result("a", "ok", samples=(ok, bad, ok, ok)))))
    assert asm.complete
    out = asm.finish()
    assert len(out) == 10 and out.ok.tolist() == [True, False, True, True] + [True] * 4 + [False, False]
    assert sorted(out.failures) == [1, 8, 9] and out.failures[8].status == "expired"
    np.testing.assert_array_equal(out.outputs["y"][4:8], y[4:8])
    np.testing.assert_array_equal(out.outputs["y"][1], [0, 0])
    with pytest.raises(InferenceFailed, match="sample 1 of 10") as info:
        out.raise_for_status()
    assert info.value.code == E.BAD_VALUE
    assert info.value.request_id == "a" and info.value.result is out.failures[1]


def test_an_expired_first_failure_raises_request_expired() -> None:
    out = ArrayResults(outputs={}, ok=np.array([True, False]), failures={1: Result("r", "expired")})
    with pytest.raises(RequestExpired, match="sample 1 of 2"):
        out.raise_for_status()
    assert ArrayResults(outputs={}, ok=np.ones(2, bool), failures={}).raise_for_status().all_ok


def test_the_assembler_takes_per_slot_outputs_and_refuses_changing_rows_or_counts() -> None:
    asm = BlockAssembler(4)
    slots = (Result("a", "ok", {"y": np.ones(3, np.float32)}), Result("a", "ok", {"y": np.full(3, 2, np.float32)}))
    asm.add(0, 2, Result("a", "ok", samples=slots))
    np.testing.assert_array_equal(asm.finish().outputs["y"][:2], [[1, 1, 1], [2, 2, 2]])
    with pytest.raises(E.ProtocolError, match="use map") as info:
        asm.add(2, 2, stacked_result("b", np.ones((2, 5), np.float32)))
    assert info.value.code == E.BAD_SHAPE
    with pytest.raises(E.DecodeError, match="holds 3 samples for an entry of 2"):
        BlockAssembler(2).add(0, 2, stacked_result("c", np.ones((3, 1), np.float32)))
    one = BlockAssembler(1)
    one.add(0, 1, Result("d", "ok", {"y": np.ones(2, np.float32)}))  # a single-sample answer
    assert one.finish().ok.tolist() == [True]
