"""The worker's startup heap freeze (workers/engine/heap.py) and where it is applied."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from headrace.workers import run as run_mod
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.heap import freeze_startup_heap
from headrace.workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process must not keep its heap frozen for the tests after


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_takes_the_live_heap_out_of_the_collectors_walks(unfreeze: None) -> None:
    kept = _Node()
    assert any(o is kept for o in gc.get_objects())
    frozen = freeze_startup_heap()
    # Reference counting frees frozen objects that die (a thread of an earlier test ending
    # drops its last objects at any moment), so the count may only have fallen since.
    assert 0 < gc.get_freeze_count() <= frozen
    assert not any(o is kept for o in gc.get_objects())  # full collections no longer walk it
    later = _Node()
    assert any(o is later for o in gc.get_objects())  # objects made after the freeze are collected as before
    ref = weakref.ref(later)
    del later
    gc.collect()
    assert ref() is None


def test_cyclic_garbage_unreachable_at_the_freeze_is_collected_not_frozen(unfreeze: None) -> None:
    gc.disable()  # so that nothing but the freeze's own collection frees the cycle
    try:
        garbage = _Node()
        ref = weakref.ref(garbage)
        del garbage
        assert ref() is not None
        freeze_startup_heap()
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("enabled", [True, False])
def test_run_standalone_freezes_after_loading_the_model_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    order: list[str] = []

    class _Done:
        consumer, stuck, failed = "c", None, None

        def stats(self) -> dict[str, Any]:
            return {}

    async def serve(settings: WorkerSettings, servable: Any, **_: Any) -> _Done:
        order.append("serve")
        return _Done()

    monkeypatch.setattr(run_mod, "serve", serve)
    monkeypatch.setattr(run_mod, "freeze_startup_heap", lambda: order.append("freeze") or 0)
    settings = WorkerSettings(model="affine", gc_freeze=enabled)
    run_mod.run_standalone(settings, AffineServable())
    assert order == (["freeze", "serve"] if enabled else ["serve"])


def test_the_setting_reaches_the_environment_and_flags() -> None:
    assert WorkerSettings.from_env({"HEADRACE_MODEL": "m", "HEADRACE_GC_FREEZE": "false"}).gc_freeze is False
    assert WorkerSettings(model="m").gc_freeze is True
