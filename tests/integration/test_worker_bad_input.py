"""Bad input never kills a worker process nor blocks batch-mates: each kind is answered with
its code (or dead-lettered when nobody can be told), and good requests keep flowing."""

from __future__ import annotations

import signal
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.client.protocol import Envelope, Request, encode_request
from headrace.workers.admin.dlq import dlq_list
from headrace.workers.backends.fake import affine_reference
from tests.support.worker import Collector, affine_request, pending_count, produce, wait_until, worker_procs


@pytest.mark.timeout(60)
def test_each_bad_input_kind_gets_its_code_and_the_worker_keeps_serving(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")

    def req(rid: str, **kw: object) -> dict[bytes, bytes]:
        return affine_request(rid, 1.0, reply, **kw)  # type: ignore[arg-type]

    cases: dict[str, tuple[dict[bytes, bytes], str]] = {
        "bad-msgpack": ({**req("bad-msgpack"), b"body": b"\xc1\xc1"}, E.DECODE_ERROR),
        "not-a-map": ({**req("not-a-map"), b"body": msgpack.packb([1, 2])}, E.DECODE_ERROR),
        "no-body": ({k: v for k, v in req("no-body").items() if k != b"body"}, E.MISSING_FIELD),
        "bad-dtype": (encode_request(Request(Envelope("bad-dtype", reply), inputs={"x": np.ones(4, np.int32)})),
                      E.BAD_DTYPE),
        "bad-shape": (encode_request(Request(Envelope("bad-shape", reply), inputs={"x": np.ones((2, 2), np.float32)})),
                      E.BAD_SHAPE),
        "short-data": ({**req("short-data"), b"body": msgpack.packb(
            {"inputs": {"x": {"dtype": "float32", "shape": [4], "data": b"\x00" * 3}}})}, E.BAD_SHAPE),
        "nan": (affine_request("nan", float("nan"), reply), E.BAD_VALUE),
        "huge": ({**req("huge"), b"body": msgpack.packb({"text": "x" * 5000})}, E.PAYLOAD_TOO_LARGE),
        "other-model": (req("other-model", model="minilm"), E.UNKNOWN_MODEL),
        "v2": ({**req("v2"), b"v": b"2"}, E.UNSUPPORTED_VERSION),
        "text": (encode_request(Request(Envelope("text", reply), text="hi")), E.BAD_VALUE),  # text to a tensor model
    }
    unroutable = {b"v": b"1", b"id": b"has spaces!", b"reply_to": reply.encode(), b"body": b""}
    wrongtype = keys.reply("not-a-stream")  # a reply key of this model that holds a string
    r.set(wrongtype, "x")
    unwritable = affine_request("unwritable", 1.0, wrongtype)
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--consumer", "w", "--block-ms", "20", "--max-wait-ms", "20", "--max-batch", "32",
                  env={"HEADRACE_MAX_PAYLOAD_BYTES": "2048"})
        produce(r, keys, [req("good-1"), *[f for f, _ in cases.values()], unroutable, unwritable, req("good-2")])
        collector = Collector(r, reply)
        collector.wait_for(len(cases) + 2, timeout_s=30)
        wait_until(lambda: len(dlq_list(r, "headrace", "affine")) == 2)
        produce(r, keys, [affine_request("good-3", 5.0, reply)])  # still serving afterwards
        collector.wait_for(len(cases) + 3, timeout_s=30)
        assert w.proc.poll() is None, "the worker died of a request"
        w.signal(signal.SIGTERM)
        assert w.wait(20) == 0
    got = {rid: v for rid, v in collector.by_id().items()}
    for rid, (_, code) in cases.items():
        (res,) = got[rid]
        assert (res.status, res.code) == ("error", code), (rid, res.code, res.message)
        assert res.message
    for rid in ("good-1", "good-2", "good-3"):
        assert got[rid][0].ok
    np.testing.assert_array_equal(got["good-3"][0].outputs["y"], affine_reference(np.full(4, 5.0)))
    dead = {d.code: d for d in dlq_list(r, "headrace", "affine")}
    assert dead[E.DECODE_ERROR].fields[b"id"] == b"has spaces!"  # unroutable: kept for inspection
    assert "unroutable" in dead[E.DECODE_ERROR].reason
    assert dead[E.INTERNAL_ERROR].request_id == "unwritable" and "WRONGTYPE" in dead[E.INTERNAL_ERROR].reason
    assert r.get(wrongtype) == b"x"
    assert not r.exists(keys.done("unwritable"))  # not marked answered: a replay may answer it
    assert pending_count(r, keys) == 0
