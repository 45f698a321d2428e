"""Small worker pieces: input validation helper, fake servables, metrics exporters, the
``python -m headrace.workers`` argument handling, dead-letter parsing, memory broker trim."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.admin.dlq import DeadLetter
from headrace.workers.backends.base import TensorSpec
from headrace.workers.backends.fake import AffineServable, LengthServable, fake_from_env, make_fake
from headrace.workers.backends.validate import check_finite, check_tensors, check_text
from headrace.workers.cli import parse_args
from headrace.workers.metrics import NullMetrics, PrometheusMetrics, WorkerMetrics
from headrace.workers.pipeline.ops import Ack, DeadLetterOp, Reply
from headrace.workers.pipeline.stats import BatchStats
from headrace.workers.testing.clock import ManualClock
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from headrace.workers.testing.metrics import InMemoryMetrics

SPECS = (TensorSpec("x", "float32", (-1, 3)), TensorSpec("mask", "int64", (-1,)))


def _req(**inputs: np.ndarray) -> Request:
    return Request(Envelope("r1", "reply"), inputs=inputs)


def test_check_tensors_accepts_dynamic_axes_and_names_each_problem() -> None:
    check_tensors(_req(x=np.zeros((5, 3), np.float32), mask=np.ones(5, np.int64)), SPECS)
    cases = [
        (_req(x=np.zeros((5, 3), np.float32)), E.MISSING_FIELD, "mask"),
        (_req(x=np.zeros((5, 3), np.float64), mask=np.ones(5, np.int64)), E.BAD_DTYPE, "float64"),
        (_req(x=np.zeros((5, 4), np.float32), mask=np.ones(5, np.int64)), E.BAD_SHAPE, r"expected \[-1, 3\]"),
        (_req(x=np.full((1, 3), np.nan, np.float32), mask=np.ones(1, np.int64)), E.BAD_VALUE, "NaN"),
        (_req(x=np.zeros((1, 3), np.float32), mask=np.ones(1, np.int64), extra=np.ones(1, np.int64)),
         E.BAD_VALUE, "extra"),
        (Request(Envelope("r1", "reply"), text="hi"), E.BAD_VALUE, "not text"),
    ]
    for req, code, words in cases:
        with pytest.raises(E.ProtocolError, match=words) as info:
            check_tensors(req, SPECS)
        assert info.value.code == code
    check_tensors(_req(x=np.full((1, 3), np.inf, np.float32), mask=np.ones(1, np.int64)), SPECS,
                  reject_non_finite=False)
    check_finite(_req(i=np.array([1, 2], np.int64)))  # ints cannot be non-finite


def test_check_text() -> None:
    check_text(Request(Envelope("r", "q"), text="abc"), max_chars=3)
    with pytest.raises(E.PayloadTooLargeError):
        check_text(Request(Envelope("r", "q"), text="abcd"), max_chars=3)
    with pytest.raises(E.ProtocolError, match="not tensors") as info:
        check_text(_req(x=np.zeros(4, np.float32)))
    assert info.value.code == E.BAD_VALUE


def test_fakes_compute_check_and_simulate_trouble(tmp_path) -> None:  # type: ignore[no-untyped-def]
    record = tmp_path / "runs"
    aff = AffineServable(poison=7.0, record_path=str(record))
    out = aff.infer([_req(x=np.arange(4, dtype=np.float32))])
    np.testing.assert_array_equal(out[0]["y"], np.arange(4, dtype=np.float32) * 2 + 1)
    with pytest.raises(E.ModelError, match="r1"):
        aff.infer([_req(x=np.full(4, 7.0, np.float32))])
    assert record.read_text().split() == ["r1", "r1"] and aff.invocations["r1"] == 2
    with pytest.raises(E.InvalidTensorError):
        aff.check(_req(x=np.zeros(3, np.float32)))
    ln = LengthServable(poison="BOOM")
    reqs = [Request(Envelope(f"t{i}", "q"), text=t) for i, t in enumerate(["", "héllo"])]
    assert [int(o["length"][0]) for o in ln.infer(reqs)] == [0, 5]
    assert ln.length(reqs[1]) == 5 and ln.accepts_text
    assert make_fake("length", name="len2").name == "len2"
    with pytest.raises(E.ConfigError):
        make_fake("nope")


def test_fake_from_env() -> None:
    sv = fake_from_env("affine", env={"HEADRACE_FAKE_DELAY_MS": "12.5", "HEADRACE_FAKE_POISON": "-1"})
    assert isinstance(sv, AffineServable) and sv.delay_ms == 12.5 and sv.poison == -1.0
    with pytest.raises(E.ConfigError, match="HEADRACE_FAKE_DELAY_MS"):
        fake_from_env("affine", env={"HEADRACE_FAKE_DELAY_MS": "soon"})
    with pytest.raises(E.ConfigError, match="floats"):
        fake_from_env("affine", env={"HEADRACE_FAKE_POISON": "x"})
    assert fake_from_env("length", env={"HEADRACE_FAKE_CRASH": "die"}).crash == "die"  # type: ignore[attr-defined]


def test_metrics_implementations_share_the_interface() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    impls: list[WorkerMetrics] = [NullMetrics(), InMemoryMetrics(), PrometheusMetrics("m", "2", registry=registry)]
    for m in impls:
        assert isinstance(m, WorkerMetrics)
        m.observe_batch(4, 0.002)
        m.observe_request("ok", "", 0.001, 0.010)
        m.observe_request("error", E.BAD_SHAPE, 0.0, 0.0)
        m.set_backlog(7, 3)
    mem = impls[1]
    assert isinstance(mem, InMemoryMetrics)
    assert mem.count("ok") == 1 and mem.count(code=E.BAD_SHAPE) == 1 and (mem.lag, mem.pending) == (7, 3)
    text = generate_latest(registry).decode()
    assert 'headrace_request_success_total{model="m",version="2"} 1.0' in text
    assert 'headrace_request_failure_total{code="bad_shape",model="m",version="2"} 1.0' in text
    assert 'headrace_compute_infer_duration_us_total{model="m",version="2"} 8000.0' in text
    assert 'headrace_stream_lag{model="m",version="2"} 7.0' in text
    assert 'headrace_batch_size_count{model="m",version="2"} 1.0' in text
    PrometheusMetrics("other", "1", registry=registry)  # a second model on the same registry is fine


def test_main_args_default_the_model_to_the_fake_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args(["--fake", "length", "--max-batch", "7", "--lease-s", "0.5"])
    assert (args.fake, args.max_batch, args.lease_s, args.model) == ("length", 7, 0.5, None)
    with pytest.raises(SystemExit):
        parse_args(["--fake", "bogus"])


def test_dead_letter_parsing_strips_dlq_fields() -> None:
    op = DeadLetterOp("5-0", encode_request(Request(Envelope("r9", "q"), text="x")), "boom", E.MODEL_ERROR, 3)
    dl = DeadLetter.from_entry(b"9-1", op.dlq_fields(1234))
    assert (dl.dlq_id, dl.request_id, dl.reply_to, dl.code, dl.entry_id, dl.deliveries, dl.ts_ms) == \
        ("9-1", "r9", "q", E.MODEL_ERROR, "5-0", 3, 1234)
    assert dl.reason == "boom" and not any(k.startswith(b"dlq_") for k in dl.fields)
    assert BatchStats("w", 2, 2, 0, 1.5, (3.0, 4.0)).to_fields(99)[b"ts_ms"] == b"99"


def test_memory_broker_trim_and_claim_follow_stream_semantics() -> None:
    async def go() -> None:
        clock = ManualClock()
        store = MemoryStore(clock=clock)
        a, b = MemoryBroker(store, "a"), MemoryBroker(store, "b")
        ids = [store.add({b"n": str(i).encode()}) for i in range(5)]
        assert await a.trim() == 0  # no group yet
        await a.ensure_group()
        got = await a.read(3, 0)
        assert [e.entry_id for e in got] == ids[:3]
        await a.commit([Ack(ids[0]), Reply(ids[1], "q1", "reply", {b"v": b"1"})])
        assert await a.trim() == 2  # ids[2] is still pending
        assert await b.claim_abandoned(1000, 10) == []
        clock.advance(2)
        (claimed,) = await b.claim_abandoned(1000, 10)
        assert (claimed.entry_id, claimed.deliveries) == (ids[2], 2)
        assert await a.refresh_lease([ids[2]]) == []
        assert await b.backlog() == type(await b.backlog())(lag=2, pending=1)
        assert await a.answered(["q1", "q2"]) == [True, False]

    asyncio.run(go())


def test_xreadgroup_reply_shapes_are_all_understood() -> None:
    from headrace.workers.broker.replies import stream_entries as _stream_entries

    entries = [(b"1-0", {b"a": b"1"}), (b"1-1", {b"b": b"2"})]
    assert _stream_entries(None) == [] and _stream_entries({}) == [] and _stream_entries([]) == []
    assert _stream_entries([[b"s", entries]]) == entries  # RESP2 / legacy shape
    assert _stream_entries({b"s": entries}) == entries  # unified dict shape
    assert _stream_entries({b"s": [entries]}) == entries  # RESP3 shape


def test_every_lua_script_ships_and_documents_its_keys_and_race() -> None:
    from headrace.workers.broker import scripts

    for name in scripts.NAMES:
        src = scripts.source(name)
        assert src.startswith(f"-- {name}:"), name
        header = "\n".join(line for line in src.splitlines() if line.startswith("--"))
        assert "KEYS[1]" in header, f"{name}: its KEYS/ARGV are documented"
        if name not in {"DLQ_PURGE"}:
            assert "Race" in header or "race" in header or "Races" in header, f"{name}: the race it prevents"
    with pytest.raises(KeyError):
        scripts.source("NOPE")
