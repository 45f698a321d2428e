"""The Ray Serve paths headrace is compared with, and load-generator targets for them.

* **Ray Serve asynchronous inference** (:func:`build_celery_app`): a ``@task_consumer``
  deployment with Ray's Celery adapter on the same Redis, one task per request as Ray's
  documentation shows; the handler runs the same servable on that one request.
  :class:`CeleryTarget` enqueues with Celery's ``send_task`` (what the adapter's
  ``enqueue_task_sync`` calls) and waits on the result through the Redis backend's
  pub/sub (quicker than the status polling the docs show, so the comparison favours it).
  Messages and results are msgpack (no pickle), results are the raw float32 bytes.
* **Ray Serve HTTP with** ``@serve.batch`` (:func:`build_http_batch_app`): what a user
  picks for synchronous serving; the batch runs the same servable in a thread (so the
  replica's event loop keeps accepting requests). :class:`HttpTarget` posts the text and
  reads the embedding bytes with aiohttp.

Both deployments load the model exactly like a headrace worker
(:func:`~headrace.workers.backends.load_servable` with the same settings and threads), or
call ``make_servable()`` when one is given: a picklable factory (e.g.
:func:`benchmarks.lib.standin.standin_factory`, the accelerator stand-in), so every system
of a comparison serves the same thing. The factory runs inside the replica, whose Python
path must reach its module (the benchmarks pass the repository root in ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from headrace.cluster.bench.load import Outcome
from headrace.cluster.bench.stats import STATUS_SEND_ERROR, STATUS_TIMEOUT
from headrace.cluster.bench.targets import Payloads

CELERY_TASK = "headrace_bench_embed"
CELERY_SERIALIZATION = {"task_serializer": "msgpack", "result_serializer": "msgpack",
                        "accept_content": ["msgpack"], "result_accept_content": ["msgpack"]}


def _servable(model_repo: str, model: str, version: str, threads: int) -> Any:
    from headrace.workers.backends import load_servable
    from headrace.workers.settings import WorkerSettings

    return load_servable(WorkerSettings.from_env(model=model, version=version, model_repo=model_repo,
                                       intra_op_threads=threads), providers=["CPUExecutionProvider"])


def _embed_one(servable: Any, text: str) -> bytes:
    import numpy as np

    from headrace.client.protocol import Envelope, Request

    out = servable.infer([Request(Envelope(f"b-{uuid.uuid4().hex[:12]}", "bench"), text=text)])[0]
    return bytes(np.asarray(out["embeddings"], dtype=np.float32).tobytes())


# --- Ray Serve asynchronous inference (Celery) --------------------------------------------


def celery_processor_config(redis_url: str, queue: str) -> Any:
    """The ``TaskProcessorConfig`` of the Celery path (broker and results on ``redis_url``)."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    return TaskProcessorConfig(
        queue_name=queue, max_retries=0,
        adapter_config=CeleryAdapterConfig(broker_url=redis_url, backend_url=redis_url,
                                           app_custom_config=dict(CELERY_SERIALIZATION)))


def _factory(make_servable: Callable[[], Any] | None, model_repo: str, model: str, version: str,
             threads: int) -> Callable[[], Any]:
    return make_servable or functools.partial(_servable, model_repo, model, version, threads)


def build_celery_app(redis_url: str, queue: str, *, model_repo: str = "", model: str = "", version: str = "",
                     threads: int = 1, num_replicas: int = 1, max_ongoing_requests: int = 5, num_cpus: float = 1.0,
                     make_servable: Callable[[], Any] | None = None) -> Any:
    """A bound ``@task_consumer`` deployment serving ``CELERY_TASK`` (text -> float32 bytes).

    ``max_ongoing_requests`` is also the Celery worker's thread count (Ray passes it as the
    consumer concurrency); Ray's default is 5. ``make_servable``: see the module doc.
    """
    from ray import serve
    from ray.serve.task_consumer import task_consumer, task_handler

    cfg = celery_processor_config(redis_url, queue)
    factory = _factory(make_servable, model_repo, model, version, threads)

    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus})
    @task_consumer(task_processor_config=cfg)
    class CeleryEmbedder:
        def __init__(self) -> None:
            self.servable = factory()

        @task_handler(name=CELERY_TASK)
        def embed(self, text: str) -> bytes:
            return _embed_one(self.servable, text)

    return CeleryEmbedder.bind()  # type: ignore[attr-defined]


def purge_celery_queue(redis_url: str, queue: str) -> int:
    """Drop tasks still queued (after an overloaded run) so the next system starts clean."""
    from celery import Celery

    app = Celery(queue, broker=redis_url, backend=redis_url)
    try:
        return int(app.control.purge() or 0)
    finally:
        app.close()


