"""The compression report: speed and fidelity of every artifact, side by side, in one run.

Every artifact is a callable on a batch (text batches for MiniLM, pixel batches for digits).
Speed is measured *interleaved*: the artifacts take turns, one pass over the same batches
each (:func:`measure_speed`), so a noisy, shared machine slows all of them alike and the ratios
stay meaningful. Thread counts are pinned (torch ``set_num_threads``, onnxruntime ``intra_op_num_threads``) to the
same value for every backend.

Fidelity is against the fp32 torch teacher on held-out data (:mod:`.fidelity`). Results go
to a rich table, a PNG speed-vs-fidelity plot and each artifact's manifest (``measured``).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError
from headrace.client.optional import WORKER, require

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 8, 32)
Batch = dict[str, np.ndarray[Any, Any]]
RunFn = Callable[[Batch], np.ndarray[Any, Any]]


@dataclass
class Artifact:
    """One thing to measure.

    Attributes:
        label: row name (``int8 dynamic``).
        backend: ``torch``, ``onnxruntime`` or ``tensorrt``.
        precision: ``fp32``, ``int8``, ``fp16``, ``mixed``...
        run: batch -> outputs (embeddings or logits), already bound to its threads.
        params: parameter count (weights; 0 if unknown).
        size_bytes: model file size on disk.
        repo_ref: (name, version) in the model repository, to record ``measured`` there.
        note: shown in the table (e.g. "GPU target: CPU fidelity only").
        bench_speed: False for artifacts whose CPU speed means nothing (fp16 graphs).
    """

    label: str
    backend: str
    precision: str
    run: RunFn
    params: int = 0
    size_bytes: int = 0
    repo_ref: tuple[str, str] | None = None
    note: str = ""
    bench_speed: bool = True


@dataclass
class Row:
    """Measured figures of one artifact."""

    label: str
    backend: str
    precision: str
    params: int
    size_bytes: int
    throughput: dict[int, float] = field(default_factory=dict)  # batch size -> samples/s
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> {p50, p95, mean}
    speedup: dict[int, float] = field(default_factory=dict)  # vs the reference at each batch size
    fidelity: dict[str, float] = field(default_factory=dict)
    repo_ref: tuple[str, str] | None = None
    note: str = ""

    def measured(self, context: dict[str, Any]) -> dict[str, Any]:
        """The JSON written into the artifact's manifest ``measured``."""
        return {
            "size_bytes": self.size_bytes, "params": self.params,
            "throughput_per_s": {str(b): v for b, v in self.throughput.items()},
            "latency_ms": {str(b): v for b, v in self.latency_ms.items()},
            "speedup_vs_reference": {str(b): v for b, v in self.speedup.items()},
            "fidelity": self.fidelity, "bench": context,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput"] = {str(k): v for k, v in self.throughput.items()}
        d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        d["speedup"] = {str(k): v for k, v in self.speedup.items()}
        return d


def bench_context(threads: int, reference: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where and how figures were taken (stored next to them)."""
    import os

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": threads,
            "reference": reference, "host": platform.node(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), **(extra or {})}


# --- runners --------------------------------------------------------------------------------


def torch_runner(module: Any, threads: int) -> RunFn:
    """``module(*batch.values())`` under ``inference_mode`` with ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    module.eval()

    def run(batch: Batch) -> np.ndarray[Any, Any]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(v) for v in batch.values()))
        return np.asarray(out.float().numpy())

    return run


def ort_runner(path: str | Path, threads: int, *, output: str | None = None) -> RunFn:
    """An onnxruntime CPU session with ``threads`` intra-op threads, all graph optimisations."""
    ort = require("onnxruntime", WORKER)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [output] if output else None

    def run(batch: Batch) -> np.ndarray[Any, Any]:
        return np.asarray(sess.run(outs, {n: batch[n] for n in names})[0], dtype=np.float32)

    return run


# --- measurement ------------------------------------------------------------------------------


