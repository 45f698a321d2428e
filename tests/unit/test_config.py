"""Settings: defaults, HEADRACE_* env parsing, overrides, eager validation; key names."""

from __future__ import annotations

import dataclasses

import pytest

from headrace.client import errors as E
from headrace.client.config import ClientSettings, Settings, validate_model_name
from headrace.client.keys import ModelKeys, model_keys, registry_key
from headrace.client.submit import resolve_settings
from headrace.workers.settings import WorkerSettings


def test_client_defaults() -> None:
    s = ClientSettings()
    assert s.namespace == "headrace" and s.max_backlog == 100_000 and s.max_in_flight == 256
    assert s.effective_redis_url == "redis://127.0.0.1:6379/0"
    assert ClientSettings(redis_url="rediss://u:p@h:6380/1").effective_redis_url == "rediss://u:p@h:6380/1"


def test_from_env_parses_types_and_ignores_other_vars() -> None:
    env = {"HEADRACE_REDIS_URL": "redis://alice:pw@10.0.0.1:6379/2", "HEADRACE_MAX_BACKLOG": "7",
           "HEADRACE_TIMEOUT_S": "2.5", "HEADRACE_NAMESPACE": "prod", "OTHER": "x", "HEADRACE_UNRELATED": "y"}
    s = ClientSettings.from_env(env)
    assert (s.redis_url, s.max_backlog, s.timeout_s, s.namespace) == (
        "redis://alice:pw@10.0.0.1:6379/2", 7, 2.5, "prod")


def test_bool_and_optional_parsing_on_worker_settings() -> None:
    for raw, want in (("1", True), ("yes", True), ("off", False), ("0", False), ("", False)):
        assert WorkerSettings.from_env({"HEADRACE_REJECT_NON_FINITE": raw}).reject_non_finite is want
    with pytest.raises(E.ConfigError, match="HEADRACE_REJECT_NON_FINITE"):
        WorkerSettings.from_env({"HEADRACE_REJECT_NON_FINITE": "maybe"})


def test_overrides_win_over_env_and_none_falls_through() -> None:
    env = {"HEADRACE_MAX_BACKLOG": "7", "HEADRACE_NAMESPACE": "envns"}
    s = ClientSettings.from_env(env, max_backlog=9, namespace=None)
    assert s.max_backlog == 9 and s.namespace == "envns"


def test_unparsable_env_names_the_variable() -> None:
    with pytest.raises(E.ConfigError, match="HEADRACE_MAX_BACKLOG='many'"):
        ClientSettings.from_env({"HEADRACE_MAX_BACKLOG": "many"})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(E.ConfigError, match="unknown setting"):
        ClientSettings.from_env({}, max_backlogg=3)


@pytest.mark.parametrize("field,value,env_name", [
    ("max_backlog", -1, "HEADRACE_MAX_BACKLOG"),
    ("timeout_s", 0, "HEADRACE_TIMEOUT_S"),
    ("deadline_s", -1.0, "HEADRACE_DEADLINE_S"),
    ("deadline_s", 1e20, "HEADRACE_DEADLINE_S"),
    ("redis_url", "redis://127.0.0.1:abc", "HEADRACE_REDIS_URL"),
    ("redis_url", "redis://h:70000/0", "HEADRACE_REDIS_URL"),
    ("redis_url", "redis://h:6379/0?db=x", "HEADRACE_REDIS_URL"),
    ("reply_block_ms", 0, "HEADRACE_REPLY_BLOCK_MS"),
    ("reply_ttl_s", 0, "HEADRACE_REPLY_TTL_S"),
    ("max_in_flight", 0, "HEADRACE_MAX_IN_FLIGHT"),
    ("reconnect_backoff_max_s", 0, "HEADRACE_RECONNECT_BACKOFF_MAX_S"),
    ("namespace", "a:b", "HEADRACE_NAMESPACE"),
    ("namespace", "", "HEADRACE_NAMESPACE"),
])
def test_invalid_values_fail_eagerly_with_fix_it(field: str, value: object, env_name: str) -> None:
    with pytest.raises(E.ConfigError) as info:
        ClientSettings(**{field: value})  # type: ignore[arg-type]
    assert env_name in str(info.value) and field in str(info.value)
    assert info.value.code == E.CONFIG_ERROR


