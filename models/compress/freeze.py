"""Freeze an ONNX graph to static input shapes, with its shape arithmetic folded away.

onnx2tf decides per op whether a tensor is in ONNX (``NCW``/``NCHW``) or TensorFlow
(``NWC``/``NHWC``) layout by comparing the ONNX and TensorFlow output shapes. With symbolic
dimensions both are unknown and the guess goes wrong: in a transformer the attention
context ``[batch, seq, heads, head_dim]`` is transposed once more before the ``Reshape`` back
to ``[batch, seq, hidden]``, which scrambles every hidden vector (measured on MiniLM: cosine
0.25-0.61 against ONNX Runtime, from the first attention block on). With every dimension a
number, the shapes agree and no transpose is inserted (cosine 1.0000 on the same graph).

onnx2tf's own ``overwrite_input_shape`` only takes effect through ``onnxsim``, whose pinned
version cannot be installed next to this stack, so the freezing is done here: the input
dimensions are set, ONNX Runtime's basic (standard-ops-only) optimisation level folds the
``Shape -> Gather -> Concat -> Reshape`` chains into constants, and ONNX shape inference
writes every intermediate shape into the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from headrace.client.errors import ModelError


def needs_freezing(declared: Mapping[str, Sequence[int | None]]) -> bool:
    """True when an input has a symbolic dimension other than the batch axis (axis 0):
    sequence lengths, image sizes. A graph whose only unknown is the batch converts correctly
    as it is (the spatial shapes settle every layout decision)."""
    return any(d is None for dims in declared.values() for d in list(dims)[1:])


def freeze_graph(src: Path, dst: Path, shapes: Mapping[str, Sequence[int]]) -> Path:
    """Write ``src`` with input shapes ``shapes`` (every dimension a positive number) to
    ``dst``, constant-folded and shape-inferred.

    Raises:
        ModelError: a shape is missing or not positive, or ONNX Runtime / ONNX shape inference
            rejects the frozen graph (the shapes contradict the model).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = list(shapes.get(inp.name, ()))
        dims = inp.type.tensor_type.shape.dim
        if len(shape) != len(dims) or any(int(v) < 1 for v in shape):
            raise ModelError(f"freezing {src.name}: input {inp.name!r} needs {len(dims)} positive dims, got {shape}")
        for d, v in zip(dims, shape, strict=True):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    for out in model.graph.output:  # let inference fill the outputs in from the frozen inputs
        for d in out.type.tensor_type.shape.dim:
            d.ClearField("dim_param")
    staged = dst.with_suffix(".unfolded.onnx")
    onnx.save(model, str(staged))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(staged), so, providers=["CPUExecutionProvider"])
        folded = onnx.shape_inference.infer_shapes(onnx.load(str(dst)), strict_mode=True)
    except Exception as e:  # onnxruntime / onnx raise their own Fail / InferenceError types
        raise ModelError(f"freezing {src.name} to {dict(shapes)} failed: {e}") from e
    finally:
        staged.unlink(missing_ok=True)
    onnx.save(folded, str(dst))
    return dst


def model_dims(path: Path) -> set[int]:
    """Every size the graph's weights and integer constants name (widths, head counts, head
    sizes): lengths a frozen axis should not share.

    onnx2tf takes a tensor whose non-batch dimensions are all equal (``[1, 32, 32]``: sequence
    32, hidden 32) for a transposed one and transposes it back, whatever its true layout.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    dims: set[int] = set()
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        dims.update(int(d) for d in t.dims)
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(t.dims) <= 1:
            dims.update(int(v) for v in numpy_helper.to_array(t).ravel()[:8])
    return {d for d in dims if d > 1}


def free_lengths(path: Path, length: int) -> list[int]:
    """Lengths to freeze a token axis to, best first: ``length`` when no dimension of the graph
    at ``path`` shares it, else the nearest free one above it and the nearest below it.

    Above keeps every text the tokenizer makes whole, but the tokenizer's limit is often the
    position table's size itself (BERT: 512 and 512), and one token more has no position to
    look up: freezing there fails, and the length below is what is left.
    """
    taken = model_dims(path)
    if length not in taken:
        return [length]
    up = next(n for n in range(length + 1, length + 1 + len(taken) + 1) if n not in taken)
    down = next((n for n in range(length - 1, 1, -1) if n not in taken), None)
    return [up] + ([down] if down is not None else [])
