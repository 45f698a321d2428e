"""The TFLite (edge) export of ``headrace compress``: signature name mapping, freezing
symbolic shapes to static ones, padding feeds, refusals and onnx2tf crashes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.compress import tiny_mlp_onnx

X16 = {"x": [None, 16]}


def test_tflite_signature_names_map_by_name_or_by_position() -> None:
    from headrace.client.errors import ModelError
    from headrace.models.compress.edge import _mapping

    assert _mapping(["x", "attention_mask"], ["attention_mask", "x"]) == {"x": "x", "attention_mask": "attention_mask"}
    assert _mapping(["input:0"], ["input_0"]) == {"input:0": "input_0"}
    assert _mapping(["logits", "state"], ["output_1", "output_0"]) == {"logits": "output_0", "state": "output_1"}
    with pytest.raises(ModelError, match="do not match"):
        _mapping(["a", "b"], ["output_0"])


def test_tflite_freezes_graphs_symbolic_beyond_the_batch_axis() -> None:
    from headrace.client.errors import ModelError
    from headrace.models.compress.edge import _pad_to, static_shapes
    from headrace.models.compress.freeze import needs_freezing

    text = {"input_ids": [None, None], "attention_mask": [None, None]}
    assert needs_freezing(text) and needs_freezing({"state": [2, None, 128]})
    assert not needs_freezing({"x": [None, 3, 32, 32]}) and not needs_freezing(X16)
    one = {"input_ids": np.ones((1, 7), np.int64), "attention_mask": np.ones((1, 7), np.int64)}
    assert static_shapes(text, one, seq_length=64) == {"input_ids": [1, 64], "attention_mask": [1, 64]}
    assert static_shapes(text, one) == {"input_ids": [1, 7], "attention_mask": [1, 7]}
    # a batch axis that is not axis 0 (silero-vad's state) keeps the sample's own shape
    assert static_shapes({"state": [2, None, 3]}, {"state": np.zeros((2, 1, 3))}, seq_length=64) == {"state": [2, 1, 3]}
    with pytest.raises(ModelError, match="no matching calibration sample"):
        static_shapes(text, {"input_ids": one["input_ids"]})
    padded = _pad_to(np.array([[5, 6, 7]]), [1, 5])
    np.testing.assert_array_equal(padded, [[5, 6, 7, 0, 0]])
    with pytest.raises(ModelError, match="does not fit"):
        _pad_to(np.ones((1, 6)), [1, 5])


@pytest.mark.skipif(importlib.util.find_spec("onnx2tf") is None, reason="onnx2tf is not installed")
def test_tflite_full_integer_refuses_token_inputs(tmp_path: Path) -> None:
    from headrace.client.errors import ModelError
    from headrace.models.compress.edge import export_tflite

    src = tiny_mlp_onnx(tmp_path / "mlp.onnx")
    with pytest.raises(ModelError, match="--tflite-quant dynamic"):
        export_tflite(src, [{"x": np.ones((1, 16), np.int64)}], tmp_path / "t", quant="integer")


def test_freeze_graph_folds_shapes_and_checks_them(tmp_path: Path) -> None:
    import onnx

    from headrace.client.errors import ModelError
    from headrace.models.compress.freeze import free_lengths, freeze_graph
    from headrace.models.compress.source import graph_signature

    src = tiny_mlp_onnx(tmp_path / "mlp.onnx")
    out = freeze_graph(src, tmp_path / "frozen.onnx", {"x": [1, 16]})
    assert graph_signature(out)[0] == {"x": [1, 16]}
    model = onnx.load(str(out))
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1  # inferred through the graph
    with pytest.raises(ModelError, match="positive dims"):
        freeze_graph(src, tmp_path / "bad.onnx", {"x": [1]})
    with pytest.raises(ModelError, match="failed"):
        freeze_graph(src, tmp_path / "bad.onnx", {"x": [1, 15]})  # contradicts the 16-wide weights
    assert free_lengths(src, 64) == [65, 63] and free_lengths(src, 63) == [63]  # 64: the MLP's width


def test_an_onnx2tf_crash_is_a_model_error_naming_the_signal_without_tensorflow_start_up_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnx2tf dies by SIGSEGV on some graphs (an LSTM here); the step must fail with its reason
    # in view, not the tail of TensorFlow's oneDNN/CUDA notices.
    import subprocess

    from headrace.client.errors import ModelError
    from headrace.models.compress import edge

    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             "I0000 00:00:1796303751.260946   17074 port.cc:153] oneDNN custom operations are on.\n"
             "W0000 00:00:1796303751.261393   17074 cudart_stub.cc:31] Could not find cuda drivers\n")

    def crashed(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs["env"]["TF_CPP_MIN_LOG_LEVEL"] == "2"
        return subprocess.CompletedProcess(args[0], -11, stdout="Saved artifact at 'x/tflite'\n", stderr=noise)

    monkeypatch.setattr(edge.subprocess, "run", crashed)
    with pytest.raises(ModelError) as info:
        edge._convert({"out": str(tmp_path), "quant": "dynamic"}, "model.onnx")
    msg = info.value.message
    assert "crashed with SIGSEGV" in msg and "Saved artifact" in msg
    assert "oneDNN" not in msg and "cuda" not in msg
