"""ONNX graphs wider than the usual image or text model: samples of many dimensions (served
in multi-sample entries, whose sample axis adds one), and decoders' many inputs (a KV cache
is two inputs per layer). Each is added, served by a real worker and compared with
onnxruntime run directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.byom import models_add, serving

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

pytestmark = pytest.mark.timeout(240)
SAMPLE = [2, 1, 2, 1, 2, 1, 2, 3]  # eight dimensions per sample: nine once stacked


def _save(graph: Any, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _rank8(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SAMPLE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *SAMPLE])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    node = helper.make_node("Mul", ["x", "two"], ["y"])
    return _save(helper.make_graph([node], "rank8", [x], [y], [two]), path)


def _many_inputs(path: Path, n: int) -> Path:
    ins = [helper.make_tensor_value_info(f"past_{i}", TensorProto.FLOAT, ["N", 3]) for i in range(n)]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    node = helper.make_node("Sum", [f"past_{i}" for i in range(n)], ["y"])
    return _save(helper.make_graph([node], "many", ins, [y]), path)


def _ort(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # type: ignore[no-any-return]


def test_samples_of_eight_dimensions_are_served_single_and_in_multi_sample_entries(redis_url: str,
                                                                                    tmp_path: Path) -> None:
    from headrace.client import Client

    src = _rank8(tmp_path / "rank8.onnx")
    repo = tmp_path / "repo"
    models_add(repo, "rank8", src)
    xs = np.random.default_rng(0).standard_normal((5, *SAMPLE)).astype(np.float32)
    want = _ort(src, {"x": xs})
    with serving(redis_url, repo, "rank8", tmp_path / "w.log"), Client(redis_url) as c:
        alone = c.infer("rank8", {"x": xs[0]}, timeout_s=30)
        np.testing.assert_allclose(alone.outputs["y"], want[0], rtol=1e-6)
        mapped = c.map("rank8", [{"x": x} for x in xs], chunk_size=5, timeout_s=30)
        assert [r.code for r in mapped if not r.ok] == []
        np.testing.assert_allclose(np.stack([r.outputs["y"] for r in mapped]), want, rtol=1e-6)
        arrays = c.map_arrays("rank8", {"x": xs}, chunk_size=5, timeout_s=30)
        assert not arrays.failures
        np.testing.assert_allclose(arrays.outputs["y"], want, rtol=1e-6)


def test_a_model_of_forty_inputs_answers_requests_carrying_all_of_them(redis_url: str, tmp_path: Path) -> None:
    from headrace.client import Client

    n = 40
    src = _many_inputs(tmp_path / "many.onnx", n)
    repo = tmp_path / "repo"
    models_add(repo, "many", src)
    rng = np.random.default_rng(1)
    feeds = {f"past_{i}": rng.standard_normal((3, 3)).astype(np.float32) for i in range(n)}
    want = _ort(src, feeds)
    with serving(redis_url, repo, "many", tmp_path / "w.log"), Client(redis_url) as c:
        results = c.map("many", [{k: v[j] for k, v in feeds.items()} for j in range(3)], chunk_size=1, timeout_s=30)
        assert [(r.code, r.message) for r in results if not r.ok] == []
        np.testing.assert_allclose(np.stack([r.outputs["y"] for r in results]), want, rtol=1e-5)