class CeleryTarget:
    """Load through Celery: ``send_task`` + blocking ``AsyncResult.get`` from a pool of
    ``threads`` threads, each with its own Celery app (Celery's result consumer is not
    meant to be shared between threads)."""

    def __init__(self, redis_url: str, queue: str, payloads: Payloads, threads: int,
                 name: str = "ray-celery") -> None:
        self.redis_url, self.queue, self.payloads, self.name = redis_url, queue, payloads, name
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="bench-celery")
        self._local = threading.local()
        self._apps: list[Any] = []
        self._lock = threading.Lock()

    def _app(self) -> Any:
        app = getattr(self._local, "app", None)
        if app is None:
            from celery import Celery

            app = Celery(self.queue, broker=self.redis_url, backend=self.redis_url)
            app.conf.update(CELERY_SERIALIZATION)
            self._local.app = app
            with self._lock:
                self._apps.append(app)
        return app

    def _call(self, text: str, timeout_s: float) -> Outcome:
        from celery.exceptions import TimeoutError as CeleryTimeout

        app = self._app()
        try:
            res = app.send_task(CELERY_TASK, args=[text], queue=self.queue)
        except Exception as e:  # noqa: BLE001 - kombu/redis errors: the request was not sent
            return Outcome(STATUS_SEND_ERROR, type(e).__name__)
        try:
            res.get(timeout=timeout_s, interval=0.005, propagate=True)
            done = time.perf_counter()
        except CeleryTimeout:
            return Outcome(STATUS_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - the task failed remotely
            return Outcome("error", type(e).__name__)
        try:
            res.forget()  # keep the result backend from growing over a long run
        except Exception:  # noqa: BLE001 - forgetting is housekeeping only
            pass
        return Outcome("ok", done_s=done)

    async def call(self, index: int, timeout_s: float) -> Outcome:
        _inputs, text = self.payloads.item(index)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, text or "", timeout_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for app in self._apps:
            try:
                app.close()
            except Exception:  # noqa: BLE001 - closing connections on the way out
                pass


# --- Ray Serve HTTP with @serve.batch -------------------------------------------------------


def build_http_batch_app(*, model_repo: str = "", model: str = "", version: str = "", threads: int = 1,
                         max_batch: int = 32, max_wait_ms: float = 5.0, max_ongoing_requests: int = 256,
                         num_replicas: int = 1, num_cpus: float = 1.0,
                         make_servable: Callable[[], Any] | None = None) -> Any:
    """A bound HTTP deployment: ``POST`` text -> float32 embedding bytes, batched by
    ``@serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)``.
    ``max_ongoing_requests`` must exceed ``max_batch`` or batches never fill.
    ``make_servable``: see the module doc."""
    from ray import serve
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import Response

    factory = _factory(make_servable, model_repo, model, version, threads)

    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus})
    class BatchedEmbedder:
        def __init__(self) -> None:
            self.servable = factory()
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="infer")

        def _run(self, texts: list[str]) -> list[bytes]:
            import numpy as np

            from headrace.client.protocol import Envelope, Request

            reqs = [Request(Envelope(f"h{i}", "http"), text=t) for i, t in enumerate(texts)]
            outs = self.servable.infer(reqs)
            return [bytes(np.asarray(o["embeddings"], dtype=np.float32).tobytes()) for o in outs]

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def embed(self, texts: list[str]) -> list[bytes]:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, texts)

        async def __call__(self, request: HTTPRequest) -> Response:
            text = (await request.body()).decode("utf-8")
            return Response(await self.embed(text), media_type="application/octet-stream")

    return BatchedEmbedder.bind()  # type: ignore[attr-defined]


class HttpTarget:
    """HTTP load with aiohttp (one connection per request in flight, up to ``max_conns``).
    Use as ``async with HttpTarget(...) as target``."""

    def __init__(self, url: str, payloads: Payloads, max_conns: int = 256, name: str = "ray-http-batch") -> None:
        self.url, self.payloads, self.max_conns, self.name = url, payloads, max_conns, name
        self._session: Any = None

    async def __aenter__(self) -> HttpTarget:
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_conns))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, index: int, timeout_s: float) -> Outcome:
        import aiohttp

        _inputs, text = self.payloads.item(index)
        try:
            async with self._session.post(self.url, data=(text or "").encode("utf-8"),
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                done = time.perf_counter()
                if resp.status != 200:
                    return Outcome("error", f"http_{resp.status}", done_s=done)
                return Outcome("ok", done_s=done)
        except asyncio.TimeoutError:
            return Outcome(STATUS_TIMEOUT)
        except aiohttp.ClientError as e:
            return Outcome(STATUS_SEND_ERROR, type(e).__name__)
