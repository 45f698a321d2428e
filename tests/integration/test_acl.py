"""Redis ACL users for producers and workers (rules from docs/security.md, run verbatim).

A real worker runs as the worker user and two SDK clients as producer users; everything
works end to end, the worker's whole loop (reads, results, dead letters, trimming,
heartbeats, cleanup) triggers no ACL denial, and a producer can neither read another
client's results nor the dead-letter stream, nor the requests of others.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import affine_reference, make_fake
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import wait_until

ROOT = Path(__file__).resolve().parents[2]
NS = "headrace"
POISON = -1.0


def acl_lines() -> list[str]:
    """The ``ACL SETUSER`` lines of docs/security.md (between the acl-rules markers)."""
    doc = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- acl-rules.*?```text\n(.*?)```", doc, flags=re.S)
    assert block, "docs/security.md lost its acl-rules block"
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("ACL SETUSER ") for ln in lines)
    return lines


def tokens(line: str) -> list[str]:
    """Split an ACL line into arguments; a ``( ... )`` selector is one argument."""
    out: list[str] = []
    depth, cur = 0, ""
    for ch in line:
        if ch == " " and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur:
        out.append(cur)
    return out


def create_user(admin: redis.Redis, role: str, password: str, client: str = "") -> str:
    line = next(ln for ln in acl_lines() if f"headrace-{role}" in ln)
    line = line.replace("<ns>", NS).replace("<client>", client).replace("<password>", password)
    args = tokens(line)
    assert admin.execute_command(*args) in (b"OK", "OK", True)
    return args[2]  # the user name


def url_for(base_url: str, user: str, password: str) -> str:
    return base_url.replace("redis://", f"redis://{user}:{password}@", 1)


def denials(admin: redis.Redis, user: str) -> list[dict[Any, Any]]:
    """ACL LOG entries of ``user``, except redis-py's optional CLIENT SETINFO on connect
    (Redis >= 7.2 only; see docs/security.md)."""
    entries = admin.execute_command("ACL", "LOG", "128")
    out = []
    for e in entries:
        d = dict(zip(e[::2], e[1::2], strict=True)) if isinstance(e, list) else e
        name = d.get(b"username", d.get("username"))
        if name in (user, user.encode()) and d.get(b"object") != b"client|setinfo":
            out.append(d)
    return out


@pytest.fixture
def acl(redis_url: str) -> Iterator[dict[str, str]]:
    """Worker user + producers 'alice' and 'bob' on the session Redis; dropped afterwards."""
    admin = redis.Redis.from_url(redis_url)
    pw = uuid.uuid4().hex
    users = {"worker": create_user(admin, "worker", pw),
             "alice": create_user(admin, "producer", pw, "alice"),
             "bob": create_user(admin, "producer", pw, "bob")}
    admin.execute_command("ACL", "LOG", "RESET")
    yield {role: url_for(redis_url, user, pw) for role, user in users.items()} | {
        f"{role}_user": user for role, user in users.items()}
    admin.execute_command("ACL", "DELUSER", *users.values())
    admin.close()


@pytest.fixture
def worker(acl: dict[str, str]) -> Iterator[WorkerThread]:
    s = WorkerSettings(model="affine", redis_url=acl["worker"], namespace=NS, consumer="acl-worker", block_ms=100,
                       max_wait_ms=2, lease_s=1.0, max_deliveries=1, trim_interval_s=0.2, drain_timeout_s=5)
    wt = WorkerThread(s, make_fake("affine", poison=POISON)).start()
    yield wt
    wt.stop()


@pytest.mark.timeout(60)
def test_worker_and_producer_users_serve_end_to_end_without_any_denial(
        redis_url: str, acl: dict[str, str], worker: WorkerThread) -> None:
    admin = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, "affine")
    with Client(acl["alice"], client_id="alice") as alice, Client(acl["bob"], client_id="bob") as bob:
        xs = [np.full(4, float(i), np.float32) for i in range(20)]
        ta = [alice.submit("affine", {"x": x}) for x in xs]
        tb = [bob.submit("affine", {"x": x}) for x in xs]
        for t, x in [*zip(ta, xs, strict=True), *zip(tb, xs, strict=True)]:
            res = t.result(20).raise_for_status()
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(x))
        # A poison request dead-letters at once (max_deliveries=1) and alice is told.
        poisoned = alice.infer("affine", {"x": np.full(4, POISON, np.float32)}, timeout_s=20, raise_on_error=False)
        assert poisoned.code == "max_deliveries_exceeded"
    assert admin.xlen(keys.dlq) == 1
    # Let the maintenance loop trim and heartbeat under the worker user.
    wait_until(lambda: worker.stats().get("trimmed", 0) > 0)
    wait_until(lambda: admin.hget(f"{NS}:models", "affine"))
    assert worker.healthy()
    worker.stop()  # a clean exit unregisters and deletes its consumer: those rights too
    assert b"acl-worker" not in [c["name"] for c in admin.xinfo_consumers(keys.requests, "workers")]
    assert denials(admin, acl["worker_user"]) == [], "the worker user lacks a permission it uses"
    # The producers' only refusal is the optional CLIENT UNBLOCK (the SDK falls back to
    # its block timeout); nothing they need is refused.
    for who in ("alice_user", "bob_user"):
        refused = {(d.get(b"object") or b"").decode() for d in denials(admin, acl[who])}
        assert refused <= {"client|unblock"}, refused


@pytest.mark.timeout(60)
def test_producer_cannot_read_other_clients_results_the_dlq_or_other_requests(
        redis_url: str, acl: dict[str, str], worker: WorkerThread) -> None:
    keys = ModelKeys(NS, "affine")
    admin = redis.Redis.from_url(redis_url)
    with Client(acl["bob"], client_id="bob") as bob_client:
        # Leave bob's result unread in his stream: a client that stopped reading.
        bob_ticket = bob_client.submit("affine", {"x": np.ones(4, np.float32)})
        bob_client.result(bob_ticket, 20)
    # (bob's client deleted what it consumed; put a result there as a worker would.)
    admin.xadd(keys.reply("bob"), {b"v": b"1", b"id": b"secret", b"status": b"ok", b"body": b"\x80"})
    admin.xadd(keys.dlq, {b"id": b"dead", b"dlq_reason": b"test"})
    admin.set(keys.done("secret"), b"1")

    alice = redis.Redis.from_url(acl["alice"])
    refused: list[tuple[Any, ...]] = [
        ("XRANGE", keys.reply("bob"), "-", "+"),
        ("XREAD", "STREAMS", keys.reply("bob"), "0"),
        ("XREAD", "STREAMS", keys.reply("alice"), keys.reply("bob"), "0", "0"),  # one own key is not enough
        ("XREVRANGE", keys.reply("bob"), "+", "-"),
        ("XINFO", "STREAM", keys.reply("bob")),
        ("EVAL", "return redis.call('XRANGE', KEYS[1], '-', '+')", 1, keys.reply("bob")),
        ("EVAL", "return redis.call('XRANGE', KEYS[1], '-', '+')", 1, keys.requests),
        ("XRANGE", keys.dlq, "-", "+"),
        ("XREAD", "STREAMS", keys.dlq, "0"),
        ("XLEN", keys.dlq),
        ("XADD", keys.dlq, "*", "f", "v"),
        ("XRANGE", keys.requests, "-", "+"),
        ("XREAD", "STREAMS", keys.requests, "0"),
        ("XREADGROUP", "GROUP", "workers", "alice", "STREAMS", keys.requests, ">"),
        ("XAUTOCLAIM", keys.requests, "workers", "alice", "0", "0-0"),
        ("XACK", keys.requests, "workers", "0-1"),
        ("XDEL", keys.requests, "0-1"),
        ("XTRIM", keys.requests, "MAXLEN", "0"),
        ("GET", keys.done("secret")),
        ("EXISTS", keys.done("secret")),
        ("XADD", keys.reply("bob"), "*", "f", "v"),
        ("DEL", keys.reply("bob")),
        ("HGETALL", f"{NS}:models"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("CLIENT", "UNBLOCK", "1"),
        ("CONFIG", "GET", "*"),
    ]
    for cmd in refused:
        # NoPermissionError, or (for a command refused inside a script) the script's error.
        with pytest.raises(redis.exceptions.ResponseError, match="no permissions|can't run this command"):
            alice.execute_command(*cmd)
    # Alice's own rights still work: her reply stream, and XADD to the request stream.
    assert alice.xread({keys.reply("alice"): "0"}) == []
    assert alice.xadd(keys.requests, {b"v": b"1", b"id": b"x1", b"reply_to": keys.reply("alice").encode(),
                                      b"body": b"\x81\xa4text\xa1x"})
    # Bob's data is untouched by everything alice tried.
    assert admin.xlen(keys.reply("bob")) == 1 and admin.exists(keys.done("secret"))
    assert [d.get(b"reason") for d in denials(admin, acl["alice_user"])]  # the refusals were logged
    alice.close()
