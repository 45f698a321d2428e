"""What an ONNX graph holds, for choosing what to quantize: nodes with constant weights
(in subgraphs too), op-type counts, the op types worth quantizing, and Constant-node weights
turned into initializers (ORT's quantizers only see initializers)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError

# Op types whose constant weight input makes them worth quantizing. Attention is the fused
# com.microsoft op the transformer optimizer produces (q/k/v packed into one weight).
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")


def constants_to_initializers(src: str | Path, dst: str | Path) -> int:
    """Rewrite ``Constant`` nodes holding a tensor as initializers, in the graph and its
    subgraphs (If/Loop bodies), and write ``dst``. Exporters such as TorchScript-to-ONNX of
    scripted modules emit weights as Constant nodes; ORT's quantizers only see initializers.

    Returns the number of constants moved.
    """
    model = load_graph(src)
    moved = 0

    def visit(graph: Any) -> None:
        nonlocal moved
        keep = []
        for node in graph.node:
            value = [a for a in node.attribute if a.name == "value" and a.HasField("t")]
            if node.op_type == "Constant" and value and len(node.output) == 1:
                t = value[0].t
                t.name = node.output[0]
                graph.initializer.append(t)
                moved += 1
                continue
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                    visit(sub)
            keep.append(node)
        del graph.node[:]
        graph.node.extend(keep)

    visit(model.graph)
    import onnx

    onnx.save(model, str(dst))
    return moved


@dataclass(frozen=True)
class WeightNode:
    """A node with a constant weight input that quantization would turn into INT8."""

    name: str
    op_type: str
    weight: str
    params: int


def _walk(graph: Any, inits: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies), with the initializers
    visible to it (a subgraph sees its own and its parents')."""
    scope = {**inits, **{i.name: i for i in graph.initializer}}
    for node in graph.node:
        yield node, scope
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                yield from _walk(sub, scope)


def load_graph(model_path: str | Path) -> Any:
    """The ONNX model at ``model_path`` without its external data (only the graph is read).

    Raises:
        ModelError: the file is not a readable ONNX model.
    """
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / OSError variants
        raise ModelError(f"cannot read ONNX model {model_path}: {e}") from e


