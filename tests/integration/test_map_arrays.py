"""The SDK's array path through real Redis, the submit function and a worker thread: arrays
in, arrays out (sync and async), failed samples in place, bad blocks refused before
anything is sent, and requests cancelled when the caller stops early."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import ArrayResults, AsyncClient, Client, InferenceFailed
from headrace.client import errors as E
from headrace.workers.backends.fake import affine_reference
from tests.support.client import start_fake_worker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def worker(redis_url: str) -> Iterator[None]:
    w = start_fake_worker(redis_url, "affine", "affine")
    yield
    w.stop()


def samples(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_map_arrays_answers_every_sample_in_order_as_one_array(redis_url: str, worker: None) -> None:
    x = samples(1000)
    with Client(redis_url, reply_block_ms=200, timeout_s=20) as c:
        out = c.map_arrays("affine", {"x": x}, chunk_size=64, progress=False)
        assert out.all_ok and len(out) == 1000 and out.ok.all()
        assert out.outputs["y"].shape == (1000, 4) and out.outputs["y"].dtype == np.float32
        np.testing.assert_array_equal(out.outputs["y"], affine_reference(x))
        assert out.model == "affine"
        # the same samples through map() give the same rows
        rows = c.map("affine", [{"x": v} for v in x[:50]], chunk_size=16, progress=False)
        np.testing.assert_array_equal(np.stack([r.outputs["y"] for r in rows]), out.outputs["y"][:50])


def test_a_failed_sample_stays_in_its_place(redis_url: str, worker: None) -> None:
    x = samples(200, seed=1)
    x[77, 2] = np.nan  # refused alone (bad_value); its neighbours in the entry are answered
    with Client(redis_url, reply_block_ms=200, timeout_s=20) as c:
        out = c.map_arrays("affine", {"x": x}, chunk_size=32, progress=False, raise_on_error=False)
        assert sorted(out.failures) == [77] and out.failures[77].code == E.BAD_VALUE
        assert out.ok.sum() == 199 and not out.ok[77]
        good = np.ones(200, bool)
        good[77] = False
        np.testing.assert_array_equal(out.outputs["y"][good], affine_reference(x[good]))
        np.testing.assert_array_equal(out.outputs["y"][77], np.zeros(4, np.float32))
        with pytest.raises(InferenceFailed, match="sample 77 of 200") as info:
            c.map_arrays("affine", {"x": x}, chunk_size=32, progress=False)
        assert info.value.code == E.BAD_VALUE


def test_texts_of_a_text_model_come_back_as_arrays(redis_url: str) -> None:
    w = start_fake_worker(redis_url, "length", "length")
    texts = [f"sentence number {i}" + "!" * (i % 7) for i in range(150)]
    texts[42] = "z" * 100_001  # too long: refused in its own slot
    try:
        with Client(redis_url, reply_block_ms=200, timeout_s=20) as c:
            out = c.map_arrays("length", texts=texts, chunk_size=32, progress=False, raise_on_error=False)
            assert out.outputs["length"].shape == (150, 1) and out.outputs["length"].dtype == np.int64
            assert sorted(out.failures) == [42] and out.failures[42].code == E.PAYLOAD_TOO_LARGE
            want = np.array([[len(t)] for t in texts])
            want[42] = 0
            np.testing.assert_array_equal(out.outputs["length"], want)
            streamed = list(c.imap_arrays("length", [texts[:10], np.array(["a", "bb"])], chunk_size=4,
                                          progress=False))
            assert [o.outputs["length"][:, 0].tolist() for o in streamed] == [[len(t) for t in texts[:10]], [1, 2]]
            for bad in ("one string", [b"bytes"], []):
                with pytest.raises(E.ProtocolError):
                    c.map_arrays("length", texts=bad, progress=False)  # type: ignore[arg-type]
            with pytest.raises(E.ProtocolError, match="either inputs"):
                c.map_arrays("length", {"x": np.ones((2, 1))}, texts=["a", "b"], progress=False)
    finally:
        w.stop()


def test_a_bad_block_is_refused_before_anything_is_sent(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    with Client(redis_url, reply_block_ms=200, timeout_s=5, require_registered=False) as c:
        with pytest.raises(E.ProtocolError) as info:
            c.map_arrays("affine", {"x": np.ones((4, 2)), "z": np.ones((3, 2))}, progress=False)
        assert info.value.code == E.BAD_SHAPE
        with pytest.raises(E.InvalidTensorError) as dtype:
            # an object array holding a None is no wire tensor (one of str would be a string tensor)
            c.map_arrays("affine", {"x": np.array([["a"], [None]], dtype=object)}, progress=False)
        assert dtype.value.code == E.BAD_DTYPE
        assert not c.outstanding()
    assert r.xlen("headrace:{affine}:requests") == 0 and r.llen("headrace:{affine}:inbox") == 0


def test_async_imap_arrays_yields_one_result_per_block_in_order(redis_url: str, worker: None) -> None:
    blocks = [samples(n, seed=n) for n in (7, 130, 1, 64)]

    async def go() -> list[ArrayResults]:
        async with AsyncClient(redis_url, reply_block_ms=200, timeout_s=20, max_in_flight=100) as c:
            return [r async for r in c.imap_arrays("affine", ({"x": b} for b in blocks), chunk_size=32,
                                                   progress=False)]

    out = asyncio.run(go())
    assert [len(o) for o in out] == [7, 130, 1, 64]
    for block, res in zip(blocks, out, strict=True):
        assert res.all_ok
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(block))


def test_stopping_early_cancels_what_is_still_out(redis_url: str) -> None:
    w = start_fake_worker(redis_url, "affine", "affine")
    try:
        with Client(redis_url, reply_block_ms=200, timeout_s=20, max_in_flight=64) as c:
            it = c.imap_arrays("affine", ({"x": samples(32, seed=i)} for i in range(1000)), chunk_size=16,
                               progress=False)
            first = next(it)
            np.testing.assert_array_equal(first.outputs["y"], affine_reference(samples(32, seed=0)))
            it.close()  # type: ignore[attr-defined]
            assert not c.outstanding()
    finally:
        w.stop()
