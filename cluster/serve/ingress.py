"""HTTP ingress on Ray Serve: ``POST /v1/models/{model}/infer`` through the same stream.

``GET /v1/models`` lists the registered models and ``GET /v1/models/{model}`` returns one
model's KServe-v2-style metadata (:mod:`headrace.cluster.serve.metadata`), both read from
the workers' registry in Redis.

HTTP-only clients share the batching of every other producer: the ingress enqueues each
request into the model's stream with the SDK (:class:`~headrace.client.aio.AsyncClient`,
backpressure script included) and waits for the result on its own reply stream. Nothing
is computed here, so the ingress is light and model-agnostic (one app serves every model).

Status codes (body ``{"code": <wire code>, "message": ...}``):

    200  ok
    400  the request is malformed for the model (decode_error, missing_field, bad_dtype,
         bad_shape, bad_value, unsupported_version)
    404  unknown_model (no worker registered the model)
    413  payload_too_large
    429  queue_full (the model's backlog reached max_backlog; retry later)
    500  model_error / internal_error
    503  Redis unreachable
    504  deadline_exceeded (no result within timeout_s, or it expired before running)

OpenAPI docs: ``/docs`` (Swagger UI) and ``/openapi.json``.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime, and through Serve's ingress wrapper string annotations do not resolve (the body
# model would be taken for a query parameter).
import logging
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.optional import require
from headrace.client.protocol import DTYPES, Result
from headrace.cluster.serve.args import IngressArgs

# ray.serve imports fastapi itself: one check names the extra that brings both.
require("ray.serve", "ray", purpose="the HTTP ingress")
from fastapi import FastAPI, Path  # noqa: E402 - after the check above
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from ray import serve  # noqa: E402

log = logging.getLogger(__name__)

_STATUS = {
    E.DECODE_ERROR: 400, E.MISSING_FIELD: 400, E.BAD_DTYPE: 400, E.BAD_SHAPE: 400, E.BAD_VALUE: 400,
    E.UNSUPPORTED_VERSION: 400, E.UNKNOWN_MODEL: 404, E.PAYLOAD_TOO_LARGE: 413, E.QUEUE_FULL: 429,
    E.MODEL_ERROR: 500, E.MAX_DELIVERIES: 500, E.INTERNAL_ERROR: 500, E.DEADLINE_EXCEEDED: 504,
    E.CONFIG_ERROR: 400,
}


def http_status(code: str) -> int:
    """HTTP status for a wire error code (500 for codes this version does not know)."""
    return _STATUS.get(code, 500)


class TensorJSON(BaseModel):
    """A tensor in JSON: ``data`` is the flat (C-order) list of values."""

    dtype: str = Field("float32", description=f"one of {sorted(DTYPES)}")
    shape: list[int] = Field(..., description="per-sample shape (no batch dimension)")
    data: list[Any] = Field(..., description="flat list of shape-product values")


class InferBody(BaseModel):
    """One sample: ``text`` for text models, or named ``inputs``. An input may be a
    :class:`TensorJSON` or a bare (nested) list, taken as float32."""

    text: str | None = None
    inputs: dict[str, TensorJSON | list[Any]] | None = None
    request_id: str | None = Field(None, description="idempotency key, 1-128 chars of [A-Za-z0-9._:-]")
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


def decode_inputs(inputs: dict[str, TensorJSON | list[Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """JSON inputs -> arrays.

    Raises:
        InvalidTensorError: unknown dtype (``bad_dtype``), or data that does not fit the shape
            (``bad_shape``) or the dtype (``bad_value``).
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, t in inputs.items():
        if isinstance(t, list):
            try:
                out[name] = np.asarray(t, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise E.InvalidTensorError(f"input {name!r} is not a rectangular list of numbers: {e}",
                                           code=E.BAD_VALUE) from e
            continue
        if t.dtype not in DTYPES:
            raise E.InvalidTensorError(f"input {name!r}: dtype {t.dtype!r} is not one of {sorted(DTYPES)}",
                                       code=E.BAD_DTYPE)
        try:
            arr = np.asarray(t.data, dtype=np.dtype(t.dtype))
        except (TypeError, ValueError, OverflowError) as e:
            raise E.InvalidTensorError(f"input {name!r}: data does not fit dtype {t.dtype}: {e}",
                                       code=E.BAD_VALUE) from e
        if arr.ndim != 1 or arr.size != int(np.prod(t.shape, dtype=np.int64)):
            raise E.InvalidTensorError(f"input {name!r}: {arr.size} flat values do not fill shape {t.shape}",
                                       code=E.BAD_SHAPE)
        out[name] = arr.reshape(t.shape)
    return out


def encode_outputs(res: Result) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": v.dtype.name, "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for k, v in res.outputs.items()}


def error_response(code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=http_status(code), content={"code": code, "message": message})


