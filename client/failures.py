"""redis-py failures as :class:`~headrace.client.errors.BrokerError` (one mapping for the SDK)."""

from __future__ import annotations

import redis

from headrace.client import errors as E


def broker_error(err: BaseException, what: str, request_id: str | None = None) -> E.BrokerError:
    """A :class:`BrokerError` for a redis-py failure of ``what``. It is ``retryable`` when
    the connection failed (lost, refused, timed out), not when Redis answered with an error
    (ACL permission, wrong key type) or refused the credentials: trying again cannot help."""
    retryable = isinstance(err, (redis.ConnectionError, redis.TimeoutError, OSError)) and not isinstance(
        err, redis.AuthenticationError)
    out = E.BrokerError(f"{what} failed: {describe(err)}", request_id=request_id, retryable=retryable)
    out.__cause__ = err
    return out


def refused_unsent(err: BaseException) -> bool:
    """Whether Redis refused ``err``'s command without running it: the connection's
    credentials were refused (``WRONGPASS``, ``NOAUTH``) or an ACL forbids the command
    (``NOPERM``). A submit that failed so enqueued nothing."""
    return isinstance(err, (redis.AuthenticationError, redis.exceptions.NoPermissionError))


def unreachable(err: E.BrokerError) -> bool:
    """Whether ``err`` says a Redis (or one Cluster master) could not be reached or could not
    serve now (master down, cluster down, loading), as opposed to Redis refusing the
    command itself (a key of another type, a script error, an ACL): a call to another
    node, or the same call later, may succeed."""
    cause = err.__cause__
    transient = (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError, redis.exceptions.BusyLoadingError)
    return not isinstance(cause, redis.ResponseError) or isinstance(cause, transient)


def describe(err: BaseException) -> str:
    """redis-py's message for ``err``, with what it means where the bare message does not say:
    a cluster client that ran out of redirects (``ClusterError: TTL exhausted.``)."""
    if isinstance(err, redis.exceptions.ClusterError) and "TTL exhausted" in str(err):
        return ("the Redis Cluster redirected the command over and over (MOVED/ASK/TRYAGAIN until redis-py gave up): "
                "its masters disagree on which of them owns the key's slot, or a slot migration is stuck; check "
                "with `redis-cli --cluster check <node>`, `headrace partitions show <model>` shows a partitioned "
                "model's slots and `headrace partitions place` repairs them")
    return str(err)


def permission_denied(err: BaseException) -> bool:
    """True when Redis refused a command by ACL (``NOPERM``)."""
    cause = err.__cause__ if isinstance(err, E.BrokerError) else err
    return isinstance(cause, redis.exceptions.NoPermissionError) or "NOPERM" in str(cause)
