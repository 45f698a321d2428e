"""The backlog autoscaling policy: pure decisions, the Redis reads (against a small fake),
and the policy inside Serve's own wrapper (delays, bounds) with a real AutoscalingContext."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis

from headrace.client.errors import BrokerError, ConfigError
from headrace.client.keys import ModelKeys
from headrace.cluster.serve.autoscale import (
    LAG_METRIC,
    PENDING_METRIC,
    POLICY_IMPORT_PATH,
    LagAutoscalingPolicy,
    LagPolicySettings,
    desired_replicas,
    lag_autoscaling_config,
    read_backlog,
)


class FakeStreams:
    """Answers XINFO GROUPS / XLEN / XREVRANGE like redis-py does (bytes keys, str field
    names), directly or through a non-transactional pipeline. ``tail``: the stream's last
    entry id (by default newer than the groups' last delivered id, so lag is as reported)."""

    def __init__(self, groups: list[dict[str, Any]] | None = None, length: int = 1000,
                 fail: Exception | None = None, tail: bytes | None = b"999999-0", inbox: int = 0,
                 samples_per_entry: bytes | None = None) -> None:
        self.groups = groups
        self.length = length
        self.inbox = inbox
        self.samples_per_entry = samples_per_entry
        self.tail = tail
        self.fail = fail
        self.calls = 0

    def xinfo_groups(self, key: str) -> list[dict[str, Any]]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.groups is None:
            raise redis.ResponseError("no such key")
        return self.groups

    def xlen(self, key: str) -> int:
        return self.length

    def xrevrange(self, key: str, *args: Any, **kw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return [] if self.tail is None else [(self.tail, {})]

    def llen(self, key: str) -> int:
        if self.fail is not None:
            raise self.fail
        return self.inbox

    def hget(self, key: str, field: str) -> bytes | None:
        return self.samples_per_entry

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, streams: FakeStreams) -> None:
        self.streams = streams
        self.queued: list[tuple[str, str]] = []

    def xinfo_groups(self, key: str) -> None:
        self.queued.append(("xinfo_groups", key))

    def xlen(self, key: str) -> None:
        self.queued.append(("xlen", key))

    def xrevrange(self, key: str, *args: Any, **kw: Any) -> None:
        self.queued.append(("xrevrange", key))

    def llen(self, key: str) -> None:
        self.queued.append(("llen", key))

    def hget(self, key: str, field: str) -> None:
        self.queued.append(("hget", key))

    def execute(self) -> list[Any]:
        return [self.streams.hget(key, "samples_per_entry") if name == "hget" else getattr(self.streams, name)(key)
                for name, key in self.queued]



KEYS = ModelKeys("headrace", "m")


def _group(lag: int | None, pending: int, name: bytes = b"workers") -> dict[str, Any]:
    return {"name": name, "consumers": 1, "pending": pending, "last-delivered-id": b"5-0",
            "entries-read": 5, "lag": lag}


def test_desired_replicas_is_backlog_over_target_rounded_up() -> None:
    assert desired_replicas(0, 10) == 0
    assert desired_replicas(1, 10) == 1
    assert desired_replicas(10, 10) == 1
    assert desired_replicas(11, 10) == 2
    assert desired_replicas(500, 20) == 25


def test_settings_are_validated_eagerly() -> None:
    with pytest.raises(ConfigError, match="target_backlog_per_replica"):
        LagPolicySettings(model="m", target_backlog_per_replica=0)
    with pytest.raises(ConfigError, match="model"):
        LagPolicySettings(model="bad name")
    with pytest.raises(ConfigError, match="max_replicas"):
        lag_autoscaling_config(LagPolicySettings(model="m"), min_replicas=3, max_replicas=2)


def test_read_backlog_uses_lag_and_pending_of_the_right_group() -> None:
    fake = FakeStreams([_group(99, 1, b"other"), _group(7, 3)])
    assert read_backlog(fake, KEYS) == (7, 3)


def test_read_backlog_bounds_unknown_lag_by_stream_length() -> None:
    # Unread and pending entries are all still in the stream: lag <= XLEN - pending.
    assert read_backlog(FakeStreams([_group(None, 2)], length=6), KEYS) == (4, 2)


def test_read_backlog_caps_a_stale_lag_at_the_stream_length() -> None:
    # Redis 7.0 after an AOF rewrite and a restart reports a lag the stream cannot hold.
    assert read_backlog(FakeStreams([_group(59_000, 3)], length=10), KEYS) == (7, 3)


def test_read_backlog_of_a_missing_stream_is_zero_and_without_the_group_all_unread() -> None:
    assert read_backlog(FakeStreams(None), KEYS) == (0, 0)
    # Producers never create the group: what they queued before any worker is all unread.
    assert read_backlog(FakeStreams([_group(5, 5, b"other")], length=6), KEYS) == (6, 0)


def test_read_backlog_raises_broker_error_when_redis_is_down() -> None:
    with pytest.raises(BrokerError, match="backlog"):
        read_backlog(FakeStreams(fail=redis.ConnectionError("refused")), KEYS)


def _ctx(current: int, target: int | None = None, aggregated: Any = None) -> Any:
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=current if target is None else target,
                           policy_state={}, aggregated_metrics=aggregated)


