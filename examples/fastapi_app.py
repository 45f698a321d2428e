"""A FastAPI app that holds one headrace ``AsyncClient`` for its whole life (the lifespan
handler), with a readiness probe and HTTP errors mapped from the SDK's exceptions.

    HEADRACE_REDIS_URL=redis://127.0.0.1:6379/0 APP_MODEL=minilm uvicorn examples.fastapi_app:app

``GET /ready`` answers 200 while a live worker serves the model (503 otherwise);
``POST /infer`` with ``{"text": "..."}`` runs the model on one text.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from headrace.client import (
    AsyncClient,
    BrokerError,
    InferenceFailed,
    QueueFull,
    RequestExpired,
    ResultTimeout,
    Retry,
    UnavailableError,
    UnknownModel,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One client per process: its reply reader and connection pool serve every request.
    # Redis URL and namespace come from HEADRACE_REDIS_URL / HEADRACE_NAMESPACE.
    async with AsyncClient(timeout_s=10.0, retry=Retry(attempts=3)) as client:
        app.state.headrace = client
        app.state.model = os.environ.get("APP_MODEL", "minilm")
        yield


app = FastAPI(lifespan=lifespan)


class Body(BaseModel):
    text: str


@app.get("/ready")
async def ready(request: Request, response: Response) -> dict[str, Any]:
    """Readiness probe: 200 while a live worker serves the model, else 503."""
    client: AsyncClient = request.app.state.headrace
    try:
        status = await client.model_status(request.app.state.model)
    except BrokerError as e:
        raise HTTPException(503, f"Redis: {e.message}") from e
    if not status.ready:
        response.status_code = 503
    return status.to_dict()


@app.post("/infer")
async def infer(body: Body, request: Request) -> dict[str, Any]:
    client: AsyncClient = request.app.state.headrace
    try:
        # If the HTTP caller goes away, the task is cancelled and so is the request.
        res = await client.infer(request.app.state.model, text=body.text)
    except QueueFull as e:
        raise HTTPException(429, e.message, headers={"Retry-After": str(max(1, round(e.retry_after_s)))}) from e
    except UnknownModel as e:
        raise HTTPException(404, e.message) from e
    except (UnavailableError, BrokerError) as e:
        raise HTTPException(503, e.message) from e
    except (ResultTimeout, RequestExpired) as e:
        raise HTTPException(504, e.message) from e
    except InferenceFailed as e:
        raise HTTPException(400 if e.code.startswith("bad_") else 500, f"[{e.code}] {e.message}") from e
    return {"id": res.request_id, "version": res.version,
            "outputs": {name: value.tolist() for name, value in res.outputs.items()}}
