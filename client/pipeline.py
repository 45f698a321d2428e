"""Many submits, few round trips: pipelined ``FCALL`` of the submit function.

Every request is still its own ``FCALL headrace_submit`` (the wire protocol and the
per-request backpressure check do not change); what changes is how many of them share one
round trip to Redis:

* :class:`AutoPipeline` (the :class:`~headrace.client.AsyncClient`): the submits that
  coroutines make during one pass of the event loop are sent together, as one pipeline, in
  the next pass. A closed-loop load generator whose replies arrive in bulk (a worker
  answers a whole batch at once) then costs one round trip per batch instead of one per
  request, and one connection checkout instead of one per request.
* :func:`run_submits` (the thread-based :class:`~headrace.client.Client`'s ``map``): a
  list of commands in one pipeline.

Both answer per command: the function's reply, or the :class:`redis.ResponseError` that
command got (``QueueFull`` and the like stay per request). When the function is not loaded
(a fresh Redis no worker has started on), the client loads it if Redis lets it (no ACL
users) and sends the refused commands again; they had not run, so nothing is added twice.
Producers under the documented ACL may not load it: their commands keep the error, which
:func:`headrace.client.submit.refusal` explains.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import Any, Final

import redis
import redis.asyncio as aioredis

from headrace.client.functions import LIBRARY_SOURCE, function_missing

log = logging.getLogger(__name__)

# Most commands in one pipeline: bounds the memory of one write and the reply parsing that
# one flush does before its callers see an answer.
MAX_PIPELINE: Final = 256

Command = tuple[Any, ...]


def _missing(replies: Sequence[Any]) -> list[int]:
    return [i for i, rep in enumerate(replies) if isinstance(rep, redis.ResponseError) and function_missing(rep)]


def _may_retry(load_error: redis.ResponseError | None) -> bool:
    """After ``FUNCTION LOAD``: whether the library is there now (loaded, or by a racer)."""
    if load_error is None or "already exists" in str(load_error):
        return True
    log.warning("the submit function is not loaded and this client may not load it (%s); start a worker "
                "of the model or run `headrace functions load`", load_error)
    return False


def _load_library(r: redis.Redis) -> redis.ResponseError | None:
    try:
        r.function_load(LIBRARY_SOURCE)
    except redis.ResponseError as e:
        return e
    return None


async def _aload_library(r: aioredis.Redis) -> redis.ResponseError | None:
    try:
        await r.function_load(LIBRARY_SOURCE)
    except redis.ResponseError as e:
        return e
    return None


def run_submits(r: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    """Send ``commands`` (``FCALL headrace_submit``) in one pipeline (more when there are
    over :data:`MAX_PIPELINE`, or the function must be loaded first).

    Returns:
        Per command, in order: the function's reply, or the ``redis.ResponseError`` it got.

    Raises:
        redis.RedisError: Redis failed as a whole (unreachable, connection lost); each
            command may or may not have run.
    """
    replies: list[Any] = []
    for start in range(0, len(commands), MAX_PIPELINE):
        chunk = commands[start:start + MAX_PIPELINE]
        got = _execute_sync(r, chunk)
        retry = _missing(got)
        if retry and _may_retry(_load_library(r)):
            log.info("submit function was not loaded in Redis; loaded it")
            for i, rep in zip(retry, _execute_sync(r, [chunk[i] for i in retry]), strict=True):
                got[i] = rep
        replies += got
    return replies


def _execute_sync(r: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    for cmd in commands:
        pipe.execute_command(*cmd)
    return list(pipe.execute(raise_on_error=False))


class AutoPipeline:
    """Coalesces the submit commands of one event loop into pipelines.

    :meth:`submit` queues a command and returns a future of its reply. One flusher task
    sends everything queued so far as one pipeline (at most ``max_batch`` commands), and
    whatever was queued while that pipeline was on its way as the next one, until the queue
    is empty. One pipeline in flight at a time: Redis runs commands one after the other
    anyway, and the commands that wait for the next pipeline make it bigger, so the
    busier the client, the fewer round trips per request.

    The futures complete with the function's reply, or fail with the ``redis.RedisError`` of
    their command (``ResponseError``) or of the whole pipeline (``ConnectionError`` and the
    like: then every command of that pipeline may or may not have run). A caller whose
    future is cancelled before its pipeline is sent is left out of it (nothing is sent).

    Args:
        r: the client whose connection pool the pipelines use.
        max_batch: most commands in one pipeline.

    Attributes:
        flushes: pipelines sent so far (round trips, not counting retries after loading the
            function).
        commands: commands sent so far.
    """

    def __init__(self, r: aioredis.Redis, *, max_batch: int = MAX_PIPELINE) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._redis = r
        self.max_batch = max_batch
        self._queue: collections.deque[tuple[Command, asyncio.Future[Any]]] = collections.deque()
        # The flusher task while one is scheduled or running; cleared by the flusher itself
        # as it returns (its done callbacks run a pass later, and a submit in between must
        # start a new one). Also the strong reference the event loop does not keep.
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        self.commands = 0

    def submit(self, command: Command) -> asyncio.Future[Any]:
        """Queue ``command``; return a future of its reply (see the class doc).

        Call it from the event loop the futures are awaited on.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, fut))
        if self._flusher is None:
            # Its first step runs in the next pass of the loop: every submit of this pass
            # is queued by then and goes out in the same pipeline.
            task = self._flusher = loop.create_task(self._flush_loop(), name="headrace-submit-pipeline")
            task.add_done_callback(self._flusher_done)
        return fut

    def pending(self) -> int:
        """Commands queued and not sent yet."""
        return len(self._queue)

    async def aclose(self) -> None:
        """Wait until everything queued has been sent and answered."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        if self._flusher is task:
            # It ended without clearing itself: cancelled before its first step (the loop
            # is shutting down), so its body never ran.
            self._flusher = None
            self._fail_queued()

    def _fail_queued(self) -> None:
        # Nobody may be left waiting for a reply that will never come.
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(redis.ConnectionError("the submit pipeline was cancelled"))

    async def _flush_loop(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[Command, asyncio.Future[Any]]] = []
                while self._queue and len(batch) < self.max_batch:
                    item = self._queue.popleft()
                    if not item[1].done():  # a caller cancelled before sending sends nothing
                        batch.append(item)
                if batch:
                    await self._flush(batch)
        except BaseException:
            self._fail_queued()
            raise
        finally:
            self._flusher = None

    async def _flush(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        commands = [cmd for cmd, _ in batch]
        self.flushes += 1
        self.commands += len(commands)
        try:
            replies = await self._execute(commands)
            retry = _missing(replies)
            if retry and _may_retry(await _aload_library(self._redis)):
                log.info("submit function was not loaded in Redis; loaded it")
                again = await self._execute([commands[i] for i in retry])
                for i, rep in zip(retry, again, strict=True):
                    replies[i] = rep
        except Exception as e:  # noqa: BLE001 - handed to every caller of this pipeline
            err = e if isinstance(e, redis.RedisError) else redis.RedisError(f"{type(e).__name__}: {e}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may be left waiting for a reply
            # that will never come.
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(redis.ConnectionError("the submit pipeline was cancelled"))
            raise
        for (_, fut), rep in zip(batch, replies, strict=True):
            if fut.done():
                continue  # the caller was cancelled while its command was on the way
            if isinstance(rep, Exception):
                fut.set_exception(rep)
            else:
                fut.set_result(rep)

    async def _execute(self, commands: Sequence[Command]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for cmd in commands:
            pipe.execute_command(*cmd)
        return list(await pipe.execute(raise_on_error=False))
