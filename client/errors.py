"""The one exception hierarchy of headrace.

Every error raised by headrace derives from :class:`HeadraceError`. Errors that can travel
on the wire (inside an error result) carry a stable, machine-readable ``code``; the codes
are part of wire protocol v1 (see ``docs/protocol.md``) and never change meaning.

Categories:

* :class:`ProtocolError` -- a request or result could not be decoded or validated.
* :class:`BrokerError` -- Redis was unreachable or answered unexpectedly.
* :class:`UnavailableError` -- the service cannot take the request now (:class:`QueueFull`,
  :class:`ModelUnavailable`): nothing was enqueued; retry later.
* :class:`ModelError` -- a model could not be loaded or failed while running
  (:class:`UnknownModel`: no worker ever registered the model).
* :class:`ResultError` -- a result came back as an error, expired, was cancelled, or did not
  come in time (:class:`ResultTimeout`, also a :class:`TimeoutError`).
* :class:`ConfigError` -- a setting is invalid; raised eagerly, at construction.

Codes that never travel in a result (the SDK's own outcomes) are listed in
:data:`SDK_CODES`; they are documented in ``docs/protocol.md`` next to the wire codes.
"""

from __future__ import annotations

from typing import Any, Final

# Stable error codes of wire protocol v1. Producers in any language match on these strings.
DECODE_ERROR: Final = "decode_error"
MISSING_FIELD: Final = "missing_field"
BAD_DTYPE: Final = "bad_dtype"
BAD_SHAPE: Final = "bad_shape"
BAD_VALUE: Final = "bad_value"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
UNKNOWN_MODEL: Final = "unknown_model"
UNSUPPORTED_VERSION: Final = "unsupported_version"
MODEL_ERROR: Final = "model_error"
MAX_DELIVERIES: Final = "max_deliveries_exceeded"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"
QUEUE_FULL: Final = "queue_full"
INTERNAL_ERROR: Final = "internal_error"
CONFIG_ERROR: Final = "config_error"
TOO_MANY_SAMPLES: Final = "too_many_samples"
# SDK outcomes, never in a result: the client stopped waiting (its timeout_s), the caller
# cancelled, Redis failed under a submit or read, no live worker serves the model (fail_fast).
RESULT_TIMEOUT: Final = "result_timeout"
CANCELLED: Final = "cancelled"
BROKER_ERROR: Final = "broker_error"
MODEL_UNAVAILABLE: Final = "model_unavailable"

SDK_CODES: Final = frozenset({QUEUE_FULL, CONFIG_ERROR, RESULT_TIMEOUT, CANCELLED, BROKER_ERROR, MODEL_UNAVAILABLE})

ALL_CODES: Final = frozenset(
    {
        DECODE_ERROR,
        MISSING_FIELD,
        BAD_DTYPE,
        BAD_SHAPE,
        BAD_VALUE,
        PAYLOAD_TOO_LARGE,
        UNKNOWN_MODEL,
        UNSUPPORTED_VERSION,
        MODEL_ERROR,
        MAX_DELIVERIES,
        DEADLINE_EXCEEDED,
        QUEUE_FULL,
        INTERNAL_ERROR,
        CONFIG_ERROR,
        RESULT_TIMEOUT,
        CANCELLED,
        BROKER_ERROR,
        MODEL_UNAVAILABLE,
        TOO_MANY_SAMPLES,
    }
)


class HeadraceError(Exception):
    """Root of every headrace error. ``code`` is the stable wire code for this error."""

    code: str = INTERNAL_ERROR

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# --- protocol / decode -------------------------------------------------------------------


class ProtocolError(HeadraceError):
    """Raised when a stream entry or msgpack body does not follow wire protocol v1."""

    code = DECODE_ERROR


class DecodeError(ProtocolError):
    """Raised when bytes cannot be decoded (bad msgpack, truncated data, wrong types)."""

    code = DECODE_ERROR


class MissingFieldError(ProtocolError):
    """Raised when a required entry field or body key is absent."""

    code = MISSING_FIELD


class InvalidTensorError(ProtocolError):
    """Raised when a tensor's dtype, shape or byte length is inconsistent or not accepted.

    ``code`` is :data:`BAD_DTYPE`, :data:`BAD_SHAPE` or :data:`BAD_VALUE`.
    """

    code = BAD_SHAPE


class PayloadTooLargeError(ProtocolError):
    """Raised when an entry exceeds the configured byte limit (``max_payload_bytes``)."""

    code = PAYLOAD_TOO_LARGE


class UnsupportedVersionError(ProtocolError):
    """Raised when an entry declares a protocol version this code does not speak."""

    code = UNSUPPORTED_VERSION


# --- broker ------------------------------------------------------------------------------


class BrokerError(HeadraceError):
    """Raised when Redis cannot be reached, or a stream operation fails unexpectedly.

    Attributes:
        request_id: the request being submitted when it happened (None for other calls).
            The request may or may not have been enqueued: submitting again with the same
            request id is safe (a request id is answered once).
        retryable: True when the failure is transient (connection lost, timeout), False
            when trying again cannot help (authentication, ACL permission, wrong key type).
    """

    code = BROKER_ERROR

    def __init__(self, message: str, *, code: str | None = None, request_id: str | None = None,
                 retryable: bool = True) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
        self.retryable = retryable


