"""Hostile arguments to the SDK: infinite/nan timeouts and deadlines, texts that are not
valid UTF-8, arguments of the wrong type, bad URLs and refused credentials. Each must give
the documented error (or, for an infinite timeout, wait without limit), never a raw Python
exception from deep inside."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import BrokerError, Client, ConfigError, ProtocolError
from headrace.client import errors as E
from tests.support.client import affine_inputs, start_fake_worker
from tests.support.worker import queued

pytestmark = pytest.mark.timeout(60)
INF, NAN = float("inf"), float("nan")


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url, reply_block_ms=200, timeout_s=5, require_registered=False) as c:
        yield c


def late_worker(redis_url: str, started: list[Any], delay_s: float = 0.3) -> threading.Timer:
    """Start an affine worker after ``delay_s``: the waits below must really block."""
    timer = threading.Timer(delay_s, lambda: started.append(start_fake_worker(redis_url, "affine", "affine")))
    timer.start()
    return timer


@pytest.mark.parametrize("how", ["setting", "env", "per_call", "ticket", "collect"])
def test_an_infinite_timeout_waits_without_limit(redis_url: str, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "env":
        monkeypatch.setenv("HEADRACE_TIMEOUT_S", "inf")
    kw: dict[str, Any] = {"timeout_s": INF} if how == "setting" else {}
    started: list[Any] = []
    with Client(redis_url, reply_block_ms=200, require_registered=False, **kw) as c:
        timer = late_worker(redis_url, started)
        try:
            if how == "ticket":
                res = c.submit("affine", affine_inputs(1)).result(INF)
            elif how == "collect":
                [res] = c.collect([c.submit("affine", affine_inputs(1))], timeout_s=INF)
            else:
                res = c.infer("affine", affine_inputs(1), timeout_s=INF if how == "per_call" else None)
            assert res.ok
        finally:
            timer.join()
            for w in started:
                w.stop()


@pytest.mark.parametrize("setting", [{"timeout_s": NAN}, {"deadline_s": INF}, {"deadline_s": NAN}])
def test_nan_and_infinite_settings_are_config_errors(redis_url: str, setting: dict[str, float]) -> None:
    [(name, _)] = setting.items()
    with pytest.raises(ConfigError) as info:
        Client(redis_url, **setting)
    assert info.value.field == name


def test_nan_timeouts_and_nan_or_infinite_deadlines_per_call(client: Client, redis_url: str) -> None:
    x = affine_inputs(0)
    calls = [lambda: client.infer("affine", x, timeout_s=NAN),
             lambda: client.submit("affine", x).result(NAN),
             lambda: client.collect([], timeout_s=NAN),
             lambda: client.map("affine", [x], timeout_s=NAN, progress=False),
             lambda: client.submit("affine", x, deadline_s=INF),
             lambda: client.infer("affine", x, deadline_s=NAN),
             lambda: client.map("affine", [x, x], deadline_s=INF, progress=False),
             lambda: client.map_arrays("affine", {"x": np.ones((2, 4), np.float32)}, deadline_s=NAN)]
    for call in calls:
        with pytest.raises(ConfigError, match="seconds"):
            call()
    r = redis.Redis.from_url(redis_url)
    assert queued(r, client.model_keys("affine")) == 1  # only the submit of the nan result() call


@pytest.mark.parametrize("call", ["submit", "infer", "map", "map_arrays"])
def test_a_text_with_a_lone_surrogate_is_a_protocol_error(client: Client, redis_url: str, call: str) -> None:
    bad = "\udcff"  # what os.fsdecode makes of an undecodable byte
    with pytest.raises(ProtocolError, match="not valid UTF-8") as info:
        if call == "submit":
            client.submit("length", text=bad)
        elif call == "infer":
            client.infer("length", text=bad)
        elif call == "map":
            client.map("length", ["ok", bad, "ok2"], progress=False)
        else:
            client.map_arrays("length", texts=["ok", bad])
    assert info.value.code == E.BAD_VALUE
    assert queued(redis.Redis.from_url(redis_url), client.model_keys("length")) == 0


def test_a_per_call_retry_of_the_wrong_kind_and_inputs_that_are_not_arrays(client: Client, redis_url: str) -> None:
    """``retry=3`` on a call, ``inputs`` as a list and ragged nested lists raised AttributeError /
    ValueError from deep inside; they are the documented errors, and nothing is enqueued."""
    x = affine_inputs(0)
    for call in [lambda: client.submit("affine", x, retry=3),  # type: ignore[arg-type]
                 lambda: client.infer("affine", x, retry="x"),  # type: ignore[arg-type]
                 lambda: client.map("affine", [x], retry=3, progress=False)]:  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="retry must be") as info:
            call()
        assert info.value.field == "retry"
    with pytest.raises(ProtocolError, match="must be a mapping") as bad:
        client.submit("affine", [1.0, 2.0])  # type: ignore[arg-type]
    assert bad.value.code == E.BAD_VALUE
    for call in [lambda: client.submit("affine", {"x": [[1.0, 2.0], [3.0]]}),
                 lambda: client.map("affine", [x, {"x": [[1.0], [2.0, 3.0]]}], progress=False)]:
        with pytest.raises(E.InvalidTensorError, match="'x' is not one array") as ragged:
            call()
        assert ragged.value.code == E.BAD_SHAPE
    with pytest.raises(E.InvalidTensorError, match="not one array") as block:
        client.map_arrays("affine", {"x": [[1.0, 2.0], [3.0]]})
    assert block.value.code == E.BAD_SHAPE
    with pytest.raises(ProtocolError, match="iterable of blocks"):  # its keys were taken for text blocks
        list(client.imap_arrays("affine", {"x": np.ones((2, 4), np.float32)}))
    assert queued(redis.Redis.from_url(redis_url), client.model_keys("affine")) == 0


@pytest.mark.parametrize("kw", [{"retry": "x"}, {"settings": "x"}, {"redis_url": "http://127.0.0.1:6379"},
                                {"redis_url": "not a url"}, {"redis_url": "http://u:s3cret@127.0.0.1:6379"}])
def test_arguments_of_the_wrong_kind_fail_at_construction(kw: dict[str, Any]) -> None:
    [(name, _)] = kw.items()
    with pytest.raises(ConfigError) as info:
        Client(**kw)
    assert info.value.field == name
    assert "s3cret" not in str(info.value)


def test_refused_credentials_enqueue_nothing_and_set_no_cancel_marker(redis_url: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    bad = redis_url.replace("redis://", "redis://nosuchuser:pw@", 1)
    with Client(bad, require_registered=False, timeout_s=2) as c, caplog.at_level(logging.WARNING,
                                                                                  "headrace.client"):
        for _ in range(2):
            with pytest.raises(BrokerError) as info:
                c.infer("affine", affine_inputs(0))
            assert "nothing was enqueued" in str(info.value) and "may or may not" not in str(info.value)
            assert not info.value.retryable
    assert not [r for r in caplog.records if "cancel marker" in r.getMessage()]
