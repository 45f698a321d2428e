"""headrace client SDK: submit inference requests to Redis Streams and collect results.

Light by design: importing it never imports ray, torch or onnxruntime.
"""

from .aio import AsyncClient
from .client import Client
from .config import ClientSettings
from .errors import (
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
from .protocol import Result, Timings
from .tickets import Ticket

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
