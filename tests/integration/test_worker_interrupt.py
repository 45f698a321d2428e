"""A request that makes the model run forever, on a model that can be interrupted.

The graph is legal ONNX: a ``Loop`` whose trip count is the largest value a request sends.
One crafted request (``n = 10**13``) would hold onnxruntime for hours. Past
``infer_timeout_s`` the worker sets onnxruntime's terminate flag, the call fails, and the
worker isolates the culprit the way it isolates any failing request: its batch-mates are
answered, the culprit alone is dead-lettered ``model_error`` (not retried: it would hold the
next worker as long), and the same worker process keeps serving.

And a request whose inputs the model itself refuses (onnxruntime's INVALID_ARGUMENT: an
index out of range) is answered ``model_error`` on its first delivery, not retried.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client.keys import ModelKeys
from tests.support.byom import models_add, serving

FOREVER = 10**13


def loop_model(path: Path) -> Path:
    """``y = float(n)`` per row, after a ``Loop`` of ``max(n)`` iterations over the call."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    body = h.make_graph(
        [h.make_node("Add", ["acc_in", "one"], ["acc_out"]), h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("acc_in", T.FLOAT, [])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, [])],
        initializer=[nh.from_array(np.array(1, np.float32), "one")])
    graph = h.make_graph(
        [h.make_node("ReduceMax", ["n"], ["m"], keepdims=0),
         h.make_node("Loop", ["m", "yes", "zero"], ["count"], body=body),
         h.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
         h.make_node("Mul", ["count", "zero"], ["nothing"]),
         h.make_node("Add", ["nf", "nothing"], ["y"])],
        "loop", [h.make_tensor_value_info("n", T.INT64, ["B", 1])], [h.make_tensor_value_info("y", T.FLOAT, ["B", 1])],
        initializer=[nh.from_array(np.array(True), "yes"), nh.from_array(np.array(0, np.float32), "zero")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.timeout(240)
def test_a_request_that_hangs_the_model_is_interrupted_and_the_worker_goes_on(redis_url: str,
                                                                              tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    np.savez(tmp_path / "example.npz", n=np.array([[3], [4]], np.int64))
    models_add(repo, "loop", loop_model(tmp_path / "loop.onnx"), "--example", str(tmp_path / "example.npz"))
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "loop")
    with serving(redis_url, repo, "loop", tmp_path / "worker.log", "--infer-timeout-s", "2", "--lease-s", "2",
                 "--max-batch", "16", "--max-wait-ms", "300") as worker, Client(redis_url) as client:
        values = [5, 6, 7, FOREVER, 8, 9, 10]
        tickets = [client.submit("loop", {"n": np.array([v], np.int64)}) for v in values]
        results = client.collect(tickets, timeout_s=90)
        # A multi-sample entry with the culprit as one of its rows: the other rows are answered.
        block = client.map_arrays("loop", {"n": np.array([[11], [FOREVER], [12], [13]], np.int64)},
                                  raise_on_error=False, chunk_size=4, timeout_s=90)
        after = client.infer("loop", {"n": np.array([2], np.int64)}, timeout_s=30)
        assert worker.proc.poll() is None, worker.log()
        log = worker.log()
    by_value = dict(zip(values, results, strict=True))
    for v, res in by_value.items():
        if v == FOREVER:
            assert res.status == "error" and res.code == "model_error", res
            assert "infer_timeout_s=2" in (res.message or "") and "not retried" in (res.message or ""), res
        else:
            assert res.ok, res
            np.testing.assert_array_equal(res.outputs["y"], np.array([v], np.float32))
    assert r.xlen(keys.dlq) == 1  # the culprit, once: it was not retried
    assert list(block.ok) == [True, False, True, True]
    np.testing.assert_array_equal(block.outputs["y"][[0, 2, 3]], np.array([[11], [12], [13]], np.float32))
    assert "infer_timeout_s=2" in block.failures[1].message
    assert after.ok and float(after.outputs["y"][0]) == 2.0
    assert "interrupting it" in log
    assert "this worker stops" not in log


def gather_model(path: Path) -> Path:
    """``y = table[idx]`` for int64 ``idx [B, 3]`` into a 10-row table: onnxruntime refuses
    an index outside [-10, 9] with INVALID_ARGUMENT."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    graph = h.make_graph(
        [h.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [h.make_tensor_value_info("idx", T.INT64, ["B", 3])], [h.make_tensor_value_info("y", T.FLOAT, ["B", 3])],
        initializer=[nh.from_array(np.arange(10, dtype=np.float32) * 10, "table")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.timeout(120)
def test_inputs_the_model_refuses_are_answered_at_once_not_retried(redis_url: str, tmp_path: Path) -> None:
    # An index out of range is the request's own fault and fails the same on every try:
    # answered model_error in one delivery, not after max_deliveries x lease_s (90 s here).
    repo = tmp_path / "repo"
    models_add(repo, "gather", gather_model(tmp_path / "gather.onnx"))
    r = redis.Redis.from_url(redis_url)
    with serving(redis_url, repo, "gather", tmp_path / "worker.log", "--lease-s", "30",
                 "--max-wait-ms", "200") as worker, Client(redis_url) as client:
        good = [client.submit("gather", {"idx": np.array([i, 1, 2], np.int64)}) for i in range(4)]
        bad = client.submit("gather", {"idx": np.array([1, 99, 2], np.int64)})
        results = client.collect([*good, bad], timeout_s=20)
        assert worker.proc.poll() is None
    *oks, refused = results
    for i, res in enumerate(oks):
        assert res.ok, res
        np.testing.assert_array_equal(res.outputs["y"], np.array([i, 1, 2], np.float32) * 10)
    assert refused.code == "model_error" and "refused the inputs" in (refused.message or ""), refused
    assert "out of" in (refused.message or "")  # onnxruntime's reason is passed on
    assert r.xlen(ModelKeys("headrace", "gather").dlq) == 0
