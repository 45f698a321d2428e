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
"""

from __future__ import annotations

from dataclasses import dataclass

from headrace.client.config import DEFAULT_GROUP, DEFAULT_NAMESPACE, validate_model_name, validate_namespace


@dataclass(frozen=True)
class ModelKeys:
    """The key names for one model in one namespace."""

    namespace: str
    model: str
    group: str = DEFAULT_GROUP

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        validate_model_name(self.model)

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.model}}}"

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