def outputs_of(artifact: Artifact, batches: Sequence[Batch]) -> np.ndarray[Any, Any]:
    """Concatenated outputs of ``artifact`` over ``batches``."""
    return np.concatenate([artifact.run(b) for b in batches])


def measure_speed(artifacts: Sequence[Artifact], batches_by_size: Mapping[int, Sequence[Batch]], *,
                  min_passes: int = 3, min_time_s: float = 2.0, max_passes: int = 50, warmup: int = 2,
                  progress: bool = True) -> dict[str, dict[int, list[list[float]]]]:
    """Per artifact label and batch size, the seconds each timed batch took, grouped by pass.

    Artifacts take turns, one *pass* over the same list of batches each: every artifact is
    timed on exactly the same batches equally often (with length-bucketed batches some are
    several times costlier than others, so a subset would bias the ratio), and passes rather
    than single batches keep one backend's idle thread pool, still spin-waiting after its
    last batch (onnxruntime and OpenMP both spin briefly), from eating into the next
    backend's timing. Turns expose every artifact to the same slow and fast moments of a
    shared machine, and :func:`summarize_speed` takes the median pass, so a burst of someone
    else's work during one pass does not decide the figure. Stops after ``min_passes`` once
    every artifact also has ``min_time_s`` of timed work, or after ``max_passes``.
    """
    from tqdm.auto import tqdm

    timed = [a for a in artifacts if a.bench_speed]
    out: dict[str, dict[int, list[list[float]]]] = {a.label: {} for a in timed}
    for size, batches in batches_by_size.items():
        if not batches:
            raise ConfigError(f"no batches of size {size} to benchmark")
        for a in timed:
            for b in batches[:warmup]:
                a.run(b)
            out[a.label][size] = []
        bar = tqdm(total=max_passes, desc=f"bench batch {size}", unit="pass", disable=not progress, leave=False)
        for n in range(1, max_passes + 1):
            for a in timed:
                times = []
                for b in batches:
                    t0 = time.perf_counter()
                    a.run(b)
                    times.append(time.perf_counter() - t0)
                out[a.label][size].append(times)
            bar.update(1)
            if n >= min_passes and all(sum(map(sum, out[a.label][size])) >= min_time_s for a in timed):
                break
        bar.close()
    return out


def pass_rows(batches_by_size: Mapping[int, Sequence[Batch]]) -> dict[int, int]:
    """Samples in one pass over each batch list (rows of the first input of every batch)."""
    return {size: sum(len(next(iter(b.values()))) for b in batches) for size, batches in batches_by_size.items()}


def summarize_speed(row: Row, passes: dict[int, list[list[float]]], rows_per_pass: dict[int, int]) -> None:
    """Fill ``row.throughput`` (samples/s of the median pass) and latency percentiles (ms per
    batch, over every timed batch)."""
    for size, ps in passes.items():
        per_pass = [rows_per_pass[size] / sum(p) for p in ps]
        flat = np.asarray([t for p in ps for t in p])
        row.throughput[size] = float(np.median(per_pass))
        row.latency_ms[size] = {"p50": float(np.percentile(flat, 50) * 1e3), "p95": float(np.percentile(flat, 95) * 1e3),
                                "mean": float(flat.mean() * 1e3), "passes": float(len(ps))}


def add_speedups(rows: Sequence[Row], reference: str) -> None:
    ref = next((r for r in rows if r.label == reference), None)
    if ref is None:
        return
    for r in rows:
        r.speedup = {b: r.throughput[b] / ref.throughput[b] for b in r.throughput if ref.throughput.get(b)}


def record(repo: Any, rows: Sequence[Row], context: dict[str, Any]) -> None:
    """Write each row's figures into its manifest's ``measured`` (rows without a repo entry
    -- the in-process torch baseline -- are skipped)."""
    for r in rows:
        if r.repo_ref is not None:
            repo.update_measured(r.repo_ref[0], r.repo_ref[1], _json_safe(r.measured(context)))


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


