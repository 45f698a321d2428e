"""Redis key names of wire protocol v1.

Every key of one model carries the model name as a Redis Cluster hash tag (``{model}``), so
the request stream, its dead-letter stream, the dedupe markers and the reply streams the
SDK uses for that model all live in one slot: the worker's atomic result+ack script may
touch them together, on a single Redis and on Redis Cluster alike.

    <ns>:{<model>}:requests            request stream (consumer group "workers")
    <ns>:{<model>}:dlq                 dead-letter stream
    <ns>:{<model>}:done:<request_id>   dedupe marker (string, TTL)
    <ns>:{<model>}:cancel:<request_id> cancel marker (string: Unix ms, TTL): submissions of
                                       this id made up to then are skipped by workers
    <ns>:{<model>}:stats               recent batch statistics (capped stream)
    <ns>:{<model>}:reply:<client_id>   a client's reply stream for this model
    <ns>:{<model>}:limits              hash: the workers' entry limits the submit function applies
    <ns>:{<model>}:inbox               list: checked requests the workers relay into the stream
    <ns>:models                        hash: model -> JSON info of the workers serving it

A model split into ``P > 1`` partitions (``partitions`` of the worker and SDK settings, see
docs/scaling.md section 4) has ``P`` such key sets, each under its own hash tag
``{<model>~<p>}`` (``p`` = 0..P-1) and therefore in its own slot: a partition is, to every
script, just another model. Producers pick the partition of a request from its id
(:func:`partition_of`), so a retry with the same id meets the same dedupe marker. With
``P = 1`` the keys are exactly the unpartitioned ones above.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from headrace.client.config import (
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    require,
    validate_model_name,
    validate_namespace,
)

#: separates the model from the partition number in a partition's hash tag.
PARTITION_SEP: Final = "~"
#: the most partitions one model may be split into.
MAX_PARTITIONS: Final = 1024


def validate_partitions(partitions: int) -> None:
    """Raise :class:`~headrace.client.errors.ConfigError` unless 1 <= ``partitions`` <= 1024."""
    require(isinstance(partitions, int) and 1 <= partitions <= MAX_PARTITIONS, "partitions",
            f"must be between 1 (one stream per model) and {MAX_PARTITIONS}; producers and workers of a model "
            "must use the same value")


def partition_of(request_id: str, partitions: int) -> int:
    """The partition (0..partitions-1) of ``request_id``: ``crc32(request_id) % partitions``,
    stable across processes and languages, so every producer and every retry of one id
    picks the same partition."""
    return zlib.crc32(request_id.encode("utf-8")) % partitions if partitions > 1 else 0


@dataclass(frozen=True)
class ModelKeys:
    """The key names for one model (or one partition of it) in one namespace.

    Attributes:
        partition: None for an unpartitioned model (hash tag ``{<model>}``), else the
            partition number (hash tag ``{<model>~<partition>}``).
    """

    namespace: str
    model: str
    group: str = DEFAULT_GROUP
    partition: int | None = None

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        validate_model_name(self.model)
        require(self.partition is None or 0 <= self.partition < MAX_PARTITIONS, "partitions",
                f"partition {self.partition!r} must be between 0 and {MAX_PARTITIONS - 1}")

    @property
    def tag(self) -> str:
        """The hash tag's content: the model, or ``<model>~<partition>``."""
        return self.model if self.partition is None else f"{self.model}{PARTITION_SEP}{self.partition}"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.tag}}}"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def done_prefix(self) -> str:
        """Prefix of the dedupe markers; the request id is appended."""
        return f"{self.prefix}:done:"

    def done(self, request_id: str) -> str:
        return f"{self.done_prefix}{request_id}"

    @property
    def limits(self) -> str:
        """Hash of the limits the submit function applies (``max_payload_bytes``), written by
        the model's workers; declared as a key of ``FCALL headrace_submit``."""
        return f"{self.prefix}:limits"

    @property
    def inbox(self) -> str:
        """List of checked requests (msgpack arrays of field, value pairs) that the submit
        function appends in strict mode and the workers move into :attr:`requests`
        (``headrace_relay``); declared as a key of ``FCALL headrace_submit``."""
        return f"{self.prefix}:inbox"

    @property
    def cancel_prefix(self) -> str:
        """Prefix of the cancel markers; the request id is appended."""
        return f"{self.prefix}:cancel:"

    def cancel(self, request_id: str) -> str:
        """The cancel marker of ``request_id``: a string holding a Unix time in ms; a worker
        skips (acks without running or answering) a submission of that id whose ``ts_ms``
        is at or before it. Same hash slot as the request stream."""
        return f"{self.cancel_prefix}{request_id}"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}:reply:{client_id}"


def registry_key(namespace: str = DEFAULT_NAMESPACE) -> str:
    """Hash of served models (field = model name, value = JSON worker info)."""
    validate_namespace(namespace)
    return f"{namespace}:models"


def model_keys(model: str, namespace: str = DEFAULT_NAMESPACE) -> ModelKeys:
    return ModelKeys(namespace=namespace, model=model)


def partition_keys(namespace: str, model: str, partitions: int, group: str = DEFAULT_GROUP) -> list[ModelKeys]:
    """The key sets of ``model`` split into ``partitions``: one (the unpartitioned keys) when
    ``partitions`` is 1, else one per partition, index = partition number.

    Raises:
        ConfigError: an invalid namespace, model or partition count.
    """
    validate_partitions(partitions)
    if partitions == 1:
        return [ModelKeys(namespace, model, group)]
    return [ModelKeys(namespace, model, group, partition=p) for p in range(partitions)]
