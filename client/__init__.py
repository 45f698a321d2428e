"""headrace client SDK: submit inference requests to Redis Streams and collect results.

Light by design: importing it never imports ray, torch or onnxruntime.
"""

from headrace.client.aio import AsyncClient
from headrace.client.arrays import ArrayResults
from headrace.client.backoff import BackoffPolicy
from headrace.client.client import Client
from headrace.client.config import ClientSettings
from headrace.client.errors import (
    BrokerError,
    ConfigError,
    HeadraceError,
    InferenceFailed,
    ModelError,
    ModelUnavailable,
    ProtocolError,
    QueueFull,
    RequestCancelled,
    RequestExpired,
    ResultError,
    ResultTimeout,
    UnavailableError,
    UnknownModel,
)
from headrace.client.health import BatchingLimits, ModelDescription, ModelStatus
from headrace.client.protocol import Result, Status, Timings
from headrace.client.retry import Retry
from headrace.client.tickets import Ticket

__all__ = [
    "ArrayResults",
    "AsyncClient",
    "BackoffPolicy",
    "BatchingLimits",
    "BrokerError",
    "Client",
    "ClientSettings",
    "ConfigError",
    "HeadraceError",
    "InferenceFailed",
    "ModelDescription",
    "ModelError",
    "ModelStatus",
    "ModelUnavailable",
    "ProtocolError",
    "QueueFull",
    "RequestCancelled",
    "RequestExpired",
    "Result",
    "ResultError",
    "ResultTimeout",
    "Retry",
    "Status",
    "Ticket",
    "Timings",
    "UnavailableError",
    "UnknownModel",
]