def weight_nodes(model_path: str | Path, op_types: Sequence[str] = WEIGHT_OPS) -> list[WeightNode]:
    """Nodes of ``op_types`` whose weight input (B of MatMul/Gemm, W of Conv, the packed
    weight of Attention, the table of Gather) is an initializer, in graph order, subgraphs
    (If/Loop bodies) included.

    Raises:
        ModelError: the file is not a readable ONNX model, or a node has no name (the
            quantizer addresses nodes by name).
    """
    model = load_graph(model_path)
    out: list[WeightNode] = []
    consts = {n.output[0]: a.t for n, _ in _walk(model.graph, {}) if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" and a.HasField("t")}
    for node, scope in _walk(model.graph, {}):
        inits = {**consts, **scope}
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        w = node.input[0] if node.op_type == "Gather" else node.input[1]
        if w not in inits:
            continue
        if not node.name:
            raise ModelError(f"{model_path}: a {node.op_type} node has no name; re-export with named nodes")
        out.append(WeightNode(node.name, node.op_type, w, int(np.prod(inits[w].dims))))
    return out


def graph_op_types(model_path: str | Path) -> dict[str, int]:
    """Op type -> count over the graph and its subgraphs."""
    counts: dict[str, int] = {}
    for node, _ in _walk(load_graph(model_path).graph, {}):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def float16_tensors(model_path: str | Path) -> int:
    """How many float16 initializers and Constant values the graph holds, subgraphs included
    (0 after an fp16 conversion means it converted nothing)."""
    from onnx import TensorProto

    graph = load_graph(model_path).graph
    count = sum(i.data_type == TensorProto.FLOAT16 for i in graph.initializer)
    for node, _ in _walk(graph, {}):
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                count += sum(i.data_type == TensorProto.FLOAT16 for i in sub.initializer)
            if node.op_type == "Constant" and attr.HasField("t"):
                count += attr.t.data_type == TensorProto.FLOAT16
    return count


def float_weight_elements(model_path: str | Path) -> tuple[int, int]:
    """(float16, float32) elements of the graph's top-level initializers: which precision its
    weights are stored in (a few float16 constants in an fp32 model do not make it fp16)."""
    from onnx import TensorProto

    half = full = 0
    for i in load_graph(model_path).graph.initializer:
        n = 1
        for d in i.dims:
            n *= int(d)
        if i.data_type == TensorProto.FLOAT16:
            half += n
        elif i.data_type == TensorProto.FLOAT:
            full += n
    return half, full


# Ops that carry a constant weight; each is worth INT8 storage and kernels.
STATIC_WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# In a convolutional graph these sit between quantized convolutions: quantizing them keeps the
# activations in INT8 across residual Adds and pools instead of a DQ -> fp32 -> Q round trip
# around each. In a transformer they are left fp32 (residual Adds and LayerNorm inputs of a
# transformer cost far more fidelity than they save).
STATIC_CNN_OPS = ("Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Relu", "Clip", "Resize")
DYNAMIC_CANDIDATES = ("MatMul", "Gemm", "Attention", "Conv", "LSTM", "GRU", "Gather")


def choose_op_types(model_path: str | Path, mode: str) -> tuple[str, ...]:
    """The op types to quantize, chosen from what the graph holds.

    ``dynamic``: every weight-bearing op ORT's dynamic quantizer handles (MatMul, Gemm,
    Attention, Conv, LSTM, GRU) plus embedding tables (Gather of a 2-D initializer).
    ``static``: Conv/ConvTranspose/MatMul/Gemm, and for convolutional graphs the ops between
    them (:data:`STATIC_CNN_OPS`).

    Raises:
        ConfigError: an unknown mode. ModelError: an unreadable graph, or nothing to quantize.
    """
    if mode not in ("dynamic", "static"):
        raise ConfigError(f"quantization mode {mode!r}: dynamic or static")
    present = graph_op_types(model_path)
    if mode == "dynamic":
        chosen = [op for op in DYNAMIC_CANDIDATES if op in present and op != "Gather"]
        if "Gemm" in chosen and "MatMul" not in chosen:
            chosen.insert(0, "MatMul")  # the dynamic quantizer rewrites each Gemm as MatMul + Add first
        tables = [n for n in weight_nodes(model_path, ("Gather",)) if n.params >= 1024]
        chosen += ["Gather"] if tables else []
    else:
        chosen = [op for op in STATIC_WEIGHT_OPS if op in present]
        if "Conv" in present:
            chosen += [op for op in STATIC_CNN_OPS if op in present]
    if not any(op in present for op in (*STATIC_WEIGHT_OPS, "Attention", "LSTM", "GRU")):
        raise ModelError(f"{Path(model_path).name} has no weight-bearing op to quantize "
                         f"(ops: {sorted(present)})")
    return tuple(chosen)


ML_DOMAIN = "ai.onnx.ml"


def ml_adjacent_nodes(model: Any) -> list[str]:
    """Names of the top-level nodes that take an ``ai.onnx.ml`` op's output or feed one (an
    sklearn Pipeline's Sub after a Scaler). ORT's fp16 converter does not know those ops keep
    float32, so it would bind such a node to float and float16 at once (an invalid graph);
    kept fp32, the casts go between them and the converted nodes instead."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    used_by: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            used_by.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.domain == ML_DOMAIN or not n.name:
            continue
        after_ml = any(i in made_by and made_by[i].domain == ML_DOMAIN for i in n.input)
        before_ml = any(c.domain == ML_DOMAIN for o in n.output for c in used_by.get(o, []))
        if after_ml or before_ml:
            out.append(n.name)
    return out
