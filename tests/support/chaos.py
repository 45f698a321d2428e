"""Chaos-test machinery: real worker processes, a steady-load producer, and an
exactly-once ledger.

* :class:`Fleet` starts ``python -m headrace.workers --fake affine`` processes (env knobs such
  as ``HEADRACE_FAKE_DELAY_MS``) and SIGKILLs / SIGTERMs / replaces them.
* :class:`SteadyProducer` XADDs affine requests at a fixed rate from a thread. An XADD that
  raised is *uncertain* (Redis may or may not have it): the producer re-sends the same
  request id until one is acknowledged, as the protocol tells producers to.
* :class:`Ledger` reads the reply streams from the start, never skipping an entry, and keeps
  every result, so a duplicate cannot hide. :meth:`Ledger.report` compares them with what
  was sent: lost, duplicated, wrong (not equal to a direct run of the model) and unexpected.

Used by ``tests/chaos`` and by ``benchmarks/soak.py`` (which puts this folder on sys.path).
Redis observation (group state, worker registry, :class:`Sampler`) lives in
:mod:`tests.support.chaos_observe` and is re-exported here, so importers need only this module.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from headrace.client.keys import ModelKeys
from headrace.client.protocol import Envelope, Request, Result, decode_result, encode_request
from headrace.workers.backends.fake import affine_reference
from tests.support.chaos_observe import MODEL as MODEL
from tests.support.chaos_observe import NS as NS
from tests.support.chaos_observe import Sampler as Sampler
from tests.support.chaos_observe import count_keys as count_keys
from tests.support.chaos_observe import group_state as group_state
from tests.support.chaos_observe import registered_workers as registered_workers
from tests.support.chaos_observe import wait_nothing_pending as wait_nothing_pending
from tests.support.chaos_observe import wait_until as wait_until
from tests.support.procs import WorkerProc

log = logging.getLogger("headrace.chaos")


def value_of(i: int) -> float:
    """The input value of request number ``i`` (distinct per i modulo 4093, float32-exact)."""
    return float(i % 4093) / 4.0


def affine_fields(rid: str, value: float, reply_to: str) -> dict[bytes, bytes]:
    return encode_request(Request(Envelope(rid, reply_to), inputs={"x": np.full(4, value, np.float32)}))


# --- workers ---------------------------------------------------------------------------------


class Fleet:
    """Worker processes of one test; every one still running is killed on :meth:`close`.

    Args:
        url: Redis URL.
        folder: where logs (``<name>.log``) and the fake's run record (``runs.txt``) go.
        args: ``python -m headrace.workers`` flags shared by all workers.
        env: ``HEADRACE_*`` variables shared by all workers (``HEADRACE_FAKE_RECORD`` is set).
    """

    def __init__(self, url: str, folder: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.url, self.folder, self.args = url, folder, list(args)
        self.record = folder / "runs.txt"
        self.env = {"HEADRACE_FAKE_RECORD": str(self.record), **(env or {})}
        self.procs: list[WorkerProc] = []
        self._names = itertools.count()
        self.kills = 0
        self.exit_codes: list[int] = []

    def spawn(self, *extra: str, env: dict[str, str] | None = None, name: str | None = None) -> WorkerProc:
        name = name or f"w{next(self._names)}"
        p = WorkerProc(self.url, self.folder / f"{name}.log", "--consumer", name, *self.args, *extra, fake=MODEL,
                       env={"HEADRACE_LOG_LEVEL": "WARNING", **self.env, **(env or {})}, name=name)
        self.procs.append(p)
        return p

    def alive(self) -> list[WorkerProc]:
        return [p for p in self.procs if p.alive]

    def sigkill(self, p: WorkerProc) -> None:
        p.signal(signal.SIGKILL)
        self.exit_codes.append(p.wait(10))
        self.kills += 1

    def stop(self, p: WorkerProc, timeout_s: float = 30.0) -> int:
        p.signal(signal.SIGTERM)
        code = p.wait(timeout_s)
        self.exit_codes.append(code)
        return code

    def stop_all(self, timeout_s: float = 30.0) -> list[int]:
        live = self.alive()
        for p in live:
            p.signal(signal.SIGTERM)
        codes = [p.wait(timeout_s) for p in live]
        self.exit_codes += codes
        return codes

    def runs(self) -> Counter[str]:
        """How many times the model ran each request id (from the fakes' O_APPEND record)."""
        return Counter(self.record.read_text().split()) if self.record.exists() else Counter()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-3000:]}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            if p.alive:
                p.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            elif not p._log.closed:
                p._log.close()