# --- unavailable -------------------------------------------------------------------------


class UnavailableError(HeadraceError):
    """The service cannot take the request now; nothing was enqueued. Retry later."""


class QueueFull(UnavailableError):
    """Raised by the SDK when a model's backlog (lag + pending) reached ``max_backlog``.

    Nothing was enqueued; retry after ``retry_after_s``, add workers, or raise the limit.

    Attributes:
        backlog: the model's backlog (samples, estimated: entries times samples per entry) the submit
            function saw.
        max_backlog: the limit in force.
        retry_after_s: a suggested wait before trying again (seconds).
        request_id: the refused request's id.
        model: the model.
    """

    code = QUEUE_FULL

    def __init__(self, message: str, *, backlog: int = 0, max_backlog: int = 0, retry_after_s: float = 0.5,
                 request_id: str | None = None, model: str = "") -> None:
        super().__init__(message)
        self.backlog = backlog
        self.max_backlog = max_backlog
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.model = model


class ModelUnavailable(UnavailableError):
    """Raised by ``submit`` with ``fail_fast`` when no live worker serves the model (the
    model is registered, but no worker sent a heartbeat lately). Nothing was enqueued.

    Attributes:
        model: the model.
    """

    code = MODEL_UNAVAILABLE

    def __init__(self, message: str, *, model: str = "") -> None:
        super().__init__(message)
        self.model = model


# --- model -------------------------------------------------------------------------------


class ModelError(HeadraceError):
    """Raised when a model fails to load or to run."""

    code = MODEL_ERROR


class ModelInputError(ModelError):
    """Raised inside a worker when the model itself refuses a call's inputs, a failure that
    repeats on every try (onnxruntime's ``INVALID_ARGUMENT``: an index out of range, a shape
    a node cannot take). A request that fails this way alone is answered ``model_error`` at
    once rather than redelivered until ``max_deliveries``."""

    code = MODEL_ERROR


class ModelTimeoutError(ModelError):
    """Raised inside a worker when one model call runs longer than ``infer_timeout_s``.

    ``interrupted``: the servable stopped the call (onnxruntime's terminate flag), so the
    worker fails its requests (a request that ran alone is dead-lettered ``model_error``,
    batch-mates are run again apart) and goes on. Otherwise the call cannot be interrupted:
    the worker reports itself unhealthy and stops consuming; a request that ran alone is
    dead-lettered, the others are redelivered after the lease and run alone."""

    code = MODEL_ERROR

    def __init__(self, message: str, *, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


class ModelNotFoundError(ModelError):
    """Raised when a model name or version is not in the repository, or not served here."""

    code = UNKNOWN_MODEL


class UnknownModel(ModelNotFoundError):
    """Raised by the SDK when no worker has ever registered the model in this namespace
    (a typo, or the workers never started). Pass ``require_registered=False`` to submit
    before the workers start.

    Attributes:
        model: the model.
    """

    def __init__(self, message: str, *, model: str = "") -> None:
        super().__init__(message)
        self.model = model


class RepositoryError(ModelError):
    """Raised when a model repository entry is malformed, escapes the repository, or its
    files do not match the checksums in its manifest."""

    code = MODEL_ERROR


# --- results -----------------------------------------------------------------------------


class ResultError(HeadraceError):
    """Raised by the SDK when a result is not a success.

    Attributes:
        request_id: the request it is about (None when not one request's).
        result: the :class:`~headrace.client.Result` that came back, when one did (its
            timings, model version, per-sample statuses); None otherwise.
    """

    def __init__(self, message: str, *, code: str | None = None, request_id: str | None = None,
                 result: Any = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
        self.result = result


class InferenceFailed(ResultError):
    """Raised when a request came back with status ``error`` or ``rejected``; ``code`` is
    the wire code the worker sent."""


class RequestExpired(ResultError):
    """Raised when a request came back ``expired``: the server found its deadline passed
    before it ran (code ``deadline_exceeded``)."""

    code = DEADLINE_EXCEEDED


class ResultTimeout(ResultError, TimeoutError):
    """Raised when the client stopped waiting: no result within the caller's ``timeout_s``
    (code ``result_timeout``). The request may still be answered later: a ticket stays
    collectable; ``infer`` cancels its own request first.

    Attributes:
        request_id: the request waited for (None when waiting for several).
        timeout_s: how long it waited (seconds).
    """

    code = RESULT_TIMEOUT

    def __init__(self, message: str, *, request_id: str | None = None, timeout_s: float = 0.0) -> None:
        super().__init__(message, request_id=request_id)
        self.timeout_s = timeout_s


class RequestCancelled(ResultError):
    """Raised when waiting for a request that was cancelled (``ticket.cancel()``) or
    forgotten (``client.forget(ticket)``) on this side (code ``cancelled``)."""

    code = CANCELLED

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)


# --- config ------------------------------------------------------------------------------


class ConfigError(HeadraceError):
    """Raised eagerly when a setting is invalid; the message says how to fix it.

    Attributes:
        field: the setting at fault, when one is (None otherwise).
        reason: what is wrong with it, without the setting's name.
    """

    code = CONFIG_ERROR

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason if reason is not None else message
