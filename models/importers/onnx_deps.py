"""Which graph inputs each output of an ONNX graph is computed from.

The importer needs it for outputs without a batch axis in a batched model: such an output is
either shared by a model call's requests (computed from shared inputs and weights only, like
a label table) or a value of the whole batch (a sum over the batch axis), which no request may
be given, as it is made from other requests' inputs. Only the graph tells the two apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _node_reads(node: Any) -> list[str]:
    """The tensor names ``node`` reads: its inputs, and the outer-scope names its subgraphs
    (``If`` branches, ``Loop``/``Scan`` bodies) read."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in subgraphs:
            names += _outer_reads(g)
    return names


def _outer_reads(graph: Any) -> list[str]:
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    return [name for n in graph.node for name in _node_reads(n) if name not in local]


def _back(start: str, producer: dict[str, Any], through: Any = None) -> tuple[set[str], list[Any]]:
    """The tensor names reached from ``start`` going back through the nodes that produce them
    (only nodes ``through(node)`` accepts, when given), and those nodes."""
    seen: set[str] = set()
    nodes: list[Any] = []
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and (through is None or through(node)):
            nodes.append(node)
            todo += _node_reads(node)
    return seen, nodes


def inputs_feeding(graph: Any, outputs: Iterable[str]) -> dict[str, set[str]]:
    """For each name in ``outputs``, the graph inputs (``graph.input`` names) it is
    computed from, through every node and subgraph between them."""
    producer = {o: node for node in graph.node for o in node.output if o}
    graph_inputs = {v.name for v in graph.input}
    return {out: _back(out, producer)[0] & graph_inputs for out in outputs}


#: Operators whose output length is set by the values they read, not by their input shapes:
#: an output computed through one counts detections, kept rows or unique values of the whole
#: call, so its leading dim is no batch axis unless the graph says so (``TopK`` only when its
#: ``k`` is read from values, see :func:`value_shaped_ops`).
VALUE_SHAPED_OPS = frozenset({"NonZero", "NonMaxSuppression", "Compress", "Unique", "StringSplit", "TopK"})

#: Operators whose output holds shapes only: a value computed from them alone does not change
#: with the values of the graph's inputs.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _subgraph_ops(node: Any) -> list[str]:
    """The op types of every node of ``node``'s subgraphs (``If`` branches, ``Loop`` bodies)."""
    ops: list[str] = []
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for n in g.node:
                ops += [n.op_type, *_subgraph_ops(n)]
    return ops


def _reads_values(name: str, producer: dict[str, Any], graph_inputs: set[str]) -> bool:
    """Whether tensor ``name`` depends on the values of a graph input (not only on shapes)."""
    return bool(_back(name, producer, lambda node: node.op_type not in _SHAPE_ONLY_OPS)[0] & graph_inputs)


def value_shaped_ops(graph: Any, outputs: Iterable[str]) -> dict[str, set[str]]:
    """For each name in ``outputs``, the :data:`VALUE_SHAPED_OPS` it is computed through
    (nodes and subgraphs between it and the graph inputs): where one is, the output's length
    may depend on the values of the call's samples. ``TopK`` counts only when its ``k`` is
    read from input values (a constant or a shape-derived ``k`` keeps the length fixed)."""
    producer = {o: node for node in graph.node for o in node.output if o}
    graph_inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}
    found: dict[str, set[str]] = {}
    for out in outputs:
        ops: set[str] = set()
        for node in _back(out, producer)[1]:
            here = [node.op_type, *_subgraph_ops(node)]
            if node.op_type == "TopK" and not (len(node.input) > 1 and _reads_values(node.input[1], producer,
                                                                                       graph_inputs)):
                here.remove("TopK")
            ops |= VALUE_SHAPED_OPS.intersection(here)
        found[out] = ops
    return found
