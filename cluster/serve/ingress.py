"""HTTP ingress on Ray Serve: ``POST /v1/models/{model}/infer`` through the same stream.

``GET /v1/models`` lists the registered models and ``GET /v1/models/{model}`` returns one
model's KServe-v2-style metadata (:mod:`headrace.cluster.serve.metadata`), both read from
the workers' registry in Redis (API keys apply to them too).

HTTP-only clients share the batching of every other producer: the ingress enqueues each
request into the model's stream with the SDK (:class:`~headrace.client.aio.AsyncClient`,
submit function included) and waits for the result on the caller's own reply stream.
Nothing is computed here, so the ingress is light and model-agnostic (one app serves every
model). What a call does is :class:`~headrace.cluster.serve.gateway.Gateway`; this module
is only the web layer, and it never lets the framework answer for it (no 422 of its own,
no 500 for a bad body).

Status codes (body ``{"code": <wire code>, "message": ...}``, header ``X-Request-Id``):

    200  ok
    400  the request is malformed for the model (decode_error, missing_field, bad_dtype,
         bad_shape, bad_value)
    401  unauthorized (API keys are configured and none valid was sent)
    404  unknown_model (no worker registered the model, or not a model name)
    413  payload_too_large (the body, the text, a tensor or the number of inputs)
    415  decode_error: the Content-Type is not JSON
    429  queue_full (the model's backlog reached max_backlog, or this replica's call table
         is full; retry later)
    500  model_error / max_deliveries_exceeded / internal_error
    503  Redis unreachable
    504  deadline_exceeded (no result within timeout_s, or it expired before running)

OpenAPI docs: ``/docs`` (Swagger UI) and ``/openapi.json``.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime.
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from headrace.client import errors as E
from headrace.client.optional import require
from headrace.client.protocol import WIRE_DTYPES
from headrace.cluster.serve.args import IngressArgs
from headrace.cluster.serve.gateway import Answer, Gateway, http_status

__all__ = ["IngressDeployment", "create_api", "http_status"]

# ray.serve imports fastapi itself: one check names the extra that brings both.
require("ray.serve", "ray", purpose="the HTTP ingress")
from fastapi import FastAPI, Path, Request  # noqa: E402 - after the check above
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from ray import serve  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

log = logging.getLogger(__name__)


class TensorJSON(BaseModel):
    """A tensor in JSON: ``data`` is the flat (C-order) list of values."""

    dtype: str = Field("float32", description=f"one of {sorted(WIRE_DTYPES)}")
    shape: list[int] = Field(..., description="per-sample shape (no batch dimension)")
    data: list[Any] = Field(..., description="flat list of shape-product values")


class InferBody(BaseModel):
    """One sample: ``text`` for text models, or named ``inputs``. An input may be a
    :class:`TensorJSON` or a bare (nested) list, taken as float32. (Documentation only: the
    body is parsed by :mod:`headrace.cluster.serve.http_body`.)"""

    text: str | None = None
    inputs: dict[str, TensorJSON | list[Any]] | None = None
    timeout_s: float | None = Field(None, gt=0, description="wait at most this long (default: server's)")


class InferResponse(BaseModel):
    id: str
    model: str
    version: str
    outputs: dict[str, TensorJSON]
    timings: dict[str, Any]


class ErrorBody(BaseModel):
    code: str
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 413, 415, 429, 500, 503, 504)}
_HEADERS = {
    "Authorization": "Bearer <API key> (or X-API-Key), when the ingress has API keys",
    "Idempotency-Key": "retry key, 1-128 printable ASCII; authenticated callers only",
}


def _json(answer: Answer) -> JSONResponse:
    return JSONResponse(status_code=answer.status, content=answer.content, headers=answer.headers)


async def read_body(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, at most ``limit`` bytes of it, and whether it was longer (then the rest is
    not read: a huge body never sits in memory)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
    return b"".join(chunks), False


def create_api(gateway: Callable[[], Gateway]) -> FastAPI:
    """The FastAPI app of the ingress; ``gateway()`` returns the replica's :class:`Gateway`,
    closed when the app shuts down (its SDK clients stop reading before the loop ends)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        try:
            gw = gateway()
        except RuntimeError:
            return  # never started
        await gw.close()

    api = FastAPI(title="headrace", version="1", lifespan=lifespan,
                  description="Batched inference over Redis Streams. Requests share the model's queue and batches "
                              "with every other producer.")

    @api.exception_handler(StarletteHTTPException)
    async def framework_errors(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors come from the framework, not the gateway: they keep the documented
        # body ({code, message}) every other answer has, not {"detail": ...}.
        code = E.UNKNOWN_MODEL if exc.status_code == 404 else E.DECODE_ERROR
        what = "no such route" if exc.status_code == 404 else str(exc.detail).lower()
        return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                            content={"code": code, "message": f"{what}: {request.method} {request.url.path} (routes: "
                                                              "GET /v1/models, GET /v1/models/{model}, "
                                                              "POST /v1/models/{model}/infer, GET /healthz)"})

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", responses=_ERRORS)
    async def models(request: Request) -> JSONResponse:
        """Models with a registered worker: ``models`` (names) and ``index`` (live versions,
        ready, live workers per model)."""
        return _json(await gateway().models(request.headers))

    @api.get("/v1/models/{model}", responses=_ERRORS)
    async def model_metadata(request: Request, model: str = Path(..., description="served model name"),
                             version: str | None = None) -> JSONResponse:
        """KServe-v2-style metadata of ``model`` from the workers' registry: versions served,
        platform, inputs/outputs (datatype, shape with -1 on the batch axis, per-request
        shape), text or tensors, batching limit, classifier labels."""
        return _json(await gateway().model_metadata(model, version, request.headers))

    @api.post("/v1/models/{model}/infer", response_model=InferResponse, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": InferBody.model_json_schema()}}},
                  "parameters": [{"name": k, "in": "header", "required": False, "description": v,
                                  "schema": {"type": "string"}} for k, v in _HEADERS.items()]})
    async def infer(request: Request,
                    model: str = Path(..., description="served model name, e.g. minilm")) -> JSONResponse:
        """Enqueue one sample for ``model`` and wait for its result."""
        gw = gateway()
        body, too_large = await read_body(request, gw.args.max_body_bytes)
        return _json(await gw.infer(model, body, request.headers, body_too_large=too_large))

    return api


class _Current:
    """The replica's gateway (one Serve replica is one process)."""

    gateway: Gateway | None = None

    @classmethod
    def get(cls) -> Gateway:
        if cls.gateway is None:
            raise RuntimeError("the ingress deployment has not started")
        return cls.gateway


api = create_api(_Current.get)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class IngressDeployment:
    """The HTTP ingress replica.

    Args:
        args: :class:`~headrace.cluster.serve.args.IngressArgs` as a dict.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self.gateway = _Current.gateway = Gateway(IngressArgs.from_dict(args))

    async def __del__(self) -> None:
        await self.gateway.close()
