"""Stream-level fuzzing of a real worker process (issue #10): whole entries added with raw
``XADD`` to a private Redis, a ledger of every entry, and after each example:

* every entry is answered (a result under its request id) or dead-lettered (by entry id),
  once, and nothing stays pending or unread;
* the worker is alive and answers a normal request;
* its memory stays bounded (peak RSS).

Entries: the protocol fuzz families (``tests/support/fuzz_cases.py``) mutated at the stream
level: numeric fields of any length and format (``ts_ms`` of 400 nines, ``1_000``,
Arabic-Indic digits, signs, exponents, non-UTF-8), any number of fields (up to thousands),
fields of any size (past the worker's entry limit), unicode names and values, reply keys
of this model with odd suffixes, foreign keys, or none.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace.client import protocol as P
from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.pipeline import ops
from tests.support.fuzz_cases import REPLY, any_case, examples, valid_fields
from tests.support.worker import WorkerProc, wait_until

KEYS = ModelKeys("headrace", "affine")
PREFIX = KEYS.reply("")
MAX_PAYLOAD = 4096  # the worker's max_payload_bytes: entries past 4096 + 64 KiB are oversize
BUDGET = 1024 * 1024
_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_serial = itertools.count()

numeric = st.one_of(
    st.text("0123456789", min_size=1, max_size=600),
    st.just("9" * 400),
    st.from_regex(r"[+-]?[0-9_]{1,24}", fullmatch=True),
    st.sampled_from(["١٢٣٤٥", "１２３", "1e5", "+7", " 12 ", "0x10", "1_000", "inf", "nan", "-0", "", "１" * 30]),
    st.text(max_size=24),
).map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=24)

names = st.one_of(st.binary(min_size=0, max_size=12), st.text(max_size=12).map(
    lambda s: s.encode("utf-8", "surrogatepass")))


@st.composite
def stream_entry(draw: st.DrawFn) -> dict[bytes, bytes]:
    """A whole entry: a fuzz case, then stream-level mutations."""
    fields = dict(draw(any_case).fields)
    for name in draw(st.lists(st.sampled_from([b"ts_ms", b"deadline_ms", b"v"]), max_size=3, unique=True)):
        fields[name] = draw(numeric)
    shape = draw(st.sampled_from(["plain", "plain", "wide", "big", "unicode", "reply"]))
    if shape == "wide":
        n = draw(st.sampled_from([10, 200, 3000, 5000]))
        fields.update({b"w%d" % i: b"x" for i in range(n)})
    elif shape == "big":
        size = draw(st.sampled_from([MAX_PAYLOAD, 64 * 1024, 70 * 1024, 300 * 1024, 2 * 1024 * 1024]))
        fields[draw(names) or b"pad"] = b"\0" * size
    elif shape == "unicode":
        for _ in range(draw(st.integers(1, 5))):
            fields.setdefault(draw(names), draw(st.text(max_size=40)).encode("utf-8", "surrogatepass"))
    elif shape == "reply":
        suffix = draw(st.text(max_size=20)).encode("utf-8", "surrogatepass")
        fields[b"reply_to"] = draw(st.sampled_from([PREFIX.encode() + suffix, b"elsewhere:" + suffix,
                                                    KEYS.requests.encode(), KEYS.dlq.encode()]))
    if not fields:
        fields[b"x"] = b""  # XADD needs a field; an empty map cannot be sent
    rid = fields.get(b"id")
    if rid is not None and _ID.match(rid):
        fields[b"id"] = b"s%d" % next(_serial)  # valid ids unique across the run: no dedupe between cases
    return fields


@dataclass
class Ledger:
    """What was sent and what came back, over the whole run."""

    sent: dict[str, bytes | None] = field(default_factory=dict)  # entry id -> request id (valid ones)
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Served:
    r: redis.Redis
    worker: WorkerProc
    base_rss_kb: int
    ledger: Ledger
    probes: Iterator[int]


def _kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("fuzz-stream")
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        worker = WorkerProc(server.url, folder / "worker.log", "--block-ms", "50", "--lease-s", "2",
                            "--max-wait-ms", "2", "--max-payload-bytes", str(MAX_PAYLOAD),
                            "--memory-budget-bytes", str(BUDGET), "--consumer", "fuzz")
        try:
            wait_until(lambda: b"fuzz" in (r.hget("headrace:models", "affine") or b""), timeout_s=30)
            s = Served(r, worker, _kb(worker.proc.pid, "VmRSS"), Ledger(), itertools.count())
            yield s
            report = os.environ.get("HEADRACE_FUZZ_REPORT")
            if report:
                peak_mb = (_kb(worker.proc.pid, "VmHWM") - s.base_rss_kb) / 1024
                with open(report, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"layer": "stream", "sent": len(s.ledger.sent), "outcomes": s.ledger.outcomes, "rss_growth_mb": round(peak_mb)}) + "\n")
        finally:
            worker.kill()
            r.close()


def _results(r: redis.Redis) -> dict[bytes, list[P.Result]]:
    out: dict[bytes, list[P.Result]] = {}
    for key in r.scan_iter(match=PREFIX.encode() + b"*", count=1000):
        if r.type(key) != b"stream":
            continue
        for _id, f in r.xrange(key):
            res = P.decode_result(f)
            out.setdefault(res.request_id.encode(), []).append(res)
    return out


def _settled(r: redis.Redis) -> bool:
    (group,) = [g for g in r.xinfo_groups(KEYS.requests) if g["name"] == KEYS.group.encode()]
    return int(group["pending"]) == 0 and (group["lag"] == 0 or group["lag"] is None and
                                           r.xlen(KEYS.requests) == 0)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("HEADRACE_FUZZ_RANDOM", "") == "")
@given(st.lists(stream_entry(), min_size=1, max_size=6))
def test_every_entry_is_answered_or_dead_lettered_and_the_worker_keeps_serving(served: Served,
                                                                                entries: list[dict[bytes, bytes]]) -> None:
    r, ledger = served.r, served.ledger
    pipe = r.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(KEYS.requests, fields)  # type: ignore[arg-type]
    ids = [x.decode() for x in pipe.execute()]
    for eid, fields in zip(ids, entries, strict=True):
        rid = fields.get(b"id")
        ledger.sent[eid] = rid if rid is not None and _ID.match(rid) else None
    wait_until(lambda: _settled(r), timeout_s=60)
    assert served.worker.alive, served.worker.log()[-3000:]

    letters = [f for _i, f in r.xrange(KEYS.dlq) if ops.DLQ_ENTRY_ID in f]
    dead = Counter(f[ops.DLQ_ENTRY_ID].decode() for f in letters)
    dead_codes = {f[ops.DLQ_ENTRY_ID].decode(): f[ops.DLQ_CODE].decode() for f in letters}
    results = _results(r)
    for eid in ids:
        rid = ledger.sent[eid]
        answered = results.get(rid, []) if rid is not None else []
        assert dead[eid] <= 1 and len(answered) <= 1, (eid, rid, dead[eid], answered)
        assert dead[eid] or answered, f"entry {eid} (request {rid!r}) was neither answered nor dead-lettered"
        ledger.outcomes[f"dlq:{dead_codes[eid]}" if dead[eid] else (answered[0].code or "ok")] += 1

    probe = f"probe{next(served.probes)}"
    r.xadd(KEYS.requests, valid_fields(probe))  # type: ignore[arg-type]
    wait_until(lambda: probe.encode() in _results(r), timeout_s=30)
    assert _results(r)[probe.encode()][0].ok, "the worker still answers a normal request"
    peak_mb = (_kb(served.worker.proc.pid, "VmHWM") - served.base_rss_kb) / 1024
    assert peak_mb < 200, f"worker memory grew by {peak_mb:.0f} MB"


def test_the_fuzzed_worker_survived_and_the_ledger_counted_every_entry(served: Served) -> None:
    # Runs after the property (same module fixture).
    assert served.worker.alive and sum(served.ledger.outcomes.values()) == len(served.ledger.sent) > 0
    assert REPLY.startswith(PREFIX), "the fuzz cases answer to this model's reply streams"
