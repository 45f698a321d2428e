"""Clients across os.fork(): a forked child gets its own client id, connections, reader and
ticket book (client/forks.py), so it neither hangs nor steals its siblings' results."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import AsyncClient, Client, HeadraceError, ResultTimeout
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]


@pytest.fixture
def affine_worker(redis_url: str) -> Iterator[Any]:
    w = start_fake_worker(redis_url, "affine", "affine")
    yield w
    w.stop()


def in_child(body: Callable[[int], str]) -> Callable[[int], tuple[int, int]]:
    """A starter that runs ``body(k)`` in a forked child and returns the child's pid and the
    pipe its report (what ``body`` returned, or the exception it raised) comes on."""
    def start(k: int) -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report on the pipe, never return into pytest
            code = 1
            try:
                report = body(k)
                code = 0
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                report = f"{type(e).__name__}: {e}"
            try:
                os.write(w, report.encode())
            finally:
                os._exit(code)
        os.close(w)
        return pid, r
    return start


def reap(started: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """``(exit code, report)`` of each child."""
    out = []
    for pid, fd in started:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        out.append((os.waitstatus_to_exitcode(status), b"".join(chunks).decode()))
    return out


def test_client_used_before_fork_works_in_the_child(redis_url: str, affine_worker: Any) -> None:
    with Client(redis_url, reply_block_ms=200, timeout_s=5) as c:
        c.infer("affine", affine_inputs(0))  # the parent's reader thread runs
        parent_id = c.client_id

        def child(_k: int) -> str:
            res = c.infer("affine", affine_inputs(2), timeout_s=5)
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(2)["x"]))
            assert c.client_id != parent_id
            assert c.reply_stream("affine").endswith(c.client_id)
            return c.client_id

        [(code, report)] = reap([in_child(child)(0)])
        assert code == 0, report
        assert report != parent_id
        # the parent is untouched: same id, its reader still delivers
        assert c.client_id == parent_id and c.infer("affine", affine_inputs(3), timeout_s=5).ok


def test_children_of_one_unused_client_do_not_share_a_reply_stream(redis_url: str, affine_worker: Any) -> None:
    c = Client(redis_url, reply_block_ms=200, timeout_s=5)

    def child(k: int) -> str:
        items = [{"x": np.full(4, i, np.float32)} for i in range(150)]
        res = c.map("affine", items, chunk_size=1, progress=False)
        assert [float(r.outputs["y"][0]) for r in res] == [2.0 * i + 1 for i in range(150)]
        return c.client_id

    reports = reap([in_child(child)(k) for k in range(3)])
    assert all(code == 0 for code, _ in reports), reports
    ids = {report for _, report in reports}
    assert len(ids) == 3 and c.client_id not in ids
    c.close()


def test_a_ticket_of_the_parent_fails_clearly_in_the_child(redis_url: str) -> None:
    with Client(redis_url, reply_block_ms=200, timeout_s=5, require_registered=False) as c:
        ticket = c.submit("noworker", text="pending")  # no worker: stays pending

        def child(_k: int) -> str:
            for wait in (lambda: ticket.result(3), lambda: c.collect([ticket], 3)):
                try:
                    wait()
                except ResultTimeout:
                    return "timed out instead of failing"
                except HeadraceError as e:
                    assert "forked" in str(e), e
            assert c.outstanding() == []  # the child's book starts empty
            # cancelling it there would mark the parent's request skipped: the parent would
            # wait for an answer no worker gives
            assert ticket.cancel() is False
            try:
                ticket.add_done_callback(lambda _t: None)
            except HeadraceError as e:
                assert "forked" in str(e), e
            else:
                return "a callback nothing will call was accepted"
            return "ok"

        [(code, report)] = reap([in_child(child)(0)])
        assert (code, report) == (0, "ok")
        assert c.outstanding() == [ticket] and not ticket.done()
        assert not redis.Redis.from_url(redis_url).keys("*cancel*"), "the child cancelled the parent's request"


def test_async_client_gets_a_new_id_in_the_child(redis_url: str, affine_worker: Any) -> None:
    c = AsyncClient(redis_url, reply_block_ms=200, timeout_s=5)
    parent_id = c.client_id

    async def use() -> str:
        res = await c.infer("affine", affine_inputs(1))
        assert res.ok
        return c.client_id

    assert asyncio.run(use()) == parent_id

    def child(_k: int) -> str:
        return asyncio.run(use())  # the child's client binds to the child's own loop

    [(code, report)] = reap([in_child(child)(0)])
    assert code == 0, report
    assert report != parent_id
    asyncio.run(c.close())  # its loop is gone: closes without IO
