"""What one request can make an ONNX model do to its worker, bounded: a run that would go on
for hours is stopped on :meth:`OnnxServable.interrupt` (and the next runs go on after
``resume``), and memory a run allocated is given back afterwards."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from headrace.client import errors as E
from headrace.models.repository.store import IOSpec, ModelRepository
from headrace.workers.backends.onnx import OnnxServable
from tests.integration.test_worker_interrupt import loop_model


def _servable(tmp_path: Path, name: str, source: Path) -> OnnxServable:
    repo = ModelRepository(tmp_path / "repo")
    manifest = repo.add(name, {"model.onnx": source}, format="onnx", inputs=[IOSpec("n", "int64", (1,))],
                        outputs=[IOSpec("y", "float32", (1,))])
    return OnnxServable(manifest, repo.root / name / manifest.version / "model.onnx", intra_op_threads=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.timeout(60)
def test_a_run_that_would_take_hours_is_interrupted_and_the_next_runs(tmp_path: Path) -> None:
    sv = _servable(tmp_path, "loop", loop_model(tmp_path / "loop.onnx"))
    threading.Timer(0.5, sv.interrupt).start()
    t0 = time.monotonic()
    with pytest.raises(E.ModelError, match="terminate"):
        sv.infer_stacked({"n": np.array([[10**13]], np.int64)}, ["forever"])
    assert time.monotonic() - t0 < 10
    # Until resume, every run of the interrupted call stops too (a call may be several runs).
    with pytest.raises(E.ModelError, match="terminate"):
        sv.infer_stacked({"n": np.array([[3]], np.int64)}, ["same-call"])
    sv.resume()
    out = sv.infer_stacked({"n": np.array([[3], [4]], np.int64)}, ["a", "b"])
    np.testing.assert_array_equal(out["y"], np.array([[3], [4]], np.float32))


@pytest.mark.timeout(60)
def test_memory_a_run_allocated_is_given_back(tmp_path: Path) -> None:
    # y = sum(ones(n)): a request of one int64 makes the model allocate 4n bytes.
    graph = h.make_graph(
        [h.make_node("ReduceMax", ["n"], ["m2"], keepdims=1),
         h.make_node("Reshape", ["m2", "one"], ["m"]),
         h.make_node("ConstantOfShape", ["m"], ["ones"], value=nh.from_array(np.array([1], np.float32))),
         h.make_node("ReduceSum", ["ones"], ["total"], keepdims=1),
         h.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
         h.make_node("Mul", ["nf", "zero"], ["nothing"]),
         h.make_node("Add", ["nothing", "total"], ["y"])],
        "blowup", [h.make_tensor_value_info("n", T.INT64, ["B", 1])], [h.make_tensor_value_info("y", T.FLOAT, ["B", 1])],
        initializer=[nh.from_array(np.array(0, np.float32), "zero"), nh.from_array(np.array([1], np.int64), "one")])
    src = tmp_path / "blowup.onnx"
    import onnx

    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(src))
    sv = _servable(tmp_path, "blowup", src)
    sv.infer_stacked({"n": np.array([[1000]], np.int64)}, ["warm"])
    before = _rss_mb()
    n = 200_000_000  # 800 MB: past SHRINK_ABOVE_BYTES over the size after loading
    out = sv.infer_stacked({"n": np.array([[n]], np.int64)}, ["big"])
    assert float(out["y"][0, 0]) > 1e6  # it ran (a float32 sum of ones stops counting exactly at 2**24)
    sv.infer_stacked({"n": np.array([[1000]], np.int64)}, ["small"])  # gives the arena's free chunks back
    assert _rss_mb() - before < 200, f"RSS {before:.0f} MB before, {_rss_mb():.0f} MB after"