@contextlib.contextmanager
def fleet(url: str, folder: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> Iterator[Fleet]:
    f = Fleet(url, folder, args, env)
    try:
        yield f
    finally:
        f.close()


# --- producer --------------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    """What the producer knows about one request."""

    value: float
    acked: bool = False  # Redis returned an entry id for (one of) its XADD(s)
    attempts: int = 0


class SteadyProducer(threading.Thread):
    """XADD ``total`` affine requests at ``rate_per_s`` (ids ``<prefix><i>``), spread over
    ``reply_streams``. Connection errors are retried with backoff, re-sending the same id.

    ``garbage_every``: every n-th entry is an undecodable body (still routable), answered
    with ``decode_error``; ``poison_every`` / ``poison_value``: every n-th request carries
    the fake's poison input.
    """

    def __init__(self, url: str, total: int, rate_per_s: float, *, prefix: str = "p", reply_streams: int = 2,
                 garbage_every: int = 0, poison_every: int = 0, poison_value: float = -1.0,
                 client: str = "ledger", pipeline: int = 1, deadline_s: float = 0.0) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.url, self.total, self.rate, self.prefix = url, total, rate_per_s, prefix
        self.pipeline = max(1, pipeline)
        self.deadline_s = deadline_s  # stop sending after this long (0 = until total)
        self.keys = ModelKeys(NS, MODEL)
        self.replies = [self.keys.reply(f"{client}{k}") for k in range(reply_streams)]
        self.garbage_every, self.poison_every, self.poison_value = garbage_every, poison_every, poison_value
        self.sent: dict[str, Sent] = {}
        self.garbage: set[str] = set()
        self.poison: set[str] = set()
        self.errors = 0
        self.resent = 0
        self._halt = threading.Event()
        self.done = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def fields(self, i: int) -> tuple[str, float, dict[bytes, bytes]]:
        """Request number ``i``: its id, input value (NaN for garbage) and entry fields."""
        rid = f"{self.prefix}{i}"
        reply = self.replies[i % len(self.replies)]
        if self.garbage_every and i % self.garbage_every == self.garbage_every - 1:
            self.garbage.add(rid)
            return rid, float("nan"), {b"v": b"1", b"id": rid.encode(), b"reply_to": reply.encode(),
                                       b"body": b"\xc1garbage"}
        value = value_of(i)
        if self.poison_every and i % self.poison_every == self.poison_every - 1:
            self.poison.add(rid)
            value = self.poison_value
        return rid, value, affine_fields(rid, value, reply)

    def acked_ids(self) -> set[str]:
        """Ids whose XADD Redis acknowledged: each must get exactly one result."""
        return {rid for rid, s in self.sent.items() if s.acked}

    def run(self) -> None:
        r = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        start = time.monotonic()
        try:
            for first in range(0, self.total, self.pipeline):
                if self._halt.is_set() or (self.deadline_s and time.monotonic() - start > self.deadline_s):
                    break
                lag = start + first / self.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
                chunk = []
                for i in range(first, min(first + self.pipeline, self.total)):
                    rid, value, fields = self.fields(i)
                    chunk.append((self.sent.setdefault(rid, Sent(value)), fields))
                self._send(r, chunk)
        finally:
            r.close()
            self.done.set()

    def _send(self, r: redis.Redis, chunk: list[tuple[Sent, dict[bytes, bytes]]]) -> None:
        backoff = 0.05
        while not self._halt.is_set():
            for entry, _ in chunk:
                entry.attempts += 1
            try:
                if len(chunk) == 1:
                    r.xadd(self.keys.requests, chunk[0][1])  # type: ignore[arg-type]
                else:
                    pipe = r.pipeline(transaction=False)
                    for _, fields in chunk:
                        pipe.xadd(self.keys.requests, fields)  # type: ignore[arg-type]
                    pipe.execute()
                for entry, _ in chunk:
                    entry.acked = True
                return
            except redis.RedisError as e:
                # Uncertain: the entries may be in (written, reply lost) or not. Re-send the
                # same ids; the workers' dedupe answers each id once.
                self.errors += 1
                self.resent += len(chunk)
                log.info("XADD of %d failed (%s); re-sending in %.2fs", len(chunk), e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def expected(self, rid: str) -> np.ndarray[Any, Any]:
        return affine_reference(np.full(4, self.sent[rid].value, np.float32))


# --- ledger ----------------------------------------------------------------------------------


@dataclass
class Report:
    """Exactly-once accounting of one run (counts of request ids, except ``results``)."""

    sent: int
    answered: int
    lost: list[str]
    duplicated: dict[str, int]
    wrong: list[str]
    unexpected: list[str]
    results: int
    codes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong or self.unexpected)

    def line(self) -> str:
        return (f"sent={self.sent} answered={self.answered} lost={len(self.lost)} "
                f"duplicated={len(self.duplicated)} wrong={len(self.wrong)} unexpected={len(self.unexpected)} "
                f"results={self.results} codes={dict(self.codes)}")


class Ledger(threading.Thread):
    """Reads reply streams from ``0-0`` with blocking XREAD, reconnecting with backoff.

    Args:
        delete: XDEL consumed entries, as the SDK does (keeps reply streams small).
        keep: keep every :class:`Result` (duplicates included) for :meth:`report`; with
            ``keep=False`` (long soak runs) only per-id counts, codes and a correctness bit
            decided on arrival by ``check(rid, result)`` are kept.
    """

    def __init__(self, url: str, streams: Sequence[str], *, delete: bool = False, keep: bool = True,
                 check: Callable[[str, Result], bool] | None = None) -> None:
        super().__init__(name="ledger", daemon=True)
        self.url, self.delete, self.keep, self.check = url, delete, keep, check
        self.cursors = {s: "0-0" for s in streams}
        self.results: dict[str, list[Result]] = {}
        self.counts: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.bad: set[str] = set()
        self.count = 0
        self.reconnects = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def _take(self, res: Result) -> None:
        with self._lock:
            rid = res.request_id
            if self.keep:
                self.results.setdefault(rid, []).append(res)
            elif self.counts[rid] == 0 and self.check is not None and not self.check(rid, res):
                self.bad.add(rid)
            self.counts[rid] += 1
            self.codes[res.code or res.status] += 1
            self.count += 1

    def run(self) -> None:
        r: redis.Redis | None = None
        backoff = 0.05
        while not self._halt.is_set():
            try:
                if r is None:
                    r = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
                resp: Any = r.xread(self.cursors, count=2000, block=200)  # type: ignore[arg-type]
                backoff = 0.05
            except redis.RedisError as e:
                self.reconnects += 1
                log.info("ledger lost Redis (%s); retrying in %.2fs", e, backoff)
                if r is not None:
                    r.close()
                r = None
                self._halt.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            for stream_raw, entries in resp or []:
                stream = stream_raw.decode()
                ids = []
                for eid, fields in entries:
                    self._take(decode_result(fields))
                    ids.append(eid)
                self.cursors[stream] = ids[-1].decode()
                if self.delete and ids:
                    with contextlib.suppress(redis.RedisError):
                        r.xdel(stream, *ids)  # type: ignore[union-attr]
        if r is not None:
            r.close()

    def answered(self) -> int:
        with self._lock:
            return len(self.counts)

    def wait_for(self, ids: set[str] | int, timeout_s: float = 60.0) -> None:
        """Until every id in ``ids`` (or that many ids) has a result."""
        if isinstance(ids, int):
            wait_until(lambda: self.answered() >= ids, timeout_s, what=f"{ids} answers (have {self.answered()})")
            return

        def done() -> bool:
            with self._lock:
                return ids <= self.counts.keys()

        wait_until(done, timeout_s, what=f"{len(ids)} answers (have {self.answered()})")

    def report(self, producer: SteadyProducer, *, check: Callable[[str, Result], bool] | None = None) -> Report:
        """Compare results with what ``producer`` got acknowledged.

        ``check(rid, result)`` decides whether a (first) result is right; by default: an
        ``ok`` result equal to a direct run of the affine model, ``decode_error`` for
        garbage entries. Ignored with ``keep=False`` (checked on arrival instead).
        """
        check = check or default_check(producer)
        with self._lock:
            counts = Counter(self.counts)
            results = {k: v[0] for k, v in self.results.items()}
            bad = set(self.bad)
            codes = Counter(self.codes)
        if self.keep:
            bad = {k for k, res in results.items() if k in producer.sent and not check(k, res)}
        sent = producer.acked_ids()
        return Report(
            sent=len(sent), answered=len(sent & counts.keys()), lost=sorted(sent - counts.keys()),
            duplicated={k: n for k, n in counts.items() if n > 1}, wrong=sorted(bad),
            unexpected=sorted(counts.keys() - producer.sent.keys()), results=sum(counts.values()), codes=codes)


def default_check(producer: SteadyProducer) -> Callable[[str, Result], bool]:
    """Right answers for :class:`SteadyProducer` requests: the affine model's output
    (compared exactly), ``decode_error`` for its garbage entries."""

    def check(rid: str, res: Result) -> bool:
        if rid in producer.garbage:
            return res.code == "decode_error"
        sent = producer.sent.get(rid)
        return (sent is not None and res.ok
                and np.array_equal(res.outputs["y"], affine_reference(np.full(4, sent.value, np.float32))))

    return check


def random_victim(fleet_: Fleet, rng: random.Random) -> Any:
    live = fleet_.alive()
    return rng.choice(live) if live else None
