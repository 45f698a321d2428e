"""The SDK Client against a real private Redis with in-process fake workers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import Client, InferenceFailed, QueueFull, RequestExpired, ResultTimeout
from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker, wait_until
from tests.support.worker import queued, queued_requests

pytestmark = pytest.mark.timeout(60)

StartWorker = Callable[..., Any]


@pytest.fixture
def start_worker(redis_url: str) -> Iterator[StartWorker]:
    started: list[Any] = []

    def start(kind: str = "affine", model: str | None = None, url: str | None = None) -> Any:
        w = start_fake_worker(url or redis_url, kind, model or kind)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url, reply_block_ms=200, timeout_s=15, require_registered=False) as c:
        yield c


def test_infer_returns_numpy_outputs_and_timings(client: Client, start_worker: StartWorker, redis_url: str) -> None:
    start_worker("affine")
    x = np.array([0.5, -1.0, 2.0, 3.25], np.float32)
    res = client.infer("affine", {"x": x})
    assert res.ok and res.model == "affine"
    np.testing.assert_array_equal(res.outputs["y"], affine_reference(x))
    assert isinstance(res.outputs["y"], np.ndarray) and res.outputs["y"].dtype == np.float32
    assert res.timings.batch_size >= 1 and res.timings.worker
    r = redis.Redis.from_url(redis_url)
    # consumed reply entries are deleted by the reader
    assert wait_until(lambda: r.xlen(client.reply_stream("affine")) == 0)
    assert client.outstanding() == []


def test_text_model_and_two_models_on_one_client(client: Client, start_worker: StartWorker) -> None:
    start_worker("affine")
    start_worker("length")
    t1 = client.submit("affine", affine_inputs(1))
    t2 = client.submit("length", text="héllo wörld")   # a second reply stream joins the reader
    assert client.reply_stream("length").endswith(f":reply:{client.client_id}")
    assert "{length}" in client.reply_stream("length")
    assert int(t2.result().outputs["length"][0]) == len("héllo wörld")
    np.testing.assert_array_equal(t1.result().outputs["y"], affine_reference(affine_inputs(1)["x"]))


def test_requests_submitted_before_any_worker_are_served(client: Client, start_worker: StartWorker,
                                                        redis_url: str) -> None:
    tickets = [client.submit("affine", affine_inputs(i)) for i in range(5)]
    r = redis.Redis.from_url(redis_url)
    # Producers never create consumer groups (docs/security.md); the first worker creates
    # the group at id 0, so it still gets every entry added before it started.
    assert not r.exists(client.model_keys("affine").requests)  # no group, no stream yet: all in the inbox
    assert queued(r, client.model_keys("affine")) == 5
    start_worker("affine")
    results = client.collect(tickets)
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


def test_queue_full_enqueues_nothing(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    with Client(redis_url, max_backlog=3, require_registered=False) as c:
        for i in range(3):
            c.submit("affine", affine_inputs(i))
        with pytest.raises(QueueFull) as info:
            c.submit("affine", affine_inputs(9), request_id="refused-1")
        assert info.value.code == E.QUEUE_FULL
        assert queued(r, c.model_keys("affine")) == 3
        ids = {P.decode_request(f).request_id for f in queued_requests(r, c.model_keys("affine"))}
        assert "refused-1" not in ids
        assert len(c.outstanding()) == 3  # the refused ticket is not tracked


def test_backpressure_holds_under_concurrent_producers(redis_url: str) -> None:
    """The check and the XADD are one script: many producers never overshoot the limit."""
    limit, threads, per_thread = 25, 8, 20
    accepted: list[int] = []
    refused: list[int] = []
    barrier = threading.Barrier(threads)

    def produce() -> None:
        with Client(redis_url, max_backlog=limit, require_registered=False) as c:
            barrier.wait()
            ok = no = 0
            for i in range(per_thread):
                try:
                    c.submit("affine", affine_inputs(i))
                    ok += 1
                except QueueFull:
                    no += 1
            accepted.append(ok)
            refused.append(no)

    ts = [threading.Thread(target=produce) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    r = redis.Redis.from_url(redis_url)
    assert queued(r, ModelKeys("headrace", "affine")) == limit
    assert sum(accepted) == limit and sum(refused) == threads * per_thread - limit


def test_result_timeout_then_still_collectable(client: Client, start_worker: StartWorker) -> None:
    ticket = client.submit("affine", affine_inputs(3))
    with pytest.raises(ResultTimeout) as info:
        ticket.result(timeout_s=0.2)
    assert ticket.request_id in str(info.value)
    with pytest.raises(ResultTimeout):
        client.collect([ticket], timeout_s=0.1)
    with pytest.raises(ResultTimeout):
        client.infer("affine", affine_inputs(4), timeout_s=0.1)
    start_worker("affine")
    np.testing.assert_array_equal(client.result(ticket, 10).outputs["y"], affine_reference(affine_inputs(3)["x"]))


def test_error_results_raise_with_their_code(client: Client, start_worker: StartWorker) -> None:
    start_worker("affine")
    with pytest.raises(InferenceFailed) as info:
        client.infer("affine", {"x": np.ones(5, np.float32)})
    assert info.value.code == E.BAD_SHAPE
    res = client.infer("affine", {"x": np.ones(4, np.int32)}, raise_on_error=False)
    assert res.status == P.STATUS_ERROR and res.code == E.BAD_DTYPE and not res.outputs
    res = client.infer("affine", {"x": np.array([1, np.nan, 0, 0], np.float32)}, raise_on_error=False)
    assert res.code == E.BAD_VALUE
    # the worker keeps serving after bad requests
    assert client.infer("affine", affine_inputs(0)).ok


def test_expired_request_raises_request_expired(client: Client, start_worker: StartWorker) -> None:
    ticket = client.submit("affine", affine_inputs(0), deadline_s=0.05)
    with pytest.raises(ResultTimeout):
        ticket.result(0.2)  # the deadline passes while no worker runs
    start_worker("affine")
    res = ticket.result(10)
    assert res.status == P.STATUS_EXPIRED and res.code == E.DEADLINE_EXCEEDED
    with pytest.raises(RequestExpired):
        res.raise_for_status()


def test_map_keeps_input_order_and_shows_progress(redis_url: str, start_worker: StartWorker,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    start_worker("affine")
    n = 300
    with Client(redis_url, max_in_flight=16, reply_block_ms=200) as c:
        results = c.map("affine", (affine_inputs(i) for i in range(n)), total=n, progress=True)
        assert len(c.outstanding()) == 0
    assert len(results) == n
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
    err = capsys.readouterr().err
    assert f"{n}/{n}" in err and "affine" in err


def test_map_waits_out_backpressure_and_returns_errors_in_place(redis_url: str, start_worker: StartWorker) -> None:
    start_worker("affine")
    items: list[Any] = [affine_inputs(i) for i in range(60)]
    items[7] = {"x": np.ones(3, np.float32)}  # bad shape, answered with an error in its slot
    with Client(redis_url, max_backlog=4, max_in_flight=32, reply_block_ms=200, timeout_s=20) as c:
        results = c.map("affine", items, progress=False)
        with pytest.raises(InferenceFailed):
            c.map("affine", items[5:9], progress=False, raise_on_error=True)
    assert len(results) == 60
    assert results[7].code == E.BAD_SHAPE
    for i, res in enumerate(results):
        if i != 7:
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


def test_results_yield_as_completed_and_collect_in_order(client: Client, start_worker: StartWorker) -> None:
    start_worker("affine")
    tickets = [client.submit("affine", affine_inputs(i)) for i in range(20)]
    got = {r.request_id for r in client.results(tickets, timeout_s=10)}
    assert got == {t.request_id for t in tickets}
    ordered = client.collect(tickets, timeout_s=1)
    assert [r.request_id for r in ordered] == [t.request_id for t in tickets]


def test_reconnects_after_redis_restart(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    with Client(url, reply_block_ms=200, timeout_s=20, reconnect_backoff_max_s=0.5,
                require_registered=False) as c:
        before = [c.submit("affine", affine_inputs(i)) for i in range(5)]
        assert wait_until(lambda: c._reader_conn_id is not None)  # the reader is connected (in XREAD)
        # crash Redis while the reader is blocked in XREAD; AOF (fsync always) keeps the requests
        private_redis.restart(crash=True, down_s=0.3)
        after = [c.submit("affine", affine_inputs(10 + i)) for i in range(3)]  # NOSCRIPT reload
        worker = start_fake_worker(url, "affine", "affine")
        try:
            results = c.collect(before + after, timeout_s=20)
        finally:
            worker.stop()
        assert c.reconnects >= 1
    xs = [affine_inputs(i)["x"] for i in range(5)] + [affine_inputs(10 + i)["x"] for i in range(3)]
    for res, x in zip(results, xs, strict=True):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(x))


def test_resubmit_after_redis_lost_its_data(tmp_path: Any) -> None:
    with EmbeddedRedis(data_dir=tmp_path, appendonly=False) as server:
        with Client(server.url, reply_block_ms=200, timeout_s=20, reconnect_backoff_max_s=0.5,
                    require_registered=False) as c:
            tickets = [c.submit("affine", affine_inputs(i)) for i in range(3)]
            server.restart()  # no persistence: the requests are gone
            r = redis.Redis.from_url(server.url)
            assert r.exists(c.model_keys("affine").requests) == 0
            assert {t.request_id for t in c.outstanding()} == {t.request_id for t in tickets}
            for t in c.outstanding():
                assert c.resubmit(t) is t
            worker = start_fake_worker(server.url, "affine", "affine")
            try:
                results = c.collect(tickets, timeout_s=20)
                assert c.resubmit(tickets[0]) is tickets[0]  # done: a no-op
            finally:
                worker.stop()
            assert [res.request_id for res in results] == [t.request_id for t in tickets]
            assert all(res.ok for res in results)
            assert queued(r, c.model_keys("affine")) <= 3


def test_acl_user_and_password_in_the_url(tmp_path: Any) -> None:
    acl = ["--user", "alice", "on", ">alice-secret", "~headrace:*", "&*", "+@all"]
    with EmbeddedRedis(data_dir=tmp_path, password="admin-secret", extra_args=acl) as server:
        alice = f"redis://alice:alice-secret@127.0.0.1:{server.port}/0"
        worker = start_fake_worker(server.url, "affine", "affine")
        try:
            with Client(alice, reply_block_ms=200, timeout_s=15) as c:
                assert c.infer("affine", affine_inputs(2)).ok
                admin = redis.Redis.from_url(server.url)
                users = {cl["user"] for cl in admin.client_list()}
                assert "alice" in users
            with Client(f"redis://alice:wrong@127.0.0.1:{server.port}/0") as bad:
                with pytest.raises(E.BrokerError):
                    bad.submit("affine", affine_inputs(0))
            with Client(f"redis://alice:alice-secret@127.0.0.1:{server.port}/0", namespace="other") as denied:
                with pytest.raises(E.BrokerError):  # the ACL allows only headrace:* keys
                    denied.submit("affine", affine_inputs(0))
        finally:
            worker.stop()


def test_request_id_is_the_idempotency_key(client: Client, start_worker: StartWorker, redis_url: str) -> None:
    start_worker("affine")
    first = client.infer("affine", affine_inputs(1), request_id="order-42")
    assert first.ok
    again = client.submit("affine", affine_inputs(1), request_id="order-42")
    r = redis.Redis.from_url(redis_url)

    def consumed() -> bool:
        [g] = r.xinfo_groups(client.model_keys("affine").requests)
        return g["lag"] == 0 and g["pending"] == 0

    assert wait_until(consumed)  # the worker read and acked the duplicate ...
    with pytest.raises(ResultTimeout):
        again.result(0.3)  # ... without a second result
    assert r.xlen(client.reply_stream("affine")) == 0
    assert r.exists("headrace:{affine}:done:order-42") == 1


def test_closed_client_refuses_work(redis_url: str) -> None:
    c = Client(redis_url)
    c.close()
    c.close()
    with pytest.raises(E.HeadraceError, match="closed"):
        c.submit("affine", affine_inputs(0))


@pytest.mark.timeout(30)
def test_stale_lag_over_an_untrimmed_stream_is_repaired_by_the_worker(redis_url: str) -> None:
    """XINFO's lag can be stale and far too large (Redis 7.0 after an AOF rewrite and a
    restart; here set directly with XGROUP SETID ... ENTRIESREAD 0) while the stream still
    holds acknowledged, untrimmed entries, so XLEN does not bound it. The submit script
    cannot tell (producers may not read the stream), so it refuses; the worker's backlog
    reading notices that nothing comes after the last delivered id and repairs the group
    (scripts.REPAIR_LAG), after which producers are served again."""
    import asyncio

    from headrace.client.keys import ModelKeys
    from headrace.workers.broker.redis_broker import RedisBroker
    from headrace.workers.settings import WorkerSettings

    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    r.xgroup_create(keys.requests, keys.group, id="0", mkstream=True)
    for i in range(400):
        r.xadd(keys.requests, {"n": str(i)})
    got = r.xreadgroup(keys.group, "w", {keys.requests: ">"}, count=1000)
    r.xack(keys.requests, keys.group, *[eid for eid, _ in got[0][1]])
    r.execute_command("XGROUP", "SETID", keys.requests, keys.group, "$", "ENTRIESREAD", "0")

    def reported_lag() -> int:
        return int(next(g for g in r.xinfo_groups(keys.requests) if g["name"] == keys.group.encode())["lag"])

    assert reported_lag() == 400 and int(r.xlen(keys.requests)) == 400  # the phantom, untrimmed
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=redis_url, consumer="probe"))

    async def backlog() -> tuple[int, int]:
        try:
            b = await broker.backlog()
            return b.lag, b.pending
        finally:
            await broker.close()

    with Client(redis_url, client_id="ph", max_backlog=300, require_registered=False) as c:
        with pytest.raises(QueueFull):
            c.submit("affine", affine_inputs(1.0))  # before any worker looked: refused
        assert asyncio.run(backlog()) == (0, 0)  # nothing after the last delivered id
        assert reported_lag() == 0  # repaired in Redis, for every reader of XINFO
        assert c.submit("affine", affine_inputs(1.0)).entry_id  # served again
        assert reported_lag() == 0 and r.llen(keys.inbox) == 1  # accepted, waiting in the inbox
        for i in range(300):  # a real backlog is still refused
            r.xadd(keys.requests, {"n": f"more{i}"})
        with pytest.raises(QueueFull):
            c.submit("affine", affine_inputs(1.0))
