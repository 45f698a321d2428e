"""What the HTTP ingress does for one call, without the web framework: authenticate, parse,
enqueue, wait, answer; and keep callers apart.

Isolation, the rules an HTTP caller can rely on:

* Every call gets a request id chosen here (128 random bits): the id on the wire, the
  dedupe key, and the ``X-Request-Id`` of the answer. A caller cannot pick another's id.
* A retry key is accepted only from an authenticated caller (``Idempotency-Key`` header)
  and only within that caller: the wire id is an HMAC of the key under the caller's API-key
  digest, so two callers' keys never meet, and nobody without the caller's key can compute
  the id. Concurrent calls with one key share one run; an answer is kept
  ``idempotency_ttl_s`` for retries that reach the same replica.
* Each caller has its own SDK client and so its own reply stream
  (``<ns>:{<model>}:reply:ingress-<replica>-<caller>``): results of one caller never pass
  through another's stream.
* The table of calls is bounded (``max_tickets``): a call that times out is forgotten at once
  (its request is released; a late result is dropped), idempotent ones after their TTL; when
  the table is full of calls in flight, new calls get 429.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from headrace.client import errors as E
from headrace.client.config import validate_model_name
from headrace.client.keys import registry_key
from headrace.client.protocol import STATUS_EXPIRED, Result
from headrace.client.submit import new_request_id
from headrace.client.tickets import Ticket
from headrace.client.wire import dtype_name
from headrace.cluster.serve.args import IngressArgs
from headrace.cluster.serve.auth import ApiKeys, Caller
from headrace.cluster.serve.http_body import InferCall, check_content_type, parse_body

log = logging.getLogger(__name__)

UNAUTHORIZED: Final = "unauthorized"
"""HTTP-only error code: no valid API key (status 401)."""
_IDEMPOTENCY_RE = re.compile(r"[\x21-\x7e]{1,128}")
_INLINE_PARSE_BYTES: Final = 64 * 1024

_STATUS: Final = {
    E.DECODE_ERROR: 400, E.MISSING_FIELD: 400, E.BAD_DTYPE: 400, E.BAD_SHAPE: 400, E.BAD_VALUE: 400,
    E.UNSUPPORTED_VERSION: 400, E.CONFIG_ERROR: 400, UNAUTHORIZED: 401, E.UNKNOWN_MODEL: 404,
    E.PAYLOAD_TOO_LARGE: 413, E.QUEUE_FULL: 429, E.MODEL_ERROR: 500, E.MAX_DELIVERIES: 500,
    E.INTERNAL_ERROR: 500, E.DEADLINE_EXCEEDED: 504,
}


def http_status(code: str) -> int:
    """HTTP status for a wire error code (500 for codes this version does not know)."""
    return _STATUS.get(code, 500)


@dataclass
class Answer:
    """An HTTP answer: status, JSON content, extra headers."""

    status: int
    content: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_answer(code: str, message: str, request_id: str = "", status: int | None = None) -> Answer:
    headers = {"x-request-id": request_id} if request_id else {}
    if code == UNAUTHORIZED:
        headers["www-authenticate"] = "Bearer"
    return Answer(status or http_status(code), {"code": code, "message": message}, headers)


@dataclass
class _Call:
    """One call's entry. ``ready`` is set once the submit ended: with ``ticket`` when it was
    enqueued, else with the ``refused`` answer. Concurrent calls of one idempotency key wait
    on the first one's entry instead of submitting the same id twice."""

    forget: Any = None  # the owning client's forget(ticket)
    ticket: Ticket | None = None
    refused: Answer | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float | None = None  # monotonic time of eviction; None while in flight


class CallTable:
    """Calls of one replica by request id, at most ``capacity`` of them.

    In-flight calls stay until they end. Idempotent calls stay ``ttl_s`` after they end (a
    retry joins or reads them), others leave at once; an entry that leaves is forgotten by
    its client, so neither its request nor a late result is held any longer. Every
    operation is O(1) amortised: kept entries expire in the order they ended.
    """

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity, self.ttl_s = capacity, ttl_s
        self._live: dict[str, _Call] = {}
        self._kept: collections.OrderedDict[str, _Call] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._live) + len(self._kept)

    def get(self, rid: str) -> _Call | None:
        self._evict(time.monotonic())
        return self._live.get(rid) or self._kept.get(rid)

    def add(self, rid: str, call: _Call) -> bool:
        """Track ``call`` (in flight); False when the table is full of calls in flight."""
        self._evict(time.monotonic())
        while len(self) >= self.capacity and self._kept:
            self._forget(self._kept.popitem(last=False)[1])  # make room from the oldest kept
        if len(self) >= self.capacity:
            return False
        self._live[rid] = call
        return True

    def end(self, rid: str, keep: bool) -> None:
        """The call ``rid`` was answered or gave up: keep it ``ttl_s`` (idempotent) or drop it."""
        call = self._live.pop(rid, None)
        if call is None:
            return  # a joiner of an idempotent call ended after the first one
        if keep:
            call.expires = time.monotonic() + self.ttl_s
            self._kept[rid] = call
        else:
            self._forget(call)

    def clear(self) -> None:
        for call in [*self._live.values(), *self._kept.values()]:
            self._forget(call)
        self._live.clear()
        self._kept.clear()

    def _evict(self, now: float) -> None:
        while self._kept:
            rid, call = next(iter(self._kept.items()))
            if call.expires is None or call.expires > now:
                return
            del self._kept[rid]
            self._forget(call)

    @staticmethod
    def _forget(call: _Call) -> None:
        if call.ticket is not None and call.forget is not None:
            call.forget(call.ticket)


