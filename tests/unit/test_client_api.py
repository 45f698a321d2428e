"""The SDK's surface without Redis: the error hierarchy and codes, typed settings that name a
setting the way it was set, the Retry policy, model status and description from registry
records, progress reporting and the compact Result repr."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest

from headrace.client import BackoffPolicy, Retry
from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.config import ClientSettings
from headrace.client.health import RegistryCache, describe, model_status
from headrace.client.progress import make_progress
from headrace.client.registry import decode_record
from headrace.workers.settings import WorkerSettings

NOW = 1_800_000_000_000


def test_error_hierarchy_and_distinct_codes() -> None:
    assert issubclass(E.ResultTimeout, TimeoutError) and issubclass(E.ResultTimeout, E.ResultError)
    assert E.ResultTimeout.code == E.RESULT_TIMEOUT != E.RequestExpired.code == E.DEADLINE_EXCEEDED
    assert not issubclass(E.QueueFull, E.BrokerError) and issubclass(E.QueueFull, E.UnavailableError)
    assert issubclass(E.ModelUnavailable, E.UnavailableError) and E.ModelUnavailable.code == E.MODEL_UNAVAILABLE
    assert issubclass(E.UnknownModel, E.ModelNotFoundError) and E.UnknownModel.code == E.UNKNOWN_MODEL
    assert E.BrokerError.code == E.BROKER_ERROR and E.RequestCancelled.code == E.CANCELLED
    b = E.BrokerError("down", request_id="r1")
    assert b.request_id == "r1" and b.retryable and str(b) == "[broker_error] down"
    q = E.QueueFull("full", backlog=7, max_backlog=5, retry_after_s=0.3, request_id="r2", model="m")
    assert (q.backlog, q.max_backlog, q.retry_after_s, q.request_id, q.model) == (7, 5, 0.3, "r2", "m")
    try:
        raise E.ResultTimeout("late", request_id="r3", timeout_s=2.0)
    except TimeoutError as caught:  # an application's `except TimeoutError` catches it
        assert isinstance(caught, E.ResultTimeout) and caught.timeout_s == 2.0
    assert E.SDK_CODES <= E.ALL_CODES


@pytest.mark.parametrize("kwargs,field", [
    ({"max_backlog": "5"}, "max_backlog"),
    ({"max_backlog": True}, "max_backlog"),
    ({"max_in_flight": 2.5}, "max_in_flight"),
    ({"timeout_s": "1"}, "timeout_s"),
    ({"namespace": 3}, "namespace"),
    ({"fail_fast": 1}, "fail_fast"),
])
def test_settings_accept_only_their_documented_types(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(E.ConfigError) as info:
        ClientSettings(**kwargs)
    assert info.value.field == field and f"{field}=" in str(info.value) and "must be" in str(info.value)


def test_settings_coerce_only_lossless_spellings() -> None:
    s = ClientSettings(timeout_s=2, deadline_s=0)
    assert isinstance(s.timeout_s, float) and s.timeout_s == 2.0
    assert WorkerSettings(max_wait_ms=np.int64(3)).max_wait_ms == 3.0  # numpy numbers are numbers
    with pytest.raises(E.ConfigError, match="max_batch"):
        WorkerSettings(max_batch=np.float32(4))  # type: ignore[arg-type]


def test_messages_name_the_setting_the_way_it_was_set() -> None:
    with pytest.raises(E.ConfigError) as info:
        ClientSettings(max_backlog=-1)
    assert str(info.value).startswith("[config_error] max_backlog=-1:") and "argument max_backlog" in str(info.value)
    with pytest.raises(E.ConfigError) as info:
        ClientSettings.from_env({"HEADRACE_MAX_BACKLOG": "-1"})
    assert "HEADRACE_MAX_BACKLOG='-1':" in str(info.value) and info.value.field == "max_backlog"
    s = ClientSettings.from_env({"HEADRACE_MAX_BACKLOG": "3"}, timeout_s=5.0)
    assert s.setting_source("max_backlog") == "env" and s.setting_hint("max_backlog") == "HEADRACE_MAX_BACKLOG"
    assert s.setting_source("timeout_s") == "argument" and s.setting_hint("timeout_s") == "the timeout_s argument"
    assert s.setting_source("namespace") == "default"
    assert s.replace(deadline_s=1.0).setting_source("max_backlog") == "env"  # kept through replace
    assert s.replace(max_backlog=4).setting_source("max_backlog") == "argument"


def test_retry_policy_validation_and_decisions() -> None:
    for bad in ({"attempts": 0}, {"attempts": True}, {"on": (ValueError,)}, {"backoff": 0.1}):
        with pytest.raises(E.ConfigError):
            Retry(**bad)  # type: ignore[arg-type]
    policy = Retry(3, BackoffPolicy(base_s=0.1, cap_s=1.0, jitter=0.0))
    attempts = policy.start()
    assert attempts.next_delay(E.ResultTimeout("t")) == 0.1
    assert attempts.next_delay(E.QueueFull("f", retry_after_s=0.5)) == 0.5  # at least retry_after_s
    assert attempts.next_delay(E.ResultTimeout("t")) is None  # three submissions made
    assert policy.start().next_delay(E.InferenceFailed("bad input")) is None  # not retryable
    assert policy.start().next_delay(E.BrokerError("NOPERM", retryable=False)) is None
    assert Retry.none().start().next_delay(E.BrokerError("lost")) is None
    only_broker = Retry(5, on=(E.BrokerError,))
    assert only_broker.start().next_delay(E.ResultTimeout("t")) is None
    clock = iter([100.0, 100.0])
    late = policy.start(deadline_ms=100_050)
    late._time = lambda: next(clock)
    assert late.next_delay(E.ResultTimeout("t")) is None  # 0.1 s would pass the deadline


def _record(workers: dict[str, Any]) -> Any:
    sig = {"inputs": {"x": {"dtype": "float32", "shape": [4]}}, "outputs": {"y": {"dtype": "float32"}}}
    return decode_record("affine", json.dumps({"model": "affine", "updated_ms": NOW, "workers": workers, "signatures": {
        "1": {"seen_ms": NOW, "describe": json.dumps(sig)}, "2": {"seen_ms": NOW, "describe": json.dumps(sig)}}}))


def test_model_status_and_description_from_the_registry() -> None:
    rec = _record({
        "a": {"seen_ms": NOW - 1000, "version": "2", "max_batch": 32, "max_wait_ms": 5.0, "lag": 4, "pending": 1,
              "p50_ms": 10.0, "p99_ms": 30.0},
        "b": {"seen_ms": NOW - 500, "version": "2", "max_batch": 64, "lag": 7, "pending": 2, "p50_ms": 20.0,
              "p99_ms": 80.0},
        "old": {"seen_ms": NOW - 120_000, "version": "1", "max_batch": 8},
    })
    st = model_status("affine", rec, NOW)
    assert st.ready and [w.consumer for w in st.live_workers] == ["a", "b"] and st.versions == ("2",)
    assert (st.lag, st.pending, st.backlog) == (7, 2, 9)  # the newest heartbeat's reading
    assert (st.latency_p50_ms, st.latency_p99_ms) == (15.0, 80.0) and st.last_seen_s == 0.5
    assert st.to_dict()["live_workers"] == ["a", "b"]
    none = model_status("nope", None, NOW)
    assert not none.registered and not none.ready and none.last_seen_s is None
    d = describe("affine", rec, NOW)
    assert d.versions == ("2",) and set(d.signatures) == {"1", "2"} and d.live_workers == 2
    assert d.batching["2"].max_batch == 64 and d.signature() == d.signatures["2"]
    assert json.loads(json.dumps(d.to_dict()))["batching"]["2"]["max_batch"] == 64
    with pytest.raises(E.UnknownModel):
        describe("nope", None, NOW)
    gone = describe("affine", _record({}), NOW)
    assert gone.versions == () and gone.signature() == gone.signatures["2"]  # newest known


def test_registry_cache_ages_its_reads() -> None:
    now = [0.0]
    cache = RegistryCache(ttl_s=2.0, clock=lambda: now[0])
    rec = _record({"a": {"seen_ms": NOW, "version": "2"}})
    cache.store("affine", rec, NOW)
    assert cache.fresh("affine")
    now[0] = 31.0  # the only heartbeat is 31 s old by now: not live
    assert not cache.fresh("affine")
    status = cache.status("affine")
    assert status is not None and not status.ready
    with pytest.raises(E.ModelUnavailable):
        cache.check("affine", require_registered=True, fail_fast=True)
    cache.check("affine", require_registered=True, fail_fast=False)
    cache.store("ghost", None, NOW)
    assert not cache.fresh("ghost")  # an unregistered model is read again next time
    with pytest.raises(E.UnknownModel):
        cache.check("ghost", require_registered=True, fail_fast=False)
    cache.store("affine", None, NOW)  # Redis lost its data: the registry is empty for a moment
    cache.check("affine", require_registered=True, fail_fast=False)  # a model seen registered stays known
    with pytest.raises(E.ModelUnavailable):
        cache.check("affine", require_registered=True, fail_fast=True)


def test_progress_is_off_without_a_terminal_and_a_callback_sees_bursts(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_err = io.StringIO()
    monkeypatch.setattr("sys.stderr", fake_err)
    bar = make_progress(None, 10, "m")
    bar.update(10)
    bar.close()
    assert fake_err.getvalue() == ""  # not a TTY: tqdm disable=None turns itself off
    forced = make_progress(True, 10, "m")
    forced.update(10)
    forced.close()
    assert "10/10" in fake_err.getvalue()
    seen: list[tuple[int, int | None]] = []
    cb = make_progress(lambda done, total: seen.append((done, total)), None, "m")
    cb.update(3)
    cb.update(2)
    assert seen == [(3, None), (5, None)]
    with pytest.raises(TypeError):
        make_progress("yes", 1, "m")  # type: ignore[arg-type]


def test_result_repr_is_compact() -> None:
    res = P.Result(request_id="r1", status="ok", outputs={"embeddings": np.zeros(384, np.float32)}, model="minilm",
                   version="2", timings=P.Timings(queue_ms=1.25, infer_ms=3.5, batch_size=8))
    text = repr(res)
    assert "embeddings': float32[384]" in text and "0., 0." not in text and len(text) < 200
    assert "model='minilm', version='2'" in text and "batch_size=8" in text
    err = P.error_result("r2", E.BAD_SHAPE, "x" * 500)
    assert "code='bad_shape'" in repr(err) and len(repr(err)) < 250


def test_readme_documents_every_client_setting_and_the_error_table() -> None:
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Client settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", table, flags=re.M))
    assert documented == {f.name for f in dataclasses.fields(ClientSettings)}
    errors = readme.split("### Errors: which method raises what", 1)[1].split("\n### ", 1)[0]
    for name in ("UnknownModel", "ModelUnavailable", "QueueFull", "BrokerError", "ResultTimeout",
                 "RequestCancelled", "InferenceFailed", "RequestExpired", "ConfigError"):
        assert f"`{name}`" in errors, name
