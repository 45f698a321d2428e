"""docs/protocol.md = code: every error code of the doc's table is provoked for real and
comes back as documented (issue #10, item 8).

Result codes come from real worker processes (``--fake affine`` / ``--fake length``) fed raw
entries (an operator's plain XADD: the submit function would refuse most of them before a
worker sees them; its own refusals are checked below too). ``model_error`` needs a model
whose output cannot be sent and ``internal_error`` a worker bug, so those two run on an
in-process worker with such a model, and with a fault injected into its admission step.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.functions import LIBRARY_SHA256, LIBRARY_SOURCE, LIBRARY_VERSION, ensure_library
from headrace.client.keys import ModelKeys
from headrace.workers.admin.dlq import dlq_replay
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.admission import Admission
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.procs import WorkerProc
from tests.support.worker import Collector

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
NS = "headrace"
POISON = -1.0
_ids = itertools.count()


def doc_codes() -> list[str]:
    """The codes of the error-code table in docs/protocol.md, in order."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert len(codes) >= 10, "the error-code table of docs/protocol.md moved or lost its rows"
    return codes


def test_the_doc_table_lists_exactly_the_codes_of_the_code() -> None:
    assert set(doc_codes()) == set(E.ALL_CODES) | {E.CONFIG_ERROR}


def test_the_published_submit_library_is_the_file() -> None:
    text = DOC.read_text(encoding="utf-8")
    row = re.search(r"\| `client/submit\.lua` \| `headrace` \(`LIBRARY_VERSION = (\d+)`\) \|.*\| `([0-9a-f]{64})` \|",
                    text)
    assert row, "docs/protocol.md lost the submit-library table"
    on_disk = hashlib.sha256((ROOT / "client" / "submit.lua").read_bytes()).hexdigest()
    assert row.group(2) == on_disk == LIBRARY_SHA256, "update the checksum in docs/protocol.md"
    assert int(row.group(1)) == LIBRARY_VERSION and LIBRARY_SOURCE.startswith("#!lua name=headrace\n")


# --- the requests --------------------------------------------------------------------------


def entry(stream_model: str, payload: Any, /, **fields: Any) -> dict[bytes, bytes]:
    """A raw request entry for ``stream_model`` replying to ``<ns>:{model}:reply:codes``;
    ``fields`` override (None drops a field)."""
    body = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    base: dict[str, Any] = {"v": "1", "id": f"c-{next(_ids)}", "ts_ms": str(P.now_ms()), "body": body,
                            "reply_to": ModelKeys(NS, stream_model).reply("codes")}
    base.update(fields)
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in base.items() if v is not None}


def tensor(arr: Any, dtype: str = "float32", shape: Sequence[int] | None = None) -> dict[str, Any]:
    a = np.asarray(arr, dtype=dtype)
    return {"dtype": dtype, "shape": list(a.shape) if shape is None else list(shape), "data": a.tobytes()}


def x(values: Any = (1, 2, 3, 4), **kw: Any) -> dict[str, Any]:
    return {"inputs": {"x": tensor(values, **kw)}}


# Each code of the table with the entries that must get it: (model, entry).
RESULT_CASES: dict[str, list[tuple[str, dict[bytes, bytes]]]] = {
    E.DECODE_ERROR: [("affine", entry("affine", b"\xc1")),                          # bad msgpack
                     ("affine", entry("affine", {"text": "a", "inputs": {}})),       # both
                     ("affine", entry("affine", x(), deadline_ms="1_000")),
                     ("affine", entry("affine", x(), deadline_ms="\u0661\u0660\u0660\u0660")),
                     ("affine", entry("affine", x(), ts_ms="9" * 400))],
    E.MISSING_FIELD: [("affine", entry("affine", x(), v=None)),                     # no `v`
                      ("affine", entry("affine", x(), body=None)),
                      ("affine", entry("affine", {"other": 1}))],
    E.BAD_DTYPE: [("affine", entry("affine", x(dtype="float64"))),
                  ("affine", entry("affine", {"inputs": {"x": {**tensor([1]), "dtype": "complex64"}}}))],
    E.BAD_SHAPE: [("affine", entry("affine", x([1, 2, 3, 4, 5]))),
                  ("affine", entry("affine", {"inputs": {"x": tensor([], shape=[0, 2**63])}}))],
    E.BAD_VALUE: [("affine", entry("affine", x([1, np.nan, 3, 4]))),
                  ("affine", entry("affine", {"text": "affine takes tensors"})),    # text to a tensor model
                  ("affine", entry("affine", {"inputs": {"x": tensor([1, 2, 3, 4]), "z": tensor([1])}})),
                  ("length", entry("length", x())),                                 # tensors to a text model
                  ("length", entry("length", {"text": b"bytes"})),                  # text sent as bin
                  ("length", entry("length", {"text": 5}))],                        # ... and as int
    E.PAYLOAD_TOO_LARGE: [("length", entry("length", {"text": "y" * 100_001})),
                          ("affine", entry("affine", {"inputs": {"x": tensor([], shape=[1 << 25])}})),
                          ("affine", entry("affine", b"\x00" * (4 * 1024 * 1024 + 1)))],
    E.UNKNOWN_MODEL: [("affine", entry("affine", x(), model="minilm"))],
    E.UNSUPPORTED_VERSION: [("affine", entry("affine", x(), v="2"))],
    E.DEADLINE_EXCEEDED: [("affine", entry("affine", x(), deadline_ms=str(P.now_ms() - 10_000)))],
    E.MAX_DELIVERIES: [("affine", entry("affine", x([POISON] * 4)))],
    E.MODEL_ERROR: [("odd", entry("odd", x([7, 7, 7, 7])))],
    E.INTERNAL_ERROR: [("odd", entry("odd", x([1, 2, 3, 4]), id="bug-in-admission"))],
    # Multi-sample entries (faults of the entry as a whole; per-sample ones: tests/unit/test_multisample.py).
    E.TOO_MANY_SAMPLES: [("affine", entry("affine", {"samples": 1025, **x(np.zeros((1025, 4)))}, n="1025")),
                         ("length", entry("length", {"texts": ["t"] * 1025}))],
}
RESULT_CASES[E.BAD_VALUE] += [("affine", entry("affine", {"samples": 2, **x(np.zeros((2, 4)))}, n="3"))]
RESULT_CASES[E.BAD_SHAPE] += [("affine", entry("affine", {"samples": 3, **x(np.zeros((2, 4)))}, n="3"))]


