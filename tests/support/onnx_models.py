"""Tiny ONNX models written on the fly, with their repository entries (no downloads)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from headrace.models.repository.store import IOSpec, Manifest, ModelRepository

AFFINE_BIAS = (1.0, 2.0, 3.0)


def write_affine_onnx(path: Path) -> Path:
    """``y = 2 * x + [1, 2, 3]`` on ``x`` float32 ``[batch, 3]`` (opset 17, IR 8: loadable by
    every onnxruntime the extras allow)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [3], list(AFFINE_BIAS))
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [two, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def add_affine(repo_root: Path, name: str = "tiny") -> Manifest:
    """The affine model as a new version of ``name`` in the repository at ``repo_root``."""
    repo_root.mkdir(parents=True, exist_ok=True)
    src = write_affine_onnx(repo_root.parent / f"{name}-src.onnx")
    return ModelRepository(repo_root).add(name, {"model.onnx": src}, format="onnx",
                                          inputs=[IOSpec("x", "float32", (3,))],
                                          outputs=[IOSpec("y", "float32", (3,))])
