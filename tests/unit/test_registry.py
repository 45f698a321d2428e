"""The one reader of the model registry (``<ns>:models``): liveness, versions, signatures,
and tolerance of values it cannot read."""

from __future__ import annotations

import json

from headrace.client.registry import ModelRecord, decode_record, decode_registry, server_ms


def _raw(now: int) -> str:
    return json.dumps({
        "model": "m", "updated_ms": now,
        "workers": {"a": {"seen_ms": now - 1000, "version": "2", "max_batch": 16, "backend": "onnx"},
                    "b": {"seen_ms": now - 120_000, "version": "1"},
                    "c": {"seen_ms": now - 10, "version": "1", "max_wait_ms": 2.5}},
        "signatures": {"2": {"seen_ms": now, "describe": json.dumps({"inputs": [], "accepts_text": True})},
                       "1": {"seen_ms": now - 5, "describe": "not json"}},
    })


def test_live_workers_versions_and_signatures() -> None:
    now = 1_764_000_000_000
    rec = decode_record("m", _raw(now).encode())
    assert isinstance(rec, ModelRecord)
    assert [w.consumer for w in rec.live_workers(now)] == ["a", "c"]
    assert rec.versions(now) == ("2", "1")
    assert rec.workers["a"].max_batch == 16 and rec.workers["c"].max_wait_ms == 2.5
    # the unreadable description of v1 is dropped, the empty list of v2 stays a list
    assert rec.signature() == {"inputs": [], "accepts_text": True}
    assert rec.signature("1") is None


def test_absent_or_unreadable_values() -> None:
    assert decode_record("m", None) is None
    assert decode_record("m", b"not json") is None
    assert decode_record("m", b"[1, 2]") is None
    rec = decode_record("m", json.dumps({"workers": {"x": 5, "y": {"seen_ms": "soon"}}, "signatures": []}))
    assert rec is not None and rec.signatures == {} and rec.workers["y"].seen_ms == 0 and "x" not in rec.workers
    assert set(decode_registry({b"m": _raw(0), b"bad": b"{"})) == {"m"}


def test_server_ms() -> None:
    assert server_ms((1_700_000_000, 123_456)) == 1_700_000_000_123
