"""headrace client SDK: submit inference requests to Redis Streams and collect results.

Light by design: importing it never imports ray, torch or onnxruntime.
"""

from headrace.client.aio import AsyncClient
from headrace.client.client import Client
from headrace.client.config import ClientSettings
from headrace.client.errors import (
    BrokerError,
    ConfigError,
    HeadraceError,
    InferenceFailed,
    ModelError,
    ProtocolError,
    QueueFull,
    RequestExpired,
    ResultError,
    ResultTimeout,
)
from headrace.client.protocol import Result, Timings
from headrace.client.tickets import Ticket

__all__ = [
    "AsyncClient",
    "BrokerError",
    "Client",
    "ClientSettings",
    "ConfigError",
    "HeadraceError",
    "InferenceFailed",
    "ModelError",
    "ProtocolError",
    "QueueFull",
    "RequestExpired",
    "Result",
    "ResultError",
    "ResultTimeout",
    "Ticket",
    "Timings",
]
