"""Small real servables for tests, demos and chaos runs (numpy only, no model files).

* ``affine``: input ``x`` float32 of shape (4,), output ``y = x * 2 + 1`` (float32, (4,)).
* ``length``: text input, output ``length`` int64 of shape (1,) = number of characters.

Both can simulate trouble, configured in code or from the environment (so a worker process
started with ``python -m headrace.workers --fake affine`` can be told from a test):

    HEADRACE_FAKE_DELAY_MS   sleep this long per batch (float ms), to be "mid-batch" when killed
    HEADRACE_FAKE_POISON     affine: a float; length: a substring. A batch holding a matching
                             request raises ModelError (a "poison" request)
    HEADRACE_FAKE_CRASH      like POISON, but the process exits at once (os._exit(17))
    HEADRACE_FAKE_HANG       affine: a float; a batch holding it never returns (a wedged
                             model call, until ``unhang()``)
    HEADRACE_FAKE_RECORD     append "<request_id>\\n" per request per model run to this file,
                             to count invocations across processes

The public names and behaviour here are relied upon by other tests: keep them stable.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Request
from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.validate import check_tensors, check_text

FAKE_KINDS = ("affine", "length")
CRASH_EXIT_CODE = 17


def affine_reference(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """What the ``affine`` fake computes, for comparing results in tests."""
    return (np.asarray(x, dtype=np.float32) * np.float32(2.0) + np.float32(1.0)).astype(np.float32)


class _FakeBase(Servable):
    """Shared delay / poison / crash / recording behaviour."""

    thread_safe = True  # records under a lock; the rest is per call

    def __init__(self, name: str, version: str, delay_ms: float, record_path: str | None) -> None:
        self.name = name
        self.version = version
        self.delay_ms = float(delay_ms)
        self.record_path = record_path
        self._lock = threading.Lock()
        self.batches: list[list[str]] = []
        self.invocations: Counter[str] = Counter()
        self.closed = False

    def _record_ids(self, ids: list[str]) -> None:
        with self._lock:
            self.batches.append(ids)
            self.invocations.update(ids)
        if self.record_path:
            # One write() on an O_APPEND file: lines from several processes never interleave.
            fd = os.open(self.record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(f"{i}\n" for i in ids).encode())
            finally:
                os.close(fd)

    def _sleep(self) -> None:
        if self.delay_ms > 0:
            time.sleep(self.delay_ms / 1000.0)

    def close(self) -> None:
        self.closed = True


class AffineServable(_FakeBase):
    """``y = x * 2 + 1`` on float32 ``x`` of shape (4,).

    Args:
        poison: a request whose ``x`` contains this value makes its batch raise ModelError.
        crash: a request whose ``x`` contains this value exits the process (code 17).
        hang: a request whose ``x`` contains this value blocks its model call until
            :meth:`unhang` (a model stuck in native code).
    """

    inputs = (TensorSpec("x", "float32", (4,)),)
    outputs = (TensorSpec("y", "float32", (4,)),)

    def __init__(self, name: str = "affine", version: str = "1", *, delay_ms: float = 0.0,
                 poison: float | None = None, crash: float | None = None, hang: float | None = None,
                 record_path: str | None = None, reject_non_finite: bool = True) -> None:
        super().__init__(name, version, delay_ms, record_path)
        self.poison = poison
        self.crash = crash
        self.hang = hang
        self._unhang = threading.Event()
        self.reject_non_finite = reject_non_finite

    def unhang(self) -> None:
        """Let hung model calls return (and fail with ModelError)."""
        self._unhang.set()

    def check(self, request: Request) -> None:
        check_tensors(request, self.inputs, self.reject_non_finite)

    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        xs = np.stack([np.asarray(r.inputs["x"], dtype=np.float32) for r in requests])
        ys = self.infer_stacked({"x": xs}, [r.request_id for r in requests])["y"]
        return [{"y": ys[i]} for i in range(len(requests))]

    def runs_stacked(self) -> bool:
        return True

    def infer_stacked(self, inputs: Mapping[str, np.ndarray[Any, Any]],
                      request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        self._record_ids(list(request_ids))
        xs = np.asarray(inputs["x"], dtype=np.float32)
        if self.crash is not None and bool((xs == self.crash).any()):
            os._exit(CRASH_EXIT_CODE)
        if self.hang is not None and bool((xs == self.hang).any()):
            self._unhang.wait()
            raise E.ModelError("hung model call released")
        self._sleep()
        if self.poison is not None:
            hit = (xs == self.poison).reshape(len(xs), -1).any(axis=1)
            if hit.any():
                raise E.ModelError(f"poison input in request(s) {sorted({request_ids[int(i)] for i in np.flatnonzero(hit)})}")
        return {"y": affine_reference(xs)}


class LengthServable(_FakeBase):
    """Text model: ``length`` = number of characters, int64 of shape (1,).

    Args:
        poison: a request whose text contains this substring makes its batch raise ModelError.
        crash: a request whose text contains this substring exits the process (code 17).
        rows: run texts as rows (:meth:`infer_texts`, multi-sample entries carried as text
            blocks) instead of one request each.
    """

    accepts_text = True
    outputs = (TensorSpec("length", "int64", (1,)),)

    def __init__(self, name: str = "length", version: str = "1", *, delay_ms: float = 0.0,
                 poison: str | None = None, crash: str | None = None,
                 record_path: str | None = None, rows: bool = False) -> None:
        super().__init__(name, version, delay_ms, record_path)
        self.poison = poison
        self.crash = crash
        self.rows = rows
        #: the texts of each model call, in order (tests look at what ran together).
        self.text_calls: list[list[str]] = []

    def check(self, request: Request) -> None:
        check_text(request)

    def length(self, request: Request) -> int:
        return len(request.text or "")

    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        rows = self.infer_texts([r.text or "" for r in requests], [r.request_id for r in requests])["length"]
        return [{"length": row} for row in rows]

    def runs_stacked(self) -> bool:
        return self.rows

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(t) for t in texts]

    def infer_texts(self, texts: Sequence[str], request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        self._record_ids(list(request_ids))
        with self._lock:
            self.text_calls.append(list(texts))
        if self.crash and any(self.crash in t for t in texts):
            os._exit(CRASH_EXIT_CODE)
        self._sleep()
        if self.poison:
            bad = sorted({i for i, t in zip(request_ids, texts, strict=True) if self.poison in t})
            if bad:
                raise E.ModelError(f"poison text in request(s) {bad}")
        return {"length": np.array([[len(t)] for t in texts], dtype=np.int64).reshape(len(texts), 1)}


def make_fake(kind: str, name: str | None = None, **kwargs: Any) -> Servable:
    """Build a fake servable by kind (``affine`` or ``length``).

    Raises:
        ConfigError: unknown kind.
    """
    if kind == "affine":
        return AffineServable(name or "affine", **kwargs)
    if kind == "length":
        return LengthServable(name or "length", **kwargs)
    raise E.ConfigError(f"fake servable kind {kind!r} is not one of {list(FAKE_KINDS)}")


def fake_from_env(kind: str, name: str | None = None, env: Mapping[str, str] | None = None,
                  reject_non_finite: bool = True) -> Servable:
    """Build a fake servable configured by the ``HEADRACE_FAKE_*`` variables (see module doc).

    Raises:
        ConfigError: unknown kind, or a variable that does not parse.
    """
    env = os.environ if env is None else env
    try:
        delay_ms = float(env.get("HEADRACE_FAKE_DELAY_MS", "0") or 0)
    except ValueError as e:
        raise E.ConfigError("HEADRACE_FAKE_DELAY_MS must be a number of milliseconds") from e
    record = env.get("HEADRACE_FAKE_RECORD") or None
    poison_raw = env.get("HEADRACE_FAKE_POISON") or None
    crash_raw = env.get("HEADRACE_FAKE_CRASH") or None
    hang_raw = env.get("HEADRACE_FAKE_HANG") or None
    if kind == "affine":
        try:
            poison = float(poison_raw) if poison_raw is not None else None
            crash = float(crash_raw) if crash_raw is not None else None
            hang = float(hang_raw) if hang_raw is not None else None
        except ValueError as e:
            raise E.ConfigError("HEADRACE_FAKE_POISON / _CRASH / _HANG must be floats for 'affine'") from e
        return AffineServable(name or "affine", delay_ms=delay_ms, poison=poison, crash=crash, hang=hang,
                              record_path=record, reject_non_finite=reject_non_finite)
    if kind == "length":
        return LengthServable(name or "length", delay_ms=delay_ms, poison=poison_raw, crash=crash_raw,
                              record_path=record)
    raise E.ConfigError(f"fake servable kind {kind!r} is not one of {list(FAKE_KINDS)}")
