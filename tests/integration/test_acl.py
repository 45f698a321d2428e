"""Redis ACL users for producers and workers (rules from docs/security.md, run verbatim).

A real worker runs as the worker user and two SDK clients as producer users; everything
works end to end, the worker's whole loop (loading the submit function, reads, results,
dead letters, trimming, heartbeats, cleanup, relaying the inbox) triggers no ACL denial, and
a producer can neither read another client's results nor the dead-letter stream, nor the
requests of others, nor run any of the destructive commands of issue #10: in strict submit
mode a producer holds no XADD at all, only RPUSH onto the inbox, and what it pushes by hand
is checked again by the workers' relay (docs/security.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client.functions import LIBRARY_SOURCE, current_code, ensure_library
from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import affine_reference, make_fake
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.acl import NS, create_user, denials, destructive_commands, fcall, raw_pushes, url_for
from tests.support.worker import wait_until

POISON = -1.0


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
        ("FCALL", "headrace_submit", 3, keys.reply("bob"), keys.limits, keys.inbox, "workers", 0, "v", "1"),
        ("LRANGE", keys.inbox, "0", "-1"),  # the requests of others waiting in the inbox
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
    # Alice's own rights still work: her reply stream, and submitting through the function.
    assert alice.xread({keys.reply("alice"): "0"}) == []
    added, _ = alice.execute_command(*fcall(keys, "x1", keys.reply("alice")))
    assert added == 1
    # Bob's data is untouched by everything alice tried.
    assert admin.xlen(keys.reply("bob")) == 1 and admin.exists(keys.done("secret"))
    assert [d.get(b"reason") for d in denials(admin, acl["alice_user"])]  # the refusals were logged
    alice.close()


@pytest.mark.timeout(90)
def test_producer_cannot_destroy_queued_requests_or_the_submit_path(redis_url: str, acl: dict[str, str]) -> None:
    """The ledger of issue #10: 20 requests of bob queued, every destructive command as
    alice, then a worker: sent 20, answered 20, lost 0, duplicated 0."""
    admin = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, "affine")
    ensure_library(admin)  # what an operator or the first worker does
    admin.xgroup_create(keys.requests, "workers", id="0", mkstream=True)
    with Client(acl["bob"], client_id="bob", timeout_s=30, require_registered=False) as bob:
        xs = [np.full(4, float(i), np.float32) for i in range(20)]
        tickets = [bob.submit("affine", {"x": x}) for x in xs]  # queued: no worker yet
        assert {t.entry_id for t in tickets} == {"inbox"}
        queued = admin.xlen(keys.requests) + admin.llen(keys.inbox)
        alice = redis.Redis.from_url(acl["alice"])
        commands = destructive_commands(keys, "0-1")
        for cmd, refused_by in commands:
            with pytest.raises(redis.exceptions.ResponseError, match=refused_by):
                alice.execute_command(*cmd)
        refused, relayed = raw_pushes(keys)
        for raw in refused + relayed:
            alice.rpush(keys.inbox, raw)  # allowed: harmless (below)
        # Nothing was lost or changed: every queued request, one group, the real function.
        assert queued == 20 and admin.xlen(keys.requests) == 0
        assert admin.llen(keys.inbox) == 20 + len(refused) + len(relayed)
        assert [g["name"] for g in admin.xinfo_groups(keys.requests)] == [b"workers"]
        assert current_code(admin) == LIBRARY_SOURCE
        assert not admin.exists(keys.limits) and not admin.exists(ModelKeys(NS, "length").requests)
        s = WorkerSettings(model="affine", redis_url=acl["worker"], namespace=NS, consumer="acl-worker",
                           block_ms=100, max_wait_ms=2, lease_s=1.0, drain_timeout_s=5)
        wt = WorkerThread(s, make_fake("affine")).start()
        try:
            results = bob.collect(tickets, timeout_s=30)
            wait_until(lambda: admin.xlen(keys.reply("alice")) == len(relayed), 20)
            assert wt.healthy(), "no worker stuck"
        finally:
            wt.stop()
            alice.close()
    for x, res in zip(xs, results, strict=True):
        np.testing.assert_array_equal(res.raise_for_status().outputs["y"], affine_reference(x))
    # The ledger: each of bob's requests answered exactly once (one dedupe marker each), the
    # refused raw pushes dead-lettered as descriptions (no payload), the inbox empty.
    answered = {t.request_id for t in tickets} & {k.decode().rsplit(":", 1)[1]
                                                  for k in admin.scan_iter(match=keys.done("*"))}
    assert len(answered) == 20 and len(set(t.request_id for t in tickets)) == 20
    letters = [f for _, f in admin.xrange(keys.dlq)]
    assert len(letters) == len(refused) and all(f[b"dlq_entry_id"] == b"inbox" for f in letters)
    assert max(len(v) for f in letters for v in f.values()) < 2048, "a dead letter copied a payload"
    answers = {f[b"id"]: f[b"code"] for _, f in admin.xrange(keys.reply("alice"))}
    assert answers == {b"raw-ok": b"", b"raw-bad": b"decode_error"}
    assert admin.llen(keys.inbox) == 0
    duplicated = len(results) - len({r.request_id for r in results})
    assert duplicated == 0 and admin.xlen(keys.reply("bob")) == 0, "a second result for a request"
    print(f"\n{len(commands)} destructive commands refused, {len(refused) + len(relayed)} raw pushes handled; "
          f"ledger: sent 20, answered {len(answered)}, lost {20 - len(answered)}, duplicated {duplicated}")


@pytest.mark.timeout(30)
def test_direct_mode_xadds_only_for_a_producer_the_operator_granted_xadd(
        redis_url: str, acl: dict[str, str]) -> None:
    """Direct mode needs both grants: workers publishing submit_mode=direct, and the
    producer-direct ACL (with XADD). A strict producer keeps going through the inbox."""
    admin = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, "affine")
    ensure_library(admin)
    pw = uuid.uuid4().hex
    carol_user = create_user(admin, "producer-direct", pw, "carol")
    carol = redis.Redis.from_url(url_for(redis_url, carol_user, pw))
    alice = redis.Redis.from_url(acl["alice"])
    try:
        added, where = carol.execute_command(*fcall(keys, "c1", keys.reply("carol")))
        assert (added, where) == (1, b"inbox"), "strict mode (the default): the inbox, XADD grant or not"
        admin.hset(keys.limits, "submit_mode", "direct")  # what workers with --submit-mode direct publish
        added, where = carol.execute_command(*fcall(keys, "c2", keys.reply("carol")))
        assert added == 1 and where != b"inbox" and admin.xlen(keys.requests) == 1
        added, where = alice.execute_command(*fcall(keys, "a1", keys.reply("alice")))
        assert (added, where) == (1, b"inbox"), "a producer without the XADD grant stays strict"
        assert admin.llen(keys.inbox) == 2
        # The trade-off of the grant: the direct producer can trim by hand.
        carol.execute_command("XADD", keys.requests, "MAXLEN", "0", "*", "v", "1")
        assert admin.xlen(keys.requests) == 0
    finally:
        carol.close()
        alice.close()
        admin.execute_command("ACL", "DELUSER", carol_user)


@pytest.mark.timeout(60)
async def test_the_http_ingress_serves_under_its_user_without_any_denial(
        redis_url: str, acl: dict[str, str], worker: WorkerThread) -> None:
    """The ingress logic (no Ray needed) as the documented ingress user: calls of two API-key
    callers, the model list, the registry check; nothing it does is refused."""
    from headrace.cluster.serve.app import IngressArgs
    from headrace.cluster.serve.auth import key_entry
    from headrace.cluster.serve.gateway import Gateway

    admin = redis.Redis.from_url(redis_url)
    pw = uuid.uuid4().hex
    user = create_user(admin, "ingress", pw)
    admin.execute_command("ACL", "LOG", "RESET")
    wait_until(lambda: admin.hget(f"{NS}:models", "affine"))  # the worker registered the model
    keys = (key_entry("web", "k-web"), key_entry("batch", "k-batch"))
    gw = Gateway(IngressArgs(redis_url=url_for(redis_url, user, pw), api_keys=keys, timeout_s=10), env={})
    body = b'{"inputs": {"x": [1.0, 2.0, 3.0, 4.0]}}'
    try:
        for key in ("k-web", "k-batch"):
            headers = {"content-type": "application/json", "x-api-key": key, "idempotency-key": "i-1"}
            ok = await gw.infer("affine", body, headers)
            assert ok.status == 200 and ok.content["outputs"]["y"]["data"] == [3.0, 5.0, 7.0, 9.0]
        listed = await gw.models({"x-api-key": "k-web"})
        assert listed.status == 200 and "affine" in listed.content["models"]
    finally:
        await gw.close()
        admin.execute_command("ACL", "DELUSER", user)
    refused = {(d.get(b"object") or b"").decode() for d in denials(admin, user)}
    assert refused <= {"client|unblock"}, refused
