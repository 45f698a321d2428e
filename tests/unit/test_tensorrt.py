"""TensorRT engines. Engine builds need ``tensorrt`` and a CUDA GPU and skip with the reason
otherwise; the profile and portability checks run everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from headrace.client.errors import ConfigError, ModelError
from headrace.models.builtin import digits as DG
from headrace.models.compress import quantize as Q
from headrace.models.compress import tensorrt as T

AVAILABLE, REASON = T.tensorrt_available()
needs_trt = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT engine builds need tensorrt + CUDA: {REASON}")


def test_availability_is_explained() -> None:
    assert isinstance(AVAILABLE, bool) and REASON
    if not AVAILABLE:
        with pytest.raises(ModelError, match="TensorRT is unavailable"):
            T.build_engine("x.onnx", "x.plan", T.text_profile())


def test_profiles_cover_dynamic_axes() -> None:
    p = T.text_profile(opt_batch=4, max_batch=16, opt_seq=32, max_seq=128)
    assert p["input_ids"] == ((1, 1), (4, 32), (16, 128)) and p["attention_mask"] == p["input_ids"]
    assert T.tensor_profile("image", (64,), max_batch=64) == {"image": ((1, 64), (8, 64), (64, 64))}
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        T.text_profile(opt_batch=64, max_batch=32)
    with pytest.raises(ConfigError):
        T.tensor_profile("image", (64,), min_batch=0)


def test_onnxruntime_fused_graphs_are_refused(tmp_path: Path) -> None:
    node = helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft", name="gelu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor("b", TensorProto.FLOAT, [4], [0.0] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "fused.onnx"))
    with pytest.raises(ConfigError, match="plain export"):
        T.check_portable(tmp_path / "fused.onnx")


@pytest.fixture(scope="module")
def digits_graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DG.DigitsData]:
    data = DG.load_data()
    model, _ = DG.train(data, epochs=20)
    path = tmp_path_factory.mktemp("trt") / "digits.onnx"
    DG.export(model, path)
    T.check_portable(path)  # a plain export passes
    return path, data


@needs_trt
@pytest.mark.timeout(600)
def test_fp16_engine_matches_onnx(digits_graphs: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, data = digits_graphs
    fp16 = Q.convert_fp16(path, tmp_path / "fp16.onnx")
    rep = T.build_engine(fp16, tmp_path / "fp16.plan", T.tensor_profile("image", (64,), max_batch=64))
    assert rep.size_bytes > 0 and rep.strongly_typed
    runner = T.EngineRunner(tmp_path / "fp16.plan")
    got = runner.run({"image": data.x_test[:64]})["logits"]
    ref = DG.onnx_logits(path, data.x_test[:64])
    assert got.shape == (64, 10)
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.98
    np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))


@needs_trt
@pytest.mark.timeout(600)
def test_int8_qdq_engine_keeps_accuracy(digits_graphs: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, data = digits_graphs
    cal = [{"image": data.x_train[i:i + 64]} for i in range(0, 256, 64)]
    qdq = Q.quantize_static_int8(path, tmp_path / "qdq.onnx", cal, symmetric_activations=True)
    T.build_engine(qdq, tmp_path / "int8.plan", T.tensor_profile("image", (64,), max_batch=64))
    runner = T.EngineRunner(tmp_path / "int8.plan")
    logits = np.concatenate([runner.run({"image": data.x_test[i:i + 50]})["logits"] for i in range(0, 450, 50)])
    acc = float((logits.argmax(1) == data.y_test).mean())
    ref = float((DG.onnx_logits(path, data.x_test).argmax(1) == data.y_test).mean())
    assert acc >= ref - 0.02
