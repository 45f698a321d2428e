"""Outputs without a batch axis in a batched model. One made from batched inputs (a sum over
the batch) is a value of the whole model call: split "whole to every request", it would give
each request a value made from its call-mates' inputs. The importers must serve such a model
one request per call, and still batch a model whose unbatched outputs come from shared inputs
only. The ONNX graph tells the two apart; a torch program is taken to mix them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from headrace.models.importers.common import ImportOptions
from headrace.models.importers.onnx import import_onnx
from headrace.models.importers.onnx_deps import inputs_feeding
from headrace.models.repository.manifest import NO_BATCH


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], opset: int = 17) -> Path:
    model = h.make_model(h.make_graph(nodes, path.stem, inputs, outputs), opset_imports=[h.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _branch(name: str, op: str, src: str) -> Any:
    return h.make_graph([h.make_node(op, [src], [f"{name}_out"])], name, [],
                        [h.make_tensor_value_info(f"{name}_out", T.FLOAT, None)])


def test_inputs_feeding_follows_nodes_and_the_outer_names_subgraphs_read() -> None:
    cond = h.make_node("If", ["flag"], ["picked"], then_branch=_branch("then", "Neg", "x"),
                       else_branch=_branch("else", "Relu", "k"))
    graph = h.make_graph(
        [h.make_node("ReduceSum", ["x"], ["total"], keepdims=0), h.make_node("Mul", ["k", "k"], ["k2"]), cond],
        "g", [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("x", "k")]
        + [h.make_tensor_value_info("flag", T.BOOL, [])],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("total", "k2", "picked")])
    assert inputs_feeding(graph, ["total", "k2", "picked", "x"]) == {
        "total": {"x"}, "k2": {"k"}, "picked": {"flag", "x", "k"}, "x": {"x"}}


def test_an_onnx_output_summed_over_the_batch_is_served_one_request_per_call(tmp_path: Path) -> None:
    path = _save(tmp_path / "sum.onnx", [h.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("s", T.FLOAT, [])],
                 opset=11)
    imp = import_onnx(path, ImportOptions(max_batch=64))
    assert imp.batch_dim == 0 and imp.max_batch == 1
    assert [(s.name, s.shape, s.batch_axis) for s in imp.outputs] == [("s", (), NO_BATCH)]
    assert any("'s' has no batch axis but is computed from the batched input(s) ['x']" in n for n in imp.notes)


def test_an_onnx_output_of_shared_inputs_only_keeps_the_model_batched(tmp_path: Path) -> None:
    # 'scale' has no batch axis (one value per call); 'twice' is made from it alone, so it is
    # the same for every request of a call and goes whole to each.
    path = _save(tmp_path / "shared.onnx",
                 [h.make_node("Mul", ["x", "scale"], ["y"]), h.make_node("Add", ["scale", "scale"], ["twice"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4]), h.make_tensor_value_info("scale", T.FLOAT, [1])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["N", 4]), h.make_tensor_value_info("twice", T.FLOAT, [1])])
    imp = import_onnx(path, ImportOptions(max_batch=64))
    assert imp.batch_dim == 0 and imp.max_batch == 64
    assert {s.name: s.batch_axis for s in imp.outputs} == {"y": 0, "twice": NO_BATCH}
    assert not any("no batch axis but" in n for n in imp.notes)


@pytest.mark.parametrize(("body", "axes", "max_batch"), [
    ("return x.sum()", {"output0": NO_BATCH}, 1),
    ("return x.mean(0)", {"output0": NO_BATCH}, 1),
    ("return x.t()", {"output0": 1}, 0),
    ("return {'y': x * 2, 'total': x.sum()}", {"y": 0, "total": NO_BATCH}, 1),
    ("return x * 2", {"output0": 0}, 0),
])
def test_torch_outputs_get_the_axis_that_follows_the_batch(tmp_path: Path, body: str, axes: dict[str, int],
                                                           max_batch: int) -> None:
    torch = pytest.importorskip("torch", reason="the torch importer needs torch")
    from headrace.models.importers.common import parse_io
    from headrace.models.importers.torch import import_torch

    src = tmp_path / "prog.py"
    src.write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n        " + body + "\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("prog_under_test", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "prog.pt"
    torch.jit.script(mod.M()).save(str(path))
    x_spec = parse_io("x:float32:B,4")
    imp = import_torch(path, "torchscript", ImportOptions(inputs={"x": x_spec}), tmp_path / "work")
    assert {s.name: s.batch_axis for s in imp.outputs} == axes
    assert imp.max_batch == max_batch
    assert imp.example is not None and np.asarray(imp.example["x"]).shape == (2, 4)