def test_policy_scales_on_polled_backlog_and_caches_polls() -> None:
    policy = LagAutoscalingPolicy(model="m", target_backlog_per_replica=10, poll_interval_s=60)
    fake = FakeStreams([_group(35, 5)])
    policy._client = fake
    desired, state = policy(_ctx(1))
    assert desired == 4
    assert state["headrace_lag"] == 35 and state["headrace_pending"] == 5 and state["headrace_source"] == "redis"
    fake.groups = [_group(0, 0)]
    assert policy(_ctx(4))[0] == 4, "within poll_interval_s the cached backlog is used"
    assert fake.calls == 1
    assert policy.poll(now=1e12) == (0, 0)
    assert policy(_ctx(4))[0] == 0


def test_policy_counts_the_inbox_and_the_samples_entries_carry() -> None:
    policy = LagAutoscalingPolicy(model="m", target_backlog_per_replica=10, poll_interval_s=0)
    # Strict submit mode at zero replicas: nobody relays, the stream is empty, the inbox is not.
    policy._client = FakeStreams(None, inbox=25)
    desired, state = policy(_ctx(0))
    assert desired == 3 and state["headrace_lag"] == 25 and state["headrace_samples_per_entry"] == 1.0
    # Entries of 32 samples lately: 2 queued + 1 pending entries are 96 samples.
    policy._client = FakeStreams([_group(2, 1)], samples_per_entry=b"32.00")
    desired, state = policy(_ctx(1))
    assert desired == 10 and state["headrace_samples_per_entry"] == 32.0
    for junk in (b"nan", b"inf", b"-4", b"0.5", b"lots"):  # never trusted beyond a number >= 1
        policy._client = FakeStreams([_group(2, 1)], samples_per_entry=junk)
        assert policy(_ctx(1))[0] == 1, junk


def test_policy_falls_back_to_replica_reports_then_holds() -> None:
    policy = LagAutoscalingPolicy(model="m", target_backlog_per_replica=10, poll_interval_s=0)
    policy._client = FakeStreams(fail=redis.ConnectionError("down"))
    reports = {LAG_METRIC: {"r1": 30.0, "r2": 28.0}, PENDING_METRIC: {"r1": 4.0, "r2": 6.0}}
    desired, state = policy(_ctx(2, aggregated=reports))
    assert desired == 4 and state["headrace_source"] == "replicas"  # max lag 30 + max pending 6
    assert policy(_ctx(3, target=3, aggregated={}))[0] == 3, "no data at all: hold the target"


def test_policy_inside_serves_wrapper_applies_delay_and_bounds() -> None:
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    cfg_dict = lag_autoscaling_config(LagPolicySettings(model="m", target_backlog_per_replica=10, poll_interval_s=0),
                                      min_replicas=1, max_replicas=3, upscale_delay_s=0.0, downscale_delay_s=0.0)
    assert cfg_dict["policy"]["policy_function"] == POLICY_IMPORT_PATH
    config = AutoscalingConfig(**cfg_dict)  # Serve imports and serializes the policy here
    policy = LagAutoscalingPolicy(**cfg_dict["policy"]["policy_kwargs"])
    fake = FakeStreams([_group(200, 0)])
    policy._client = fake
    wrapped = _apply_autoscaling_config(policy)

    def ctx(current: int) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=DeploymentID(name="StreamWorker", app_name="m"), deployment_name="StreamWorker",
            app_name="m", current_num_replicas=current, target_num_replicas=current, running_replicas=[],
            total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)

    up, _ = wrapped(ctx(1))
    assert up >= 3  # 20 wanted; Serve clamps to max_replicas after the policy
    fake.groups = [_group(0, 0)]
    down, _ = wrapped(ctx(3))
    assert down <= 1


def test_policy_scales_from_zero_without_waiting_for_the_delay() -> None:
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    cfg_dict = lag_autoscaling_config(LagPolicySettings(model="m", target_backlog_per_replica=10, poll_interval_s=0),
                                      min_replicas=0, max_replicas=4, upscale_delay_s=3600.0)
    policy = LagAutoscalingPolicy(**cfg_dict["policy"]["policy_kwargs"])
    policy._client = FakeStreams([_group(25, 0)])
    ctx = AutoscalingContext(
        deployment_id=DeploymentID(name="StreamWorker", app_name="m"), deployment_name="StreamWorker", app_name="m",
        current_num_replicas=0, target_num_replicas=0, running_replicas=[], total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=AutoscalingConfig(**cfg_dict))
    desired, _ = _apply_autoscaling_config(policy)(ctx)
    assert desired == 3  # no replica reports anything at zero: the Redis poll carries it
