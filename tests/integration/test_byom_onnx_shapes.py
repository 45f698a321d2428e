"""ONNX outputs whose length is set by values (detections, kept rows), served through
``headrace models add`` + ``headrace worker`` + Redis: no request gets a call-mate's rows,
a batched output that does not hold one row per sample is answered at once (not retried
until the DLQ), and an output without a shape in the file is added and served."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from headrace.client import Client
from tests.support.byom import latest, models_add, serving
from tests.unit.test_import_batch_follow import _detections, _filter, _save

pytestmark = pytest.mark.timeout(180)


def _alone(path: Path, name: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {name: x[None]})[0])


def test_detections_of_one_request_never_reach_its_call_mates(redis_url: str, tmp_path: Path) -> None:
    path = _detections(tmp_path / "det.onnx")
    np.savez(tmp_path / "ex.npz", scores=np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]], np.float32))
    repo = tmp_path / "repo"
    proc = models_add(repo, "det", path, "--example", str(tmp_path / "ex.npz"))
    two, none = np.array([0.9, 0.9, 0.0], np.float32), np.zeros(3, np.float32)  # 2 detections, then 0
    with serving(redis_url, repo, "det", tmp_path / "w.log", "--max-batch", "16", "--max-wait-ms", "300"), \
            Client(redis_url) as c:
        tickets = [c.submit("det", {"scores": v}) for v in (two, none, two, none)]
        results = [t.result(timeout_s=30) for t in tickets]
    assert all(r.ok for r in results), [(r.code, r.message) for r in results]
    for r, v in zip(results, (two, none, two, none), strict=True):
        np.testing.assert_array_equal(np.asarray(r.outputs["dets"]).reshape(-1, 2), _alone(path, "scores", v))
    assert "does not follow the batch" in proc.stdout


def test_a_batched_output_short_of_rows_is_answered_at_once_and_spares_its_call_mates(redis_url: str,
                                                                                    tmp_path: Path) -> None:
    # --output names det batched (taken as given): a request whose row the filter drops gets
    # 0 rows for 1 sample. The same input gives the same shape, so it is a model_error now,
    # not a retry per lease until max_deliveries; the requests of its call still get theirs.
    path = _filter(tmp_path / "filter.onnx")
    repo = tmp_path / "repo"
    models_add(repo, "filt", path, "--output", "det:float32:5")
    assert latest(repo, "filt").outputs[0].batch_axis == 0
    keep, drop = np.array([1, 2, 3, 4, 1.0], np.float32), np.array([5, 6, 7, 8, -5.0], np.float32)
    with serving(redis_url, repo, "filt", tmp_path / "w.log", "--max-batch", "16", "--max-wait-ms", "300",
                 "--lease-s", "60"), Client(redis_url) as c:
        t0 = time.monotonic()
        alone = c.submit("filt", {"x": drop}).result(timeout_s=20)
        batch = [t.result(timeout_s=20) for t in [c.submit("filt", {"x": v}) for v in (keep, drop, keep)]]
        took = time.monotonic() - t0
    assert (alone.status, alone.code) == ("error", "model_error") and "one row per sample" in str(alone.message)
    assert [r.code if not r.ok else "ok" for r in batch] == ["ok", "model_error", "ok"]
    for r in (batch[0], batch[2]):
        np.testing.assert_array_equal(r.outputs["det"], keep)
    assert took < 20  # well under one lease


def test_an_output_without_a_shape_in_the_file_is_added_and_served(redis_url: str, tmp_path: Path) -> None:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    path = _save(tmp_path / "noshape.onnx", [h.make_node("Mul", ["x", "two"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                 [nh.from_array(np.array(2, np.float32), "two")])
    repo = tmp_path / "repo"
    models_add(repo, "twice", path)
    rows = [np.arange(4, dtype=np.float32) + i for i in range(3)]
    with serving(redis_url, repo, "twice", tmp_path / "w.log"), Client(redis_url) as c:
        results = [t.result(timeout_s=30) for t in [c.submit("twice", {"x": r}) for r in rows]]
    for r, x in zip(results, rows, strict=True):
        np.testing.assert_array_equal(r.outputs["y"], 2 * x)
