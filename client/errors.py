"""The one exception hierarchy of headrace.

Every error raised by headrace derives from :class:`HeadraceError`. Errors that can travel
on the wire (inside an error result) carry a stable, machine-readable ``code``; the codes
are part of wire protocol v1 (see ``docs/protocol.md``) and never change meaning.

Categories:

* :class:`ProtocolError` -- a request or result could not be decoded or validated.
* :class:`BrokerError` -- Redis was unreachable or answered unexpectedly.
* :class:`ModelError` -- a model could not be loaded or failed while running.
* :class:`ResultError` -- a result came back as an error, expired, or did not come in time.
* :class:`ConfigError` -- a setting is invalid; raised eagerly, at construction.
"""

from __future__ import annotations

from typing import Final

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
    """Raised when Redis cannot be reached, or a stream operation fails unexpectedly."""

    code = INTERNAL_ERROR


class QueueFull(BrokerError):
    """Raised by the SDK when a model's backlog (lag + pending) passed ``max_backlog``.

    Nothing was enqueued; retry later or raise the limit.
    """

    code = QUEUE_FULL


# --- model -------------------------------------------------------------------------------


class ModelError(HeadraceError):
    """Raised when a model fails to load or to run."""

    code = MODEL_ERROR


class ModelTimeoutError(ModelError):
    """Raised inside a worker when one model call runs longer than ``infer_timeout_s``.
    The call cannot be interrupted, so the worker reports itself unhealthy and stops
    consuming; its in-flight requests are redelivered after the lease (and dead-lettered
    with ``model_error`` if they keep hanging workers)."""

    code = MODEL_ERROR


class ModelNotFoundError(ModelError):
    """Raised when a model name or version is not in the repository, or not served here."""

    code = UNKNOWN_MODEL


class RepositoryError(ModelError):
    """Raised when a model repository entry is malformed, escapes the repository, or its
    files do not match the checksums in its manifest."""

    code = MODEL_ERROR


# --- results -----------------------------------------------------------------------------


class ResultError(HeadraceError):
    """Raised by the SDK when a result is not a success."""


class InferenceFailed(ResultError):
    """Raised when a request came back with status ``error`` or ``rejected``; ``code`` is
    the wire code the worker sent."""


class RequestExpired(ResultError):
    """Raised when a request came back ``expired``: its deadline passed before it ran."""

    code = DEADLINE_EXCEEDED


class ResultTimeout(ResultError):
    """Raised when waiting for a result took longer than the caller's ``timeout_s``.

    The request may still be answered later; the ticket stays collectable.
    """

    code = DEADLINE_EXCEEDED


# --- config ------------------------------------------------------------------------------


class ConfigError(HeadraceError):
    """Raised eagerly when a setting is invalid; the message says how to fix it."""

    code = CONFIG_ERROR
