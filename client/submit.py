"""Building request entries and enqueueing them with backpressure (the submit function).

Requests go through the Redis Function ``headrace_submit`` (``FCALL``), whose library lives
next to this module in ``submit.lua`` so producers in other languages call the very same
function (see ``docs/protocol.md``); :mod:`headrace.client.functions` loads it.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client import protocol
from headrace.client.config import MAX_DEADLINE_S, ClientSettings
from headrace.client.functions import SUBMIT_FUNCTION, function_missing
from headrace.client.keys import ModelKeys

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


def new_client_id() -> str:
    """A client id unique per process and instance: host, pid and a random suffix."""
    host = re.sub(r"[^A-Za-z0-9.\-]", "-", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def resolve_settings(settings: ClientSettings | None, client_id: str | None, **overrides: Any) -> tuple[ClientSettings, str]:
    """Settings from ``settings`` (or the ``HEADRACE_*`` environment) with non-None
    ``overrides`` applied, and a checked client id.

    Raises:
        ConfigError: an invalid setting or client id.
    """
    if settings is not None and not isinstance(settings, ClientSettings):
        raise E.ConfigError(f"settings must be a headrace.client.ClientSettings (or None for the environment), got "
                            f"{type(settings).__name__} {settings!r}", field="settings")
    given = {k: v for k, v in overrides.items() if v is not None}
    resolved = settings.replace(**given) if settings is not None else ClientSettings.from_env(**given)
    cid = client_id or new_client_id()
    if not _CLIENT_ID_RE.match(cid):
        raise E.ConfigError(f"client_id {cid!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return resolved, cid


def wait_seconds(timeout_s: float | None, default: float, name: str = "timeout_s") -> float:
    """The wait a call's ``timeout_s`` argument asks for (``default`` when None); ``inf``
    waits without limit.

    Raises:
        ConfigError: ``timeout_s`` is not a number, or is nan (which no comparison can use).
    """
    if timeout_s is None:
        return default
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or math.isnan(timeout_s):
        raise E.ConfigError(f"{name}={timeout_s!r} is not a number of seconds; pass seconds >= 0, float('inf') to "
                            "wait without limit, or None for the client's timeout_s", field=name)
    return float(timeout_s)


def thread_timeout(seconds: float) -> float | None:
    """``seconds`` as the timeout of a ``threading``/``concurrent.futures`` wait: None (no
    limit) for ``inf`` or anything beyond ``threading.TIMEOUT_MAX``, where they raise
    ``OverflowError`` instead of waiting."""
    return None if seconds >= threading.TIMEOUT_MAX else seconds


def check_deadline(deadline_s: float) -> float:
    """A request's ``deadline_s`` argument, checked before anything is encoded.

    Raises:
        ConfigError: nan or infinite (``0`` means no deadline).
        ProtocolError: negative, or beyond :data:`MAX_DEADLINE_S` (``bad_value``).
    """
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not math.isfinite(deadline_s):
        raise E.ConfigError(f"deadline_s={deadline_s!r} is not a finite number of seconds; pass seconds > 0, or 0 "
                            "(or None with settings.deadline_s=0) for no deadline", field="deadline_s")
    if deadline_s < 0:
        raise E.ProtocolError(f"deadline_s must be >= 0 seconds, got {deadline_s}", code=E.BAD_VALUE)
    if deadline_s > MAX_DEADLINE_S:
        raise E.ProtocolError(f"deadline_s must be at most {MAX_DEADLINE_S:.0e} seconds (about 31 years), got "
                              f"{deadline_s}; pass 0 for no deadline", code=E.BAD_VALUE)
    return deadline_s


def new_request_id() -> str:
    """A fresh request id: 32 hex characters, 128 bits from the OS CSPRNG (valid under the
    wire id rules, and unguessable: it is the dedupe key). ``os.urandom`` rather than
    ``uuid4().hex``: the same randomness at a sixth of the cost, per request."""
    return os.urandom(16).hex()


@dataclass(frozen=True)
class PreparedRequest:
    """An encoded request, ready to be enqueued (and re-enqueued by ``resubmit``)."""

    model: str
    request_id: str
    stream: str
    reply_to: str
    deadline_ms: int
    fields: Mapping[bytes, bytes]


def prepare_request(keys: ModelKeys, reply_to: str, inputs: Mapping[str, Any] | None, text: str | None, *,
                    request_id: str | None, deadline_s: float) -> PreparedRequest:
    """Encode one request for ``keys.model``.

    Args:
        inputs: named arrays (anything ``np.asarray`` accepts), one sample each.
        text: a text input instead of tensors.
        request_id: caller-chosen id (1-128 chars of ``[A-Za-z0-9._:-]``); None picks one.
        deadline_s: time-to-live in seconds from now; 0 means no deadline.

    Raises:
        ProtocolError: neither or both of ``inputs``/``text``, an invalid request id, a
            text that is not valid UTF-8 or ``inputs`` that are not a mapping (``bad_value``).
        InvalidTensorError: an input dtype that is not a wire dtype (``bad_dtype``), or a
            value that is not one array (``bad_shape``).
        ConfigError: a nan or infinite ``deadline_s``.
    """
    check_deadline(deadline_s)
    if text is not None and not isinstance(text, str):
        raise E.ProtocolError(f"text must be a str, got {type(text).__name__}", code=E.BAD_VALUE)
    arrays = named_arrays(inputs)
    rid = request_id if request_id is not None else new_request_id()
    now = protocol.now_ms()
    env = protocol.Envelope(request_id=rid, reply_to=reply_to, model=keys.model, ts_ms=now,
                            deadline_ms=now + int(deadline_s * 1000) if deadline_s else 0)
    fields = protocol.encode_request(protocol.Request(envelope=env, inputs=arrays, text=text))
    # The worker's own envelope rules, applied here so a bad request id fails in the caller
    # instead of coming back as an error result that the caller cannot match. The other
    # envelope fields are built right here (version, integers, a ModelKeys reply stream), so
    # they cannot break the rules; decoding the whole entry again would only cost time.
    protocol.check_request_id(rid)
    protocol.check_reply_to(reply_to)
    return PreparedRequest(model=keys.model, request_id=rid, stream=keys.requests, reply_to=reply_to,
                           deadline_ms=env.deadline_ms, fields=fields)


def function_args(keys: ModelKeys, prepared: PreparedRequest, max_backlog: int) -> tuple[list[str], list[Any]]:
    """``(KEYS, ARGV)`` of ``FCALL headrace_submit`` (see ``client/submit.lua``)."""
    argv: list[Any] = [keys.group, max_backlog]
    for k, v in prepared.fields.items():
        argv += [k, v]
    return [keys.requests, keys.limits, keys.inbox], argv


def submit_command(keys: ModelKeys, prepared: PreparedRequest, max_backlog: int) -> tuple[Any, ...]:
    """The whole ``FCALL headrace_submit`` command for ``prepared``, as arguments for
    ``execute_command`` (what :func:`function_args` describes)."""
    cmd: list[Any] = ["FCALL", SUBMIT_FUNCTION, 3, prepared.stream, keys.limits, keys.inbox, keys.group, max_backlog]
    for kv in prepared.fields.items():
        cmd += kv
    return tuple(cmd)


# Wire codes the submit function refuses an entry with (first word of its error reply).
_REFUSALS: dict[str, type[E.ProtocolError]] = {
    E.DECODE_ERROR: E.DecodeError, E.MISSING_FIELD: E.MissingFieldError,
    E.PAYLOAD_TOO_LARGE: E.PayloadTooLargeError, E.UNSUPPORTED_VERSION: E.UnsupportedVersionError,
    E.UNKNOWN_MODEL: E.ProtocolError,
}


def refusal(error: BaseException, prepared: PreparedRequest) -> E.HeadraceError | None:
    """The error for a submit that Redis answered with ``error`` when nothing was added:
    the function refused the entry (its wire code), or the function is not loaded.
    None for any other error (the request may or may not have been added)."""
    message = str(error)
    code, _, detail = message.partition(" ")
    cls = _REFUSALS.get(code)
    if cls is not None:
        return cls(f"request {prepared.request_id} refused by the submit function, nothing enqueued: {detail}",
                   code=code)
    rid = prepared.request_id
    if function_missing(error):
        return E.BrokerError(
            f"request {rid} was not enqueued: the submit function {SUBMIT_FUNCTION} is not loaded in this Redis; "
            "start a worker of the model or run `headrace functions load`", request_id=rid, retryable=False)
    if "unknown command" in message and "fcall" in message.lower():
        return E.BrokerError(f"request {rid} was not enqueued: this Redis has no Functions (FCALL); headrace "
                             "needs Redis >= 7.0", request_id=rid, retryable=False)
    if "exhausted the last possible ID" in message:
        return E.BrokerError(
            f"request {rid} was not enqueued: {prepared.stream} holds the largest possible entry id (a plain XADD "
            "with an explicit id); nothing can be added until an operator repairs the stream (docs/security.md, "
            "direct mode)", request_id=rid, retryable=False)
    return None


def parse_reply(reply: Any, prepared: PreparedRequest, max_backlog: int) -> str:
    """Interpret the submit function's answer; return the request stream entry id, or
    ``"inbox"`` when the request waits in the model's inbox for a worker to relay it.

    Raises:
        QueueFull: the model's backlog was at or above ``max_backlog``; nothing was added.
        BrokerError: the reply has an unexpected shape.
    """
    try:
        added, value = int(reply[0]), reply[1]
    except (TypeError, ValueError, IndexError) as e:
        raise E.BrokerError(f"unexpected reply from the submit function: {reply!r}", request_id=prepared.request_id,
                            retryable=False) from e
    if not added:
        raise E.QueueFull(
            f"model {prepared.model!r} has a backlog of {int(value)} samples (max_backlog={max_backlog}); "
            f"request {prepared.request_id} was not enqueued: retry later, add workers, or raise max_backlog",
            backlog=int(value), max_backlog=max_backlog, request_id=prepared.request_id, model=prepared.model)
    return value.decode() if isinstance(value, bytes) else str(value)


def named_arrays(inputs: Mapping[str, Any] | None) -> dict[str, np.ndarray[Any, Any]]:
    """A request's ``inputs`` as named numpy arrays (empty for None).

    Raises:
        ProtocolError: ``inputs`` is not a mapping (``bad_value``).
        InvalidTensorError: a value numpy cannot make one array of, such as ragged nested
            lists (``bad_shape``).
    """
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping):
        raise E.ProtocolError(f"inputs must be a mapping of input name -> array, got {type(inputs).__name__}; "
                              "wrap a bare array as {'<input name>': array}", code=E.BAD_VALUE)
    out: dict[str, np.ndarray[Any, Any]] = {}
    for k, v in inputs.items():
        try:
            out[str(k)] = np.asarray(v)
        except (ValueError, TypeError) as e:  # ragged lists; objects numpy cannot take
            raise E.InvalidTensorError(f"input {str(k)!r} is not one array: {str(e).split('. ')[0]}",
                                       code=E.BAD_SHAPE) from e
    return out


def split_item(item: Any) -> tuple[Mapping[str, Any] | None, str | None]:
    """One ``map`` item as ``(inputs, text)``: a ``str`` is a text input, a mapping is
    named tensors.

    Raises:
        ProtocolError: any other type (``bad_value``).
    """
    if isinstance(item, str):
        return None, item
    if isinstance(item, Mapping):
        return item, None
    raise E.ProtocolError(
        f"map items must be a str (text) or a mapping of input name -> array, got {type(item).__name__}; "
        "wrap a bare array as {'<input name>': array}", code=E.BAD_VALUE)
