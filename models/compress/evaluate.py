"""Run any artifact (ONNX, TFLite) on the user's data and compare it with the fp32 source.

Outputs are gathered per output name with the samples on axis 0 (an output that carries
them elsewhere, e.g. a recurrent state ``[layers, batch, hidden]``, is moved), so every
metric of :func:`~headrace.models.compress.fidelity.fidelity_for` sees one row per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.models.compress.data import Feed
from headrace.models.compress.fidelity import fidelity_for

Outputs = dict[str, np.ndarray[Any, Any]]
RunAll = Callable[[Feed], Outputs]


def ort_session(path: str | Path, threads: int) -> Any:
    """A CPU onnxruntime session with ``threads`` intra-op threads and every graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises Fail/InvalidGraph/NotImplemented
        raise ModelError(f"onnxruntime cannot load {Path(path).name}: {e}") from e


def ort_run_all(path: str | Path, threads: int, output_names: Sequence[str]) -> RunAll:
    """feed -> every named output, from an onnxruntime session."""
    sess = ort_session(path, threads)
    inputs = [i.name for i in sess.get_inputs()]
    names = list(output_names)

    def run(feed: Feed) -> Outputs:
        return dict(zip(names, sess.run(names, {k: feed[k] for k in inputs}), strict=True))

    return run


def first_output(run: RunAll, name: str) -> Callable[[Feed], np.ndarray[Any, Any]]:
    """The runner of one output (what the speed measurement calls)."""
    return lambda feed: run(feed)[name]


def collect(run: RunAll, feeds: Sequence[Feed], axes: Mapping[str, int]) -> Outputs:
    """Every output over ``feeds``, samples on axis 0. An output whose length follows the call
    (a model that trims padding to the batch's longest row: ``[B, -1, 8]``) is zero-padded to
    the longest call's shape (:func:`stack_calls`).

    Raises:
        ModelError: the artifact fails on a batch, or an output changes rank between calls.
    """
    parts: dict[str, list[np.ndarray[Any, Any]]] = {k: [] for k in axes}
    for feed in feeds:
        try:
            out = run(feed)
        except Exception as e:  # noqa: BLE001 - any backend failure makes the artifact unusable
            raise ModelError(f"the artifact fails on the data: {e}") from e
        for k, ax in axes.items():
            parts[k].append(np.moveaxis(np.asarray(out[k]), ax, 0))
    return {k: stack_calls(k, v) for k, v in parts.items()}


def stack_calls(name: str, parts: Sequence[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """One output's per-call arrays (samples on axis 0) as one array. Calls whose other axes
    differ are zero-padded at the end of each axis to the largest: the reference and every
    artifact run the same batches, so they are padded alike and each sample is compared over
    the same positions (the padding agrees exactly, a trimmed position that one of them
    filled shows as an error).

    Raises:
        ModelError: the calls disagree on the output's rank (nothing to line up).
    """
    if len({p.shape[1:] for p in parts}) <= 1:
        return np.concatenate(parts)
    ranks = {p.ndim for p in parts}
    if len(ranks) > 1:
        raise ModelError(f"output {name!r} has {sorted(ranks)} axes in different calls; its samples cannot be "
                         "lined up to compare (pass --output to gate another output)")
    widest = np.max([p.shape[1:] for p in parts], axis=0)
    return np.concatenate([np.pad(p, [(0, 0), *((0, int(w) - d) for w, d in zip(widest, p.shape[1:], strict=True))])
                           for p in parts])


@dataclass(frozen=True)
class Comparison:
    """Fidelity of an artifact on the held-out data.

    Attributes:
        score: the gate's figure (of the primary output).
        primary: the output the gate looks at.
        kinds: output -> kind.
        metrics: output -> metric name -> value.
    """

    score: float
    primary: str
    kinds: dict[str, str]
    metrics: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "primary": self.primary, "kinds": self.kinds, "outputs": self.metrics}

    def flat(self) -> dict[str, float]:
        """The primary output's metrics (what the table shows)."""
        return dict(self.metrics[self.primary])


def compare(reference: Outputs, outputs: Outputs, kinds: Mapping[str, str], primary: str,
            labels: np.ndarray[Any, Any] | None = None) -> Comparison:
    """Metrics of every output by its kind; labels apply to the primary output.

    Raises:
        ConfigError: an output's shape differs from the reference's.
    """
    metrics = {k: fidelity_for(kinds[k], reference[k], outputs[k], labels if k == primary else None)
               for k in kinds}
    return Comparison(float(metrics[primary]["score"]), primary, dict(kinds), metrics)
