"""torch -> ONNX export: dynamic axes, BERT fusions, numerical equivalence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from headrace.client.errors import ModelError
from headrace.models.builtin.minilm import MiniLM, MiniLMConfig
from headrace.models.compress.export import (
    OptimizeOptions,
    export_minilm,
    export_onnx,
    minilm_example_inputs,
)


def tiny_minilm(heads: tuple[int, ...] = (2, 2)) -> MiniLM:
    """A random MiniLM with the real structure but small tables, so export stays fast."""
    torch.manual_seed(0)
    cfg = MiniLMConfig(hidden_size=64, num_heads=heads, intermediate_sizes=(128,) * len(heads),
                       max_position=512, source_layers=tuple(range(len(heads))))
    return MiniLM(cfg).eval()


def run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.timeout(60)
def test_minilm_export_is_dynamic_fused_and_equivalent(tmp_path: Path) -> None:
    model = tiny_minilm()
    report = export_minilm(model, tmp_path / "m.onnx", optimize=True)
    assert report.exporter == "torchscript" and report.optimized
    assert report.fused_ops.get("Attention") == 2 and report.fused_ops.get("SkipLayerNormalization") == 4
    assert report.max_abs_diff < 1e-4 and report.min_cosine > 0.9999
    g = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in g.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in g.graph.output] == ["embeddings"]
    dims = [d.dim_param for d in g.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    # Shapes never seen at export time: batch 5, sequence 37.
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 30000, size=(5, 37), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 10:] = 0
    (got,) = run(tmp_path / "m.onnx", {"input_ids": ids, "attention_mask": mask})
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (5, 64)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.timeout(60)
def test_pruned_per_layer_heads_export(tmp_path: Path) -> None:
    model = tiny_minilm(heads=(2, 1))
    report = export_minilm(model, tmp_path / "p.onnx", optimize=True)
    assert report.max_abs_diff < 1e-4
    feed = minilm_example_inputs(texts=["one", "two sentences of text"])
    (got,) = run(tmp_path / "p.onnx", feed)
    with torch.inference_mode():
        ref = model(*(torch.from_numpy(v) for v in feed.values())).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_generic_export_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = Mlp()
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    checks = [{"x": np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32)} for i, n in ((1, 1), (2, 7))]
    report = export_onnx(mlp, {"x": torch.from_numpy(x)}, tmp_path / "mlp.onnx", output_names=["logits"],
                         check_inputs=checks)
    assert not report.optimized and report.fused_ops == {} and report.max_abs_diff < 1e-5
    (got,) = run(tmp_path / "mlp.onnx", checks[1])
    assert got.shape == (7, 3)


def test_failed_check_leaves_no_file(tmp_path: Path) -> None:
    mlp = Mlp()
    with pytest.raises(ModelError, match="differs"):
        export_onnx(mlp, {"x": torch.zeros(2, 8)}, tmp_path / "bad.onnx", output_names=["y"], atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_optimize_options_detect_heads_by_default() -> None:
    assert OptimizeOptions().num_heads == 0 and OptimizeOptions().opt_level == 0