class OddServable(AffineServable):
    """An affine model whose output for x == 7 has a dtype no wire tensor can carry."""

    def infer(self, requests: Sequence[P.Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        out = super().infer(requests)
        for o, r in zip(out, requests, strict=True):
            if bool((r.inputs["x"] == 7).any()):
                o["y"] = o["y"].astype(np.complex64)
        return out


@pytest.fixture
def workers(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    args = ["--block-ms", "100", "--max-wait-ms", "2", "--max-deliveries", "1", "--lease-s", "0.5"]
    procs = [WorkerProc(redis_url, tmp_path / "affine.log", *args, fake="affine",
                        env={"HEADRACE_FAKE_POISON": str(POISON)}),
             WorkerProc(redis_url, tmp_path / "length.log", *args, fake="length")]
    admit = Admission._screen

    def buggy_admit(self: Admission, ent: Any, env: P.Envelope, *rest: Any) -> Any:
        if env.request_id == "bug-in-admission":  # the injected worker bug
            raise RuntimeError("injected bug")
        return admit(self, ent, env, *rest)

    monkeypatch.setattr(Admission, "_screen", buggy_admit)
    odd = WorkerThread(WorkerSettings(model="odd", redis_url=redis_url, namespace=NS, consumer="odd-1",
                                      block_ms=100, max_wait_ms=2), OddServable(name="odd")).start()
    try:
        yield
    finally:
        odd.stop()
        for p in procs:
            p.kill()


def wait_results(r: redis.Redis, model: str, n: int, timeout_s: float = 60.0) -> dict[str, list[P.Result]]:
    c = Collector(r, ModelKeys(NS, model).reply("codes"))
    c.wait_for(n, timeout_s)
    return c.by_id()


def test_every_documented_code_is_provoked_for_real(redis_url: str, workers: None) -> None:
    r = redis.Redis.from_url(redis_url)
    provoked: set[str] = set()
    expected: dict[str, tuple[str, str]] = {}
    for code, cases in RESULT_CASES.items():
        for model, fields in cases:
            r.xadd(ModelKeys(NS, model).requests, fields)  # type: ignore[arg-type]
            expected[fields[b"id"].decode() if b"id" in fields else ""] = (model, code)
    per_model: dict[str, int] = {}
    for model, _code in expected.values():
        per_model[model] = per_model.get(model, 0) + 1
    got: dict[str, list[P.Result]] = {}
    for model, n in per_model.items():
        got.update(wait_results(r, model, n))
    for rid, (model, code) in expected.items():
        [res] = got[rid]
        assert res.code == code, (rid, model, res)
        assert res.status == (P.STATUS_EXPIRED if code == E.DEADLINE_EXCEEDED else P.STATUS_ERROR)
        assert res.timings.queue_ms >= 0 and isinstance(res.timings.batch_size, int)
        provoked.add(code)

    provoked |= sdk_side_codes(r, redis_url)
    assert provoked == set(doc_codes())


def sdk_side_codes(r: redis.Redis, redis_url: str) -> set[str]:
    """The codes never in a result, each provoked through the SDK as its users meet them."""
    out: set[str] = set()
    x4 = {"x": np.ones(4, np.float32)}
    with Client(redis_url, max_backlog=1, client_id="codes-q", require_registered=False) as c:
        c.submit("idle", x4)
        with pytest.raises(E.QueueFull) as full:  # the submit function refused it
            c.submit("idle", x4)
        out.add(full.value.code)
        with pytest.raises(E.ResultTimeout) as late:  # nobody serves "idle"
            c.submit("idle2", x4).result(0.2)
        out.add(late.value.code)
        ticket = c.submit("idle3", x4)
        ticket.cancel()
        with pytest.raises(E.RequestCancelled) as cancelled:
            ticket.result(1)
        out.add(cancelled.value.code)
    # A model some worker registered once, with no live worker now.
    r.hset(f"{NS}:models", "gone", json.dumps({"model": "gone", "updated_ms": 1, "workers": {}, "signatures": {}}))
    with Client(redis_url, fail_fast=True, client_id="codes-f") as c, pytest.raises(E.ModelUnavailable) as gone:
        c.submit("gone", x4)
    out.add(gone.value.code)
    with Client("redis://127.0.0.1:1/0", require_registered=False, timeout_s=2) as c, \
            pytest.raises(E.BrokerError) as down:
        c.submit("affine", x4)
    out.add(down.value.code)
    with pytest.raises(E.ConfigError) as bad:
        Client(redis_url, timeout_s=-1)
    out.add(bad.value.code)
    return out


def test_a_replayed_dead_letter_answers_its_id_a_second_time(redis_url: str, workers: None) -> None:
    """docs/protocol.md: `dlq replay` after max_deliveries_exceeded sends a second result."""
    r = redis.Redis.from_url(redis_url)
    poisoned = entry("affine", x([POISON] * 4))
    r.xadd(ModelKeys(NS, "affine").requests, poisoned)  # type: ignore[arg-type]
    rid = poisoned[b"id"].decode()
    c = Collector(r, ModelKeys(NS, "affine").reply("codes"))
    c.wait_for(1, 60)
    assert dlq_replay(r, NS, "affine") == 1
    c.wait_for(2, 60)
    assert [res.code for res in c.by_id()[rid]] == [E.MAX_DELIVERIES, E.MAX_DELIVERIES]


# --- the submit function's own refusals ----------------------------------------------------


FUNCTION_REFUSALS: list[tuple[str, Callable[[dict[bytes, bytes]], dict[bytes, bytes]], str]] = [
    ("missing v", lambda f: {k: v for k, v in f.items() if k != b"v"}, E.MISSING_FIELD),
    ("missing body", lambda f: {k: v for k, v in f.items() if k != b"body"}, E.MISSING_FIELD),
    ("v=2", lambda f: {**f, b"v": b"2"}, E.UNSUPPORTED_VERSION),
    ("id with a newline", lambda f: {**f, b"id": b"a\n"}, E.DECODE_ERROR),
    ("reply_to with a newline", lambda f: {**f, b"reply_to": f[b"reply_to"] + b"\n"}, E.DECODE_ERROR),
    ("deadline_ms 1_000", lambda f: {**f, b"deadline_ms": b"1_000"}, E.DECODE_ERROR),
    ("Arabic-Indic deadline", lambda f: {**f, b"deadline_ms": "\u0661\u0660".encode()}, E.DECODE_ERROR),
    ("ts_ms of 400 nines", lambda f: {**f, b"ts_ms": b"9" * 400}, E.DECODE_ERROR),
    ("another model", lambda f: {**f, b"model": b"minilm"}, E.UNKNOWN_MODEL),
    ("sample count 0", lambda f: {**f, b"n": b"0"}, E.DECODE_ERROR),
    ("sample count of 10 digits", lambda f: {**f, b"n": b"1" * 10}, E.DECODE_ERROR),
    ("entry over max_payload_bytes", lambda f: {**f, b"pad": b"\0" * (4 << 20)}, E.PAYLOAD_TOO_LARGE),
    ("4000 fields", lambda f: {**f, **{f"f{i}".encode(): b"x" for i in range(4000)}}, E.PAYLOAD_TOO_LARGE),
]


@pytest.mark.parametrize("what,change,code", FUNCTION_REFUSALS, ids=[c[0] for c in FUNCTION_REFUSALS])
def test_the_submit_function_refuses_with_the_documented_code(redis_url: str, what: str,
                                                              change: Callable[..., Any], code: str) -> None:
    r = redis.Redis.from_url(redis_url)
    ensure_library(r)
    keys = ModelKeys(NS, "affine")
    fields = change(entry("affine", x()))
    args = [a for kv in fields.items() for a in kv]
    with pytest.raises(redis.ResponseError) as refused:
        r.fcall("headrace_submit", 3, keys.requests, keys.limits, keys.inbox, "workers", 0, *args)
    assert str(refused.value).split(" ", 1)[0] == code, str(refused.value)[:200]
    assert r.xlen(keys.requests) == 0 and r.llen(keys.inbox) == 0
