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


def inputs_feeding(graph: Any, outputs: Iterable[str]) -> dict[str, set[str]]:
    """For each name in ``outputs``, the graph inputs (``graph.input`` names) it is
    computed from, through every node and subgraph between them."""
    producer = {o: node for node in graph.node for o in node.output if o}
    graph_inputs = {v.name for v in graph.input}
    found: dict[str, set[str]] = {}
    for out in outputs:
        seen: set[str] = set()
        todo = [out]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producer.get(name)
            if node is not None:
                todo += _node_reads(node)
        found[out] = seen & graph_inputs
    return found
