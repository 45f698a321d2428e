"""Multi-sample text entries carried as blocks (a list of texts, no request per sample) for
text servables that run texts as rows: admission checks the texts in one pass and falls back
to one request per sample when any may be refused; the batcher cuts text blocks; the runner
makes one ``infer_texts`` call per length bucket and puts the rows back in order; a poison text
is found by halving; answers are encoded from the stacked outputs."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request, decode_result, encode_request, now_ms
from headrace.client.samples import MultiRequest, all_valid_texts
from headrace.client.wire import Limits
from headrace.workers.backends.base import runs_stacked
from headrace.workers.backends.fake import LengthServable
from headrace.workers.backends.tokens import pad_rows
from headrace.workers.engine.admission import Admission, Samples
from headrace.workers.engine.calls import infer_text_buckets, row_signature, text_rows
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.work import Work, split_work
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.worker import serve_until, wait_until

LEN = "headrace:{length}:reply:t"


def texts_entry(rid: str, texts: Sequence[Any]) -> dict[bytes, bytes]:
    if all(isinstance(t, str) for t in texts):
        return MultiRequest(Envelope(rid, LEN), texts=list(texts)).encode()
    # A hostile producer: items that are not str (MultiRequest would not build it).
    fields = MultiRequest(Envelope(rid, LEN), texts=["x"] * len(texts)).encode()
    fields[b"body"] = msgpack.packb({"texts": list(texts)}, use_bin_type=True)
    return fields


def admit(servable: LengthServable, texts: Sequence[Any], **settings: Any) -> Samples:
    adm = Admission(WorkerSettings(model="length", **settings), servable, Answers("length", "1", "w"), Counter())
    res = adm.prepare_all([(Entry("1-0", texts_entry("m", texts)), Envelope("m", LEN))], now_ms())[0]
    assert isinstance(res, Samples)
    return res


def test_admission_carries_clean_texts_as_one_block_with_a_length_per_row() -> None:
    texts = ["a", "three", "", "sixteen chars..."]
    res = admit(LengthServable(rows=True), texts)
    [work] = res.works
    assert work.block and work.count == 4 and list(work.texts) == texts
    assert list(work.row_lengths) == [1, 5, 0, 16] and work.length == 16
    assert work.request.text is None and not work.request.inputs and res.group.left == 4


def test_texts_that_may_be_refused_go_sample_by_sample() -> None:
    res = admit(LengthServable(rows=True), ["ok", 7, "fine"])  # not a str: refused in its slot
    assert [w.index for w in res.works] == [0, 2] and not any(w.block for w in res.works)
    assert res.group.slots[1] is not None and res.group.slots[1].code == E.BAD_VALUE
    assert [w.length for w in res.works] == [2, 4]

    res = admit(LengthServable(rows=True), ["short", "x" * 100_001])  # past Limits.max_text_chars
    assert [w.index for w in res.works] == [0]
    assert res.group.slots[1] is not None and res.group.slots[1].code == E.PAYLOAD_TOO_LARGE

    # A servable that runs requests one by one never gets a block.
    res = admit(LengthServable(), ["a", "b"])
    assert [w.block for w in res.works] == [False, False]


def test_entry_wide_faults_of_a_texts_body_still_refuse_the_entry() -> None:
    adm = Admission(WorkerSettings(model="length", max_samples_per_entry=3), LengthServable(rows=True),
                    Answers("length", "1", "w"), Counter())
    fields = texts_entry("m", ["a"] * 4)
    res = adm.prepare_all([(Entry("1-0", fields), Envelope("m", LEN))], now_ms())[0]
    assert getattr(res, "code", None) == E.TOO_MANY_SAMPLES
    fields[b"body"] = msgpack.packb({"texts": "not a list"}, use_bin_type=True)
    res = adm.prepare_all([(Entry("1-0", fields), Envelope("m", LEN))], now_ms())[0]
    assert getattr(res, "code", None) == E.BAD_VALUE


def test_all_valid_texts() -> None:
    limits = Limits(max_text_chars=3)
    assert all_valid_texts(["", "abc"], limits)
    assert not all_valid_texts(["abcd"], limits) and not all_valid_texts(["a", b"b"], limits)


def text_block(texts: list[str], index: int = 0) -> Work:
    return Work(Entry(f"{index}-0", {}), Request(Envelope("b", LEN)), 0, max(map(len, texts)), None, index,
                len(texts), True, texts, [len(t) for t in texts])


def test_split_work_cuts_the_texts_and_their_lengths() -> None:
    head, tail = split_work(text_block(["a", "bb", "ccc", "dddd"]), 1)
    assert (list(head.texts), list(head.row_lengths), head.count) == (["a"], [1], 1)
    assert (list(tail.texts), list(tail.row_lengths), tail.index, tail.count) == (["bb", "ccc", "dddd"], [2, 3, 4], 1, 3)


def test_rows_of_blocks_and_single_texts_keep_their_order() -> None:
    single = Work(Entry("9-0", {}), Request(Envelope("s", LEN), text="single"), 0, 6)
    works = [text_block(["a", "bb"]), single, text_block(["ccc"], 5)]
    assert text_rows(works) == (["a", "bb", "single", "ccc"], [1, 2, 6, 3])
    assert {row_signature(w) for w in works} == {("texts",)}


def test_length_buckets_run_as_separate_calls_and_rows_go_back_in_order() -> None:
    sv = LengthServable(rows=True)
    texts = ["x" * n for n in (300, 2, 301, 3, 299, 1)]
    buckets = [[5, 1, 3], [4, 0, 2]]  # short ones, long ones (split_by_length's order)
    out = infer_text_buckets(sv, texts, [f"r{i}" for i in range(6)], buckets)
    assert out["length"][:, 0].tolist() == [300, 2, 301, 3, 299, 1]
    assert [len(c) for c in sv.text_calls] == [3, 3]

    class Ragged(LengthServable):
        def infer_texts(self, texts: Sequence[str], request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
            width = max(map(len, texts))
            return {"length": np.zeros((len(texts), width), np.int64)}  # rows shaped by the bucket

    with pytest.raises(E.ModelError, match="length bucket"):
        infer_text_buckets(Ragged(rows=True), texts, ["r"] * 6, buckets)


def test_pad_rows_pads_on_the_right_with_a_mask() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]] and ids.dtype == mask.dtype == np.int64
    ids, mask = pad_rows([], pad_id=1)
    assert ids.shape == mask.shape == (0, 0)


@pytest.mark.timeout(20)
async def test_text_blocks_are_packed_cut_and_answered_from_stacked_outputs() -> None:
    store = MemoryStore()
    sv = LengthServable(rows=True)
    assert runs_stacked(sv)
    w = StreamWorker(WorkerSettings(model="length", max_batch=8, preferred_batch=8, max_wait_ms=20, block_ms=5), sv,
                     MemoryBroker(store, "w"))
    data = {"big": [f"text {i}" + "!" * i for i in range(19)], "a": ["α", "βγ", ""], "b": ["one", "two", "three"]}
    with store.lock:
        for rid, texts in data.items():
            store.add(texts_entry(rid, texts))
        store.add(encode_request(Request(Envelope("one", LEN), text="single")))
    await serve_until(w, lambda: len(store.results(LEN)) == 4)
    assert all(len(c) <= 8 for c in sv.text_calls) and sum(len(c) for c in sv.text_calls) == 26
    assert any(len(set(b)) > 1 for b in sv.batches), "texts of several entries share a call"
    raw = {f[b"id"].decode(): f for _, f in store.replies[LEN]}
    for rid, texts in data.items():
        body = msgpack.unpackb(raw[rid][b"body"])
        assert body["stacked"]["length"]["shape"] == [len(texts), 1], "answered from the stacked rows"
        res = decode_result(raw[rid])
        assert res.ok and [int(s.outputs["length"][0]) for s in res.samples] == [len(t) for t in texts]
    assert decode_result(raw["one"]).outputs["length"].tolist() == [6]
    assert len(store.pending_ids()) == 0


@pytest.mark.timeout(30)
async def test_a_poison_text_in_a_block_is_found_by_halving_and_the_rest_answered() -> None:
    store = MemoryStore()
    sv = LengthServable(rows=True, poison="POISON")
    w = StreamWorker(WorkerSettings(model="length", max_batch=64, preferred_batch=64, max_wait_ms=50, block_ms=5),
                     sv, MemoryBroker(store, "w"))
    texts = [f"sample {i}" for i in range(40)]
    texts[29] = "a POISON text"
    with store.lock:
        store.add(texts_entry("p", texts))
        store.add(texts_entry("q", ["fine", "also fine"]))
    await serve_until(w, lambda: len(store.results(LEN)) == 2)
    got = {r.request_id: r for r in store.results(LEN)}
    p = got["p"]
    assert [s.status for s in p.samples].count("error") == 1
    assert p.samples[29].code == E.MODEL_ERROR and "sample 29" in p.samples[29].message
    assert [int(p.samples[i].outputs["length"][0]) for i in range(40) if i != 29] == \
        [len(t) for i, t in enumerate(texts) if i != 29]
    assert got["q"].ok and all(s.ok for s in got["q"].samples)
    assert not store.dlq and len(store.pending_ids()) == 0


# --- property: a texts entry is answered alike as a block and sample by sample ----------------

ITEMS = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
                  st.integers(min_value=-(2**63), max_value=2**64 - 1),  # what msgpack can carry
                  st.binary(max_size=4), st.none(), st.floats(allow_nan=False), st.lists(st.text(max_size=3), max_size=2))


@pytest.fixture(scope="module")
def both_paths() -> Iterator[dict[bool, MemoryStore]]:
    """One worker thread per path: texts as rows (blocks) and one request per text."""
    stores: dict[bool, MemoryStore] = {}
    threads = []
    for rows in (False, True):
        stores[rows] = MemoryStore()
        settings_ = WorkerSettings(model="length", max_batch=16, max_wait_ms=1, block_ms=5, lease_s=30,
                                   drain_timeout_s=5)
        threads.append(WorkerThread(settings_, LengthServable(rows=rows), MemoryBroker(stores[rows], f"w{rows}")).start())
    yield stores
    for t in threads:
        t.stop(drain=True, timeout_s=10)


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ITEMS, min_size=1, max_size=20))
def test_a_texts_entry_is_answered_alike_as_a_block_and_sample_by_sample(both_paths: dict[bool, MemoryStore],
                                                                         texts: list[Any]) -> None:
    rid = f"p{uuid.uuid4().hex[:12]}"
    got = {}
    for rows, store in both_paths.items():
        with store.lock:
            store.add(texts_entry(rid, texts))
        got[rows] = wait_until(lambda s=store: next((r for r in s.results(LEN) if r.request_id == rid), None))
    one_by_one, block = got[False], got[True]
    assert (block.status, block.code) == (one_by_one.status, one_by_one.code)
    assert len(block.samples) == len(texts)
    for text, a, b in zip(texts, one_by_one.samples, block.samples, strict=True):
        assert (b.status, b.code) == (a.status, a.code)
        if isinstance(text, str):
            assert b.ok and int(b.outputs["length"][0]) == len(text)
        else:
            assert b.code == E.BAD_VALUE
    assert not both_paths[True].dlq and not both_paths[True].pending_ids()