class Gateway:
    """The ingress logic of one replica (see module doc).

    Args:
        args: an ``IngressArgs`` (redis_url, namespace, timeout_s, max_backlog, api_keys,
            max_tickets, idempotency_ttl_s, require_registered).
        env: environment for ``HEADRACE_INGRESS_API_KEYS`` (None: ``os.environ``).

    Raises:
        ConfigError: malformed API keys.
    """

    def __init__(self, args: IngressArgs, env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.keys = ApiKeys(args.api_keys, env)
        self.tag = os.urandom(4).hex()
        self.calls = CallTable(args.max_tickets, args.idempotency_ttl_s)
        self._clients: dict[str, Any] = {}
        self._redis: Any = None

    def client_id(self, caller: Caller) -> str:
        return f"ingress-{self.tag}-{caller.name}"

    def _client(self, caller: Caller) -> Any:
        # Created on first use, inside the serving event loop (asyncio objects bind to it).
        client = self._clients.get(caller.name)
        if client is None:
            from headrace.client.aio import AsyncClient

            # The SDK refuses a model no worker ever registered (unknown_model, 404) when
            # require_registered is on, from its cached registry read.
            client = self._clients[caller.name] = AsyncClient(
                self.args.effective_redis_url, namespace=self.args.namespace, client_id=self.client_id(caller),
                max_backlog=self.args.max_backlog, timeout_s=self.args.timeout_s,
                require_registered=self.args.require_registered)
        return client

    def redis(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(self.args.effective_redis_url)
        return self._redis

    def authenticate(self, headers: Mapping[str, str]) -> Caller | Answer:
        caller = self.keys.authenticate(headers)
        if caller is None:
            return error_answer(UNAUTHORIZED, "send a valid API key: 'Authorization: Bearer <key>' or "
                                              "'X-API-Key: <key>'")
        return caller

    async def models(self, headers: Mapping[str, str]) -> Answer:
        """Models with a registered worker: ``models`` (names) and ``index`` (live versions,
        ready, live workers per model)."""
        from headrace.client.registry import decode_registry, server_ms
        from headrace.cluster.serve.metadata import models_index

        who = self.authenticate(headers)
        if isinstance(who, Answer):
            return who
        try:
            pipe = self.redis().pipeline(transaction=False)
            pipe.hgetall(registry_key(self.args.namespace))
            pipe.time()
            raw, now = await pipe.execute()
        except Exception as e:  # noqa: BLE001 - redis.asyncio raises RedisError and OSError subclasses
            return error_answer(E.INTERNAL_ERROR, f"Redis: {e}", status=503)
        index = models_index(decode_registry(raw), server_ms(now))
        return Answer(200, {"models": [row["name"] for row in index], "index": index})

    async def model_metadata(self, model: str, version: str | None, headers: Mapping[str, str]) -> Answer:
        """KServe-v2-style metadata of ``model`` from the workers' registry
        (:mod:`headrace.cluster.serve.metadata`)."""
        from headrace.cluster.serve.metadata import model_metadata

        who = self.authenticate(headers)
        if isinstance(who, Answer):
            return who
        try:
            validate_model_name(model)
            return Answer(200, model_metadata(await self._client(who).describe(model), version=version))
        except E.ConfigError as e:
            return error_answer(E.UNKNOWN_MODEL, f"no model {model[:130]!r}: {e.message}")
        except E.BrokerError as e:
            return error_answer(e.code, e.message, status=503)
        except E.HeadraceError as e:
            return error_answer(E.UNKNOWN_MODEL if isinstance(e, E.ModelNotFoundError) else e.code, e.message)

    async def infer(self, model: str, body: bytes, headers: Mapping[str, str], *,
                    body_too_large: bool = False) -> Answer:
        """One ``POST /v1/models/{model}/infer``.

        Args:
            body: the raw request body (at most ``max_body_bytes`` of it).
            body_too_large: the body was longer than ``max_body_bytes`` (answer 413).
        """
        who = self.authenticate(headers)
        if isinstance(who, Answer):
            return who
        try:
            check_content_type(headers.get("content-type"))
        except E.HeadraceError as e:
            return error_answer(e.code, e.message, status=415)
        if body_too_large:
            return error_answer(E.PAYLOAD_TOO_LARGE, f"the body exceeds max_body_bytes={self.args.max_body_bytes}")
        try:
            validate_model_name(model)
            # A big JSON body takes a while to parse and check: not on the serving loop.
            call = parse_body(body) if len(body) < _INLINE_PARSE_BYTES else await asyncio.to_thread(parse_body, body)
        except E.ConfigError as e:
            return error_answer(E.UNKNOWN_MODEL, f"no model {model[:130]!r}: {e.message}")
        except E.HeadraceError as e:
            return error_answer(e.code, e.message)
        try:
            return await self._run(who, model, call, headers.get("idempotency-key"))
        except Exception as e:  # noqa: BLE001 - a bug here must still answer, and in our format
            log.exception("ingress call for %s failed", model)
            return error_answer(E.INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    def request_id(self, caller: Caller, model: str, idempotency_key: str | None) -> str:
        """A fresh random id, or the caller-scoped id of ``idempotency_key``.

        Raises:
            DecodeError: a key from an anonymous caller, or a malformed key.
        """
        if idempotency_key is None:
            return new_request_id()
        if not caller.authenticated:
            raise E.DecodeError("Idempotency-Key needs API-key authentication: only an authenticated caller's "
                                "keys can be kept apart from everyone else's")
        if not _IDEMPOTENCY_RE.fullmatch(idempotency_key):
            raise E.DecodeError("Idempotency-Key must be 1-128 printable ASCII characters")
        msg = "\0".join((self.args.namespace, model, idempotency_key)).encode()
        return "idem-" + hmac.new(caller.secret, msg, hashlib.sha256).hexdigest()[:40]

    async def _run(self, caller: Caller, model: str, call: InferCall, idempotency_key: str | None) -> Answer:
        try:
            rid = self.request_id(caller, model, idempotency_key)
        except E.HeadraceError as e:
            return error_answer(e.code, e.message)
        timeout_s = min(call.timeout_s or self.args.timeout_s, self.args.timeout_s)
        entry = self.calls.get(rid)
        if entry is None:
            entry = _Call()
            if not self.calls.add(rid, entry):
                return error_answer(E.QUEUE_FULL, f"this ingress replica has {self.calls.capacity} calls in "
                                                  "flight; retry later", rid)
            try:
                refused = await self._submit(caller, model, call, rid, timeout_s, entry)
            except BaseException:  # cancelled (the HTTP caller went away): leave no live entry
                self.calls.end(rid, keep=False)
                raise
            if refused is not None:
                self.calls.end(rid, keep=False)
                return refused
        else:
            await entry.ready.wait()
            if entry.ticket is None:
                return entry.refused or error_answer(E.INTERNAL_ERROR, "the first call of this key failed", rid)
        assert entry.ticket is not None
        try:
            res: Result = await entry.ticket.wait(timeout_s + 1.0)
        except E.ResultTimeout as e:
            return error_answer(E.DEADLINE_EXCEEDED, e.message, rid)
        except E.RequestCancelled as e:  # an idempotent call evicted while a late joiner waited
            return error_answer(E.DEADLINE_EXCEEDED, e.message, rid)
        finally:
            self.calls.end(rid, keep=idempotency_key is not None)
        return self._answer(model, rid, res)

    async def _submit(self, caller: Caller, model: str, call: InferCall, rid: str, timeout_s: float,
                      entry: _Call) -> Answer | None:
        """Enqueue the call; fill ``entry`` and wake its joiners. Returns the refusal, if any."""
        client = self._client(caller)
        entry.forget = client.forget
        try:
            # The deadline makes workers answer 'expired' instead of running a request
            # whose HTTP caller already got its 504.
            entry.ticket = await client.submit(model, call.inputs or None, call.text, request_id=rid,
                                               deadline_s=timeout_s)
        except E.QueueFull as e:
            entry.refused = error_answer(E.QUEUE_FULL, e.message, rid)
        except E.BrokerError as e:
            entry.refused = error_answer(e.code, e.message, rid, status=503)
        except E.HeadraceError as e:
            entry.refused = error_answer(e.code, e.message, rid)
        finally:
            entry.ready.set()
        return entry.refused

    @staticmethod
    def _answer(model: str, rid: str, res: Result) -> Answer:
        if not res.ok:
            code = E.DEADLINE_EXCEEDED if res.status == STATUS_EXPIRED else (res.code or E.INTERNAL_ERROR)
            return error_answer(code, res.message or res.status, rid)
        outputs = {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
                   for k, v in res.outputs.items()}
        return Answer(200, {"id": rid, "model": res.model or model, "version": res.version, "outputs": outputs,
                            "timings": res.timings.to_wire()}, {"x-request-id": rid})

    async def close(self) -> None:
        self.calls.clear()
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.close()
        if self._redis is not None:
            r, self._redis = self._redis, None
            await r.aclose()