# --- presentation -------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table(rows: Sequence[Row], *, title: str, kind: str) -> Any:
    """A rich Table; ``kind`` is ``embedding`` or ``classifier`` (which fidelity columns)."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col in ("artifact", "backend", "prec", "MB", "params"):
        t.add_column(col, justify="left" if col in ("artifact", "backend", "prec") else "right")
    for b in BATCH_SIZES:
        t.add_column(f"/s @{b}", justify="right")
    t.add_column("p50 ms @1", justify="right")
    t.add_column("x torch @32", justify="right")
    if kind == "embedding":
        for col in ("mean cos", "min cos", "ovl@10", "spearman"):
            t.add_column(col, justify="right")
    else:
        for col in ("accuracy", "agree"):
            t.add_column(col, justify="right")
    t.add_column("note")
    for r in rows:
        cells = [r.label, r.backend, r.precision, _fmt(r.size_bytes / 1e6, ".1f"), _fmt(r.params / 1e6, ".2f") + "M"]
        cells += [_fmt(r.throughput.get(b), ".0f") for b in BATCH_SIZES]
        cells.append(_fmt(r.latency_ms.get(1, {}).get("p50"), ".2f"))
        cells.append(_fmt(r.speedup.get(32), ".2f"))
        f = r.fidelity
        if kind == "embedding":
            cells += [_fmt(f.get("mean_cosine"), ".4f"), _fmt(f.get("min_cosine"), ".4f"),
                      _fmt(f.get("overlap_at_k"), ".3f"), _fmt(f.get("spearman"), ".4f")]
        else:
            cells += [_fmt(f.get("accuracy"), ".4f"), _fmt(f.get("agreement"), ".4f")]
        cells.append(r.note)
        t.add_row(*cells)
    return t


def markdown_table(rows: Sequence[Row], *, kind: str) -> str:
    """The same table as GitHub markdown (for BENCHMARKS.md)."""
    head = ["artifact", "backend", "precision", "size MB", "params"] + [f"/s @{b}" for b in BATCH_SIZES]
    head += ["p50 ms @1", "× torch @32"]
    head += ["mean cos", "min cos", "overlap@10", "spearman"] if kind == "embedding" else ["test accuracy", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r.fidelity
        cells = [r.label, r.backend, r.precision, _fmt(r.size_bytes / 1e6, ".1f"), _fmt(r.params / 1e6, ".2f") + "M"]
        cells += [_fmt(r.throughput.get(b), ".0f") for b in BATCH_SIZES]
        cells += [_fmt(r.latency_ms.get(1, {}).get("p50"), ".2f"), _fmt(r.speedup.get(32), ".2f")]
        if kind == "embedding":
            cells += [_fmt(f.get("mean_cosine"), ".4f"), _fmt(f.get("min_cosine"), ".4f"),
                      _fmt(f.get("overlap_at_k"), ".3f"), _fmt(f.get("spearman"), ".4f")]
        else:
            cells += [_fmt(f.get("accuracy"), ".4f"), _fmt(f.get("agreement"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str | Path, *, title: str, kind: str, batch_size: int = 32) -> Path:
    """PNG: throughput at ``batch_size`` (x, log) against fidelity (y) -- mean cosine for
    embeddings, test accuracy for classifiers. Returns the path."""
    matplotlib = require("matplotlib", "plot", purpose="the report plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "mean_cosine" if kind == "embedding" else "accuracy"
    pts = [(r.throughput[batch_size], r.fidelity[key], r) for r in rows
           if batch_size in r.throughput and key in r.fidelity]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for x, y, r in pts:
        marker = {"torch": "s", "onnxruntime": "o", "tensorrt": "^"}.get(r.backend, "o")
        ax.scatter([x], [y], s=60, marker=marker, zorder=3)
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"throughput at batch {batch_size} (samples/s, log scale; same threads for all)")
    ax.set_ylabel("mean cosine to fp32 teacher (held-out)" if kind == "embedding" else "test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