api = FastAPI(
    title="headrace",
    description="Batched inference over Redis Streams. Requests share the model's queue and batches "
                "with every other producer.",
    version="1",
)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class IngressDeployment:
    """The HTTP ingress replica.

    Args:
        args: :class:`~headrace.cluster.serve.app.IngressArgs` as a dict.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = IngressArgs.from_dict(args)
        self._client: Any = None
        self._redis: Any = None

    def _clients(self) -> tuple[Any, Any]:
        # Created on first use, inside the replica's event loop (asyncio objects bind to it).
        if self._client is None:
            import redis.asyncio as aioredis

            from headrace.client.aio import AsyncClient

            self._client = AsyncClient(self.args.effective_redis_url, namespace=self.args.namespace,
                                       max_backlog=self.args.max_backlog, timeout_s=self.args.timeout_s,
                                       require_registered=self.args.require_registered)
            self._redis = aioredis.Redis.from_url(self.args.effective_redis_url)
        return self._client, self._redis

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        """Models with a registered worker: ``models`` (names) and ``index`` (live versions,
        ready, live workers per model)."""
        from headrace.client.keys import registry_key
        from headrace.client.registry import decode_registry, server_ms
        from headrace.cluster.serve.metadata import models_index

        _, r = self._clients()
        try:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(registry_key(self.args.namespace))
            pipe.time()
            raw, now = await pipe.execute()
        except Exception as e:  # noqa: BLE001 - redis.asyncio raises RedisError and OSError subclasses
            return JSONResponse(status_code=503, content={"code": E.INTERNAL_ERROR, "message": f"Redis: {e}"})
        index = models_index(decode_registry(raw), server_ms(now))
        return JSONResponse(content={"models": [row["name"] for row in index], "index": index})

    @api.get("/v1/models/{model}", responses={404: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    async def model_metadata(self, model: str = Path(..., description="served model name"),
                             version: str | None = None) -> JSONResponse:
        """KServe-v2-style metadata of ``model`` from the workers' registry: versions served,
        platform, inputs/outputs (datatype, shape with -1 on the batch axis, per-request
        shape), text or tensors, batching limit, classifier labels."""
        from headrace.cluster.serve.metadata import model_metadata

        client, _ = self._clients()
        try:
            return JSONResponse(content=model_metadata(await client.describe(model), version=version))
        except E.BrokerError as e:
            return JSONResponse(status_code=503, content={"code": e.code, "message": e.message})
        except E.HeadraceError as e:
            return error_response(E.UNKNOWN_MODEL if isinstance(e, E.ModelNotFoundError) else e.code, e.message)

    @api.post("/v1/models/{model}/infer", response_model=InferResponse,
              responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody},
                         429: {"model": ErrorBody}, 500: {"model": ErrorBody}, 503: {"model": ErrorBody},
                         504: {"model": ErrorBody}})
    async def infer(self, body: InferBody,
                    model: str = Path(..., description="served model name, e.g. minilm")) -> Any:
        """Enqueue one sample for ``model`` and wait for its result."""
        from headrace.client.keys import registry_key

        client, r = self._clients()
        timeout_s = min(body.timeout_s or self.args.timeout_s, self.args.timeout_s)
        try:
            if (body.text is None) == (body.inputs is None):
                raise E.MissingFieldError("send exactly one of 'text' and 'inputs'")
            inputs = decode_inputs(body.inputs) if body.inputs is not None else None
            if self.args.require_registered:
                try:
                    known = await r.hexists(registry_key(self.args.namespace), model)
                except Exception as e:  # noqa: BLE001 - any Redis failure is a 503 below
                    raise E.BrokerError(f"Redis unreachable: {e}") from e
                if not known:
                    raise E.ModelNotFoundError(f"no worker serves model {model!r}")
            # The deadline makes workers answer 'expired' instead of running a request
            # whose HTTP caller already got its 504.
            ticket = await client.submit(model, inputs, body.text, request_id=body.request_id,
                                         deadline_s=timeout_s)
            res: Result = await client.result(ticket, timeout_s=timeout_s + 1.0)
        except E.ResultTimeout as e:
            return error_response(E.DEADLINE_EXCEEDED, str(e.message))
        except E.BrokerError as e:
            if isinstance(e, E.QueueFull):
                return error_response(E.QUEUE_FULL, e.message)
            return JSONResponse(status_code=503, content={"code": e.code, "message": e.message})
        except E.HeadraceError as e:
            return error_response(e.code, e.message)
        if not res.ok:
            code = E.DEADLINE_EXCEEDED if res.status == "expired" else (res.code or E.INTERNAL_ERROR)
            return error_response(code, res.message or res.status)
        return {"id": res.request_id, "model": res.model or model, "version": res.version,
                "outputs": encode_outputs(res), "timings": res.timings.to_wire()}

    async def __del__(self) -> None:
        client, r = self._client, self._redis
        self._client = self._redis = None
        if client is not None:
            await client.close()
        if r is not None:
            await r.aclose()
