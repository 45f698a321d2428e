"""Helpers shared by the SDK / CLI / Node integration tests: in-process fake workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from headrace.workers.backends.fake import make_fake
from tests.support.polling import poll_until


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll ``cond`` until true; raise AssertionError after ``timeout_s``."""
    return bool(poll_until(cond, timeout_s, interval_s))


def affine_inputs(i: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": (np.arange(4, dtype=np.float32) + np.float32(i))}


def start_fake_worker(url: str, kind: str, model: str, namespace: str = "headrace", **overrides: Any) -> Any:
    """Start the real stream worker (WorkerThread) with a fake servable for ``model``, tuned
    for fast tests (``overrides``: other settings, e.g. ``partitions``); the result has ``stop()``."""
    from headrace.workers.engine.thread import WorkerThread
    from headrace.workers.settings import WorkerSettings, default_consumer_name

    settings = WorkerSettings(model=model, redis_url=url, namespace=namespace, consumer=default_consumer_name(),
                              block_ms=100, max_wait_ms=2.0, max_batch=32, lease_s=5.0, drain_timeout_s=5.0,
                              trim_interval_s=1.0, **overrides)
    return WorkerThread(settings, make_fake(kind, name=model)).start()