def test_settings_are_frozen_and_replace_revalidates() -> None:
    s = ClientSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_backlog = 3  # type: ignore[misc]
    assert s.replace(max_backlog=3).max_backlog == 3
    with pytest.raises(E.ConfigError):
        s.replace(max_in_flight=0)
    assert isinstance(s, Settings) and s.to_dict()["namespace"] == "headrace"


def test_worker_settings_validation() -> None:
    with pytest.raises(E.ConfigError, match="preferred_batch"):
        WorkerSettings(max_batch=4, preferred_batch=8)
    with pytest.raises(E.ConfigError, match="backend"):
        WorkerSettings(backend="tensorflow")
    with pytest.raises(E.ConfigError, match="redis_url") as info:  # at start, not at the first connection
        WorkerSettings(redis_url="redis://user:hunter2@h:port/0")
    assert "hunter2" not in str(info.value)
    w = WorkerSettings(max_batch=8)
    assert w.effective_preferred_batch == 8 and w.limits.max_payload_bytes == w.max_payload_bytes


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "a{b}", "x" * 129])
def test_bad_model_names(name: str) -> None:
    with pytest.raises(E.ConfigError, match="model"):
        validate_model_name(name)


def test_model_keys_share_one_hash_tag() -> None:
    k = ModelKeys(namespace="ns", model="minilm")
    assert k.requests == "ns:{minilm}:requests"
    assert k.dlq == "ns:{minilm}:dlq" and k.stats == "ns:{minilm}:stats"
    assert k.done("r1") == "ns:{minilm}:done:r1" and k.reply("c1") == "ns:{minilm}:reply:c1"
    assert k.group == "workers"
    assert all("{minilm}" in key for key in (k.requests, k.dlq, k.done("x"), k.reply("y")))
    assert model_keys("m").requests == "headrace:{m}:requests"
    assert registry_key("ns") == "ns:models"
    with pytest.raises(E.ConfigError):
        ModelKeys(namespace="bad ns", model="m")


def test_resolve_settings_for_the_sdk() -> None:
    s, cid = resolve_settings(None, None, redis_url="redis://h:1/0", namespace=None, max_backlog=5)
    assert s.redis_url == "redis://h:1/0" and s.max_backlog == 5
    assert 1 <= len(cid) <= 64
    base = ClientSettings(namespace="x")
    s2, cid2 = resolve_settings(base, "my-client.1", timeout_s=3.0, namespace=None)
    assert s2.namespace == "x" and s2.timeout_s == 3.0 and cid2 == "my-client.1"
    assert resolve_settings(None, None)[1] != resolve_settings(None, None)[1]
    for bad in ("has space", "a:b", "{x}", "x" * 65):
        with pytest.raises(E.ConfigError, match="client_id"):
            resolve_settings(None, bad)


def test_backoff_policy_grows_caps_and_jitters() -> None:
    import random

    from headrace.client.backoff import BackoffPolicy

    fixed = BackoffPolicy(base_s=0.1, cap_s=1.0, jitter=0.0)
    assert [fixed.delay_s(n) for n in (1, 2, 3, 4, 5, 10_000)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = BackoffPolicy(base_s=1.0, cap_s=1.0, jitter=0.5)
    rng = random.Random(7)
    delays = [jittered.delay_s(1, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and max(delays) - min(delays) > 0.3
    for bad in ({"base_s": -1.0}, {"base_s": 2.0, "cap_s": 1.0}, {"factor": 0.5}, {"jitter": 1.5}):
        with pytest.raises(E.ConfigError):
            BackoffPolicy(**bad)  # type: ignore[arg-type]


def test_a_raised_payload_limit_raises_the_element_cap_with_it() -> None:
    """A 20 Mi-element uint8 batch (20 MiB of bytes) fits a worker allowed 64 MiB bodies;
    the default worker still refuses it as too large, before allocating."""
    import numpy as np

    from headrace.client.wire import decode_tensor, encode_tensor

    wire = encode_tensor(np.zeros((5, 4, 1024, 1024), np.uint8))
    big = WorkerSettings(max_payload_bytes=64 * 1024 * 1024, memory_budget_bytes=1 << 30).limits
    assert decode_tensor(wire, big).shape == (5, 4, 1024, 1024)
    with pytest.raises(E.PayloadTooLargeError):
        decode_tensor(wire, WorkerSettings().limits)
