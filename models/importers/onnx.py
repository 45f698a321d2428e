"""Import an ONNX file: the signature read from the graph (Triton's auto-complete).

* names and dtypes from the graph's inputs and outputs (initializers that are also graph
  inputs are left out: they have defaults);
* the batch axis: a symbolic dim shared by the inputs (``batch``, ``N``, ...), found
  wherever it sits (``state [2, batch, 128]`` has it on axis 1; see :func:`_batch_name`);
  for graphs with unnamed dims, or inputs each leading with a name of their own, axis 0
  when every input's axis 0 is dynamic. A tensor without it has no batch axis
  (an input shared by a model call, like a sample rate). A graph with no batch axis at all
  (every dim fixed, e.g. ``[1, 3, 224, 224]``) is served unbatched, and ``add`` says so;
* dynamic dims become -1;
* external-data files (weights beside the graph) are found in the graph and copied along.

Where the graph cannot tell (unnamed dims and a fixed axis 0 before a dynamic one),
``add`` refuses and asks for ``--input NAME:DTYPE:2,B,128``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from headrace.client.errors import ModelError
from headrace.models.importers.common import Imported, ImportOptions, merge_overrides, whole_batch_outputs
from headrace.models.importers.onnx_deps import inputs_feeding
from headrace.models.repository.manifest import NO_BATCH, IOSpec, check_relpath

Dim = int | str | None
"""A graph dim: a fixed size, a symbolic name, or None (unknown)."""
GraphTensor = tuple[str, str, tuple[Dim, ...]]


def _np_dtype(elem_type: int) -> str:
    import onnx

    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, TypeError, ValueError):
        return f"onnx-type-{elem_type}"


def _tensor(v: Any) -> GraphTensor:
    if not v.type.HasField("tensor_type"):
        return v.name, "", ()
    tt = v.type.tensor_type
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return v.name, _np_dtype(tt.elem_type), tuple(dims)


def read_graph(path: Path) -> tuple[list[GraphTensor], list[GraphTensor], list[str], dict[str, set[str]]]:
    """``(inputs, outputs, external data files, the inputs each output is computed from)``
    of an ONNX file, weights not loaded. A non-tensor value (a sequence or map, e.g.
    skl2onnx's ZipMap) has dtype ``""``.

    Raises:
        ModelError: not a readable ONNX model.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in inits]
    outputs = [_tensor(v) for v in model.graph.output]
    return inputs, outputs, external_files(model), inputs_feeding(model.graph, [v.name for v in model.graph.output])


def external_files(model: Any) -> list[str]:
    """Relative paths of the external-data files a model's tensors point to."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found: list[str] = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc and loc not in found:
                found.append(loc)
    return found


def open_session(path: Path) -> Any:
    """A CPU onnxruntime session of ``path`` (one intra-op thread: the importer's runs are small).

    Raises:
        ModelError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the probes' failed runs are expected; load errors still raise
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises Fail/InvalidGraph/RuntimeException
        raise ModelError(f"onnxruntime cannot load {path.name}: {e}") from e


def refine_with_runtime(sess: Any, tensors: list[GraphTensor], outputs: bool) -> list[GraphTensor]:
    """Dims onnxruntime (session ``sess``) knows as fixed where the file declares a name or
    nothing (its graph optimisations infer them): the worker's check compares with the
    runtime's view, so the manifest must too."""
    runtime = {n.name: list(n.shape or []) for n in (sess.get_outputs() if outputs else sess.get_inputs())}
    out: list[GraphTensor] = []
    for name, dtype, dims in tensors:
        known = runtime.get(name, [])
        if len(known) == len(dims):
            dims = tuple(k if isinstance(k, int) and k > 0 and not isinstance(d, int) and i > 0 else d
                         for i, (d, k) in enumerate(zip(dims, known, strict=True)))
        out.append((name, dtype, dims))
    return out


def _batch_name(inputs: list[GraphTensor], outputs: list[GraphTensor]) -> str | None:
    """The symbolic dim that is the batch, in this order: the one dim of the inputs named like
    a batch (``batch``, ``batch_size``: a time-major ``x [seq, batch, 5]`` has it on axis 1);
    the leading dim shared by the most inputs, when two or more share it or only one input
    has a named leading dim; the inputs' leading name an output leads with. None when the
    inputs each lead with a name of their own and nothing tells them apart (torch's
    ``dynamic_axes`` given as lists names ``a_dynamic_axes_1``, ``b_dynamic_axes_1``): the
    caller then reads the graph as one with unnamed dims."""
    batchy = {d for _, _, dims in inputs for d in dims if isinstance(d, str) and "batch" in d.lower()}
    if len(batchy) == 1:
        return batchy.pop()
    leading = Counter(dims[0] for _, _, dims in inputs if dims and isinstance(dims[0], str))
    if not leading:
        return None
    top, count = leading.most_common(1)[0]
    if count >= 2 or len(leading) == 1:
        return top
    led = {dims[0] for _, _, dims in outputs if dims and isinstance(dims[0], str)} & set(leading)
    return led.pop() if len(led) == 1 else None


def batch_axes(inputs: list[GraphTensor], outputs: list[GraphTensor]) -> tuple[dict[str, int], list[str]]:
    """The batch axis of every tensor (``NO_BATCH`` for none), and the inputs whose batch
    axis cannot be told from the graph."""
    axes: dict[str, int] = {}
    unclear: list[str] = []
    name = _batch_name(inputs, outputs)
    if name is not None:
        for n, _, dims in inputs + outputs:
            axes[n] = dims.index(name) if name in dims else NO_BATCH
        for n, _, dims in outputs:  # an output whose batch dim the exporter left unnamed
            if axes[n] == NO_BATCH and dims and not isinstance(dims[0], int):
                axes[n] = 0
        return axes, unclear
    dynamic0 = [n for n, _, dims in inputs if dims and not isinstance(dims[0], int)]
    for n, _, dims in inputs:
        if n in dynamic0:
            axes[n] = 0
        else:
            axes[n] = NO_BATCH
            if dynamic0 and any(not isinstance(d, int) for d in dims):
                unclear.append(n)
    for n, _, dims in outputs:
        axes[n] = 0 if dynamic0 and dims and not isinstance(dims[0], int) else NO_BATCH
    return axes, unclear


def to_spec(t: GraphTensor, axis: int, batched: bool) -> IOSpec:
    name, dtype, dims = t
    shape = [d if isinstance(d, int) else -1 for d in dims]
    if batched and axis != NO_BATCH:
        del shape[axis]
    return IOSpec(name=name, dtype=dtype, shape=tuple(shape), batch_axis=axis if batched else NO_BATCH)


def _check_types(tensors: list[GraphTensor], kind: str, path: Path) -> None:
    from headrace.client.protocol import WIRE_DTYPES

    bad = {n: dtype or "a sequence/map" for n, dtype, _ in tensors if dtype not in WIRE_DTYPES}
    if bad:
        raise ModelError(f"{path.name}: {kind}s {bad} have types headrace cannot carry on the wire "
                         f"(it carries {sorted(WIRE_DTYPES)}); export the model with tensors of those types there")


def import_onnx(path: Path, opts: ImportOptions) -> Imported:
    """An :class:`Imported` for an ONNX file (and its external data).

    Raises:
        ModelError: unreadable graph, a missing external-data file, a dtype headrace cannot
            carry, or a batch axis the graph does not tell (names the ``--input`` to give).
    """
    inputs, outputs, ext, feeding = read_graph(path)
    _check_types(inputs, "input", path)
    notes = [f"output {n!r} is not a tensor (a sequence or map, e.g. skl2onnx's ZipMap): not served; "
             f"convert without it (skl2onnx: options={{'zipmap': False}})" for n, dtype, _ in outputs if not dtype]
    outputs = [t for t in outputs if t[1]]
    _check_types(outputs, "output", path)
    if not outputs:
        raise ModelError(f"{path.name} has no tensor output headrace can return")
    files: dict[str, Path] = {"model.onnx": path}
    for rel in ext:
        check_relpath(rel)
        src = path.parent / rel
        if not src.is_file():
            raise ModelError(f"{path.name} keeps weights in {rel!r}, which is not beside it ({src})")
        files[rel] = src
    sess = open_session(path)
    outputs = refine_with_runtime(sess, outputs, outputs=True)
    axes, unclear = batch_axes(inputs, outputs)
    unclear = [n for n in unclear if n not in opts.inputs]
    if unclear:
        shown = {n: ",".join(str(d) if isinstance(d, int) else "?" for d in dims) for n, _, dims in inputs
                 if n in unclear}
        raise ModelError(f"cannot tell the batch axis of input(s) {shown} from the graph (unnamed dims). "
                         f"Say where it is, e.g. --input {unclear[0]}:DTYPE:2,B,128 (B = batch axis), or "
                         f"--input {unclear[0]}:DTYPE:SHAPE:nobatch for an input shared by a call")
    in_specs, out_specs, batched = _specs(inputs, outputs, axes, opts)
    left = [n for n, _, dims in inputs if dims and isinstance(dims[0], str) and axes[n] == NO_BATCH
            and n not in opts.inputs]
    judged = any(s.batched and s.name not in opts.outputs for s in out_specs)
    names = [t[0] for t in outputs]
    # the model run at n and n + 1 rows, once per reading of the batch axes it is tried with
    shapes = _probe(sess, in_specs, names, opts) if batched and (left or judged) else {}
    if batched and left and len(shapes) < 2:
        # A dynamic leading dim named apart from the batch (A [N, 4] + B [M, 4]) may be the
        # batch all the same; the reading the model runs with at two batch sizes wins.
        alt = _specs(inputs, outputs, {**axes, **dict.fromkeys(left, 0)}, opts)
        alt_shapes = _probe(sess, alt[0], names, opts)
        if len(alt_shapes) == 2:
            (in_specs, out_specs, batched), shapes = alt, alt_shapes
            notes.append(f"input(s) {left} lead with a dim named apart from the batch, but the model runs only "
                         f"with them batched: read as batched on axis 0")
    if not batched:
        notes.append("no batch axis in the graph: served unbatched (one request = one model call, "
                     "tensors sent as the model takes them)")
    for s in in_specs:
        if batched and not s.batched:
            notes.append(f"input {s.name!r} has no batch axis: requests with equal {s.name!r} share a call")
        elif s.batch_axis > 0:
            notes.append(f"input {s.name!r} carries the batch on axis {s.batch_axis}")
    if batched:
        out_specs = _unfollowed_to_whole(shapes, out_specs, outputs, opts, notes)
    batched_inputs = {s.name for s in in_specs if s.batched}
    whole = whole_batch_outputs(out_specs, lambda name: sorted(feeding.get(name, set()) & batched_inputs)) \
        if batched else []
    notes += whole
    return Imported(files=files, format="onnx", model_file="model.onnx", inputs=in_specs, outputs=out_specs,
                    batch_dim=0 if batched else NO_BATCH,
                    max_batch=1 if whole or not batched else opts.max_batch, source=path.name, notes=notes)


def _specs(inputs: list[GraphTensor], outputs: list[GraphTensor], axes: dict[str, int], opts: ImportOptions
           ) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...], bool]:
    """The input and output signatures of one reading of the batch axes (``--input`` /
    ``--output`` flags applied), and whether the model is batched at all."""
    batched = any(a != NO_BATCH for n, a in axes.items() if n in {i[0] for i in inputs}) or \
        any(s.batch_axis != NO_BATCH for s in opts.inputs.values())
    in_specs = merge_overrides("input", [to_spec(t, axes[t[0]], batched) for t in inputs], opts.inputs,
                               [t[0] for t in inputs])
    out_specs = merge_overrides("output", [to_spec(t, axes[t[0]], batched) for t in outputs], opts.outputs,
                                [t[0] for t in outputs])
    batched = batched and any(s.batched for s in in_specs)
    if not batched:
        in_specs = tuple(IOSpec(s.name, s.dtype, s.shape, NO_BATCH) for s in in_specs)
        out_specs = tuple(IOSpec(s.name, s.dtype, s.shape, NO_BATCH) for s in out_specs)
    return in_specs, out_specs, batched


def _probe(sess: Any, in_specs: tuple[IOSpec, ...], names: list[str], opts: ImportOptions
           ) -> dict[int, dict[str, tuple[int, ...]]]:
    """:func:`_output_shapes` of outputs ``names`` on the example (``--example``, else made
    from ``in_specs``), read with ``in_specs``' batch axes: both row counts when the model
    runs with that reading."""
    from headrace.models.importers.common import synth_example

    example = dict(opts.example) if opts.example is not None else synth_example(in_specs, True)
    return _output_shapes(sess, in_specs, names, example)


def _unfollowed_to_whole(shapes: dict[int, dict[str, tuple[int, ...]]], out_specs: tuple[IOSpec, ...],
                         graph_outputs: list[GraphTensor], opts: ImportOptions, notes: list[str]
                         ) -> tuple[IOSpec, ...]:
    """``out_specs`` with the outputs whose batch axis, as read from the graph, does not follow
    the batch when the model runs taken as whole-call values (``NO_BATCH``), a note for each.

    An unnamed or differently named leading dim is taken for the batch by :func:`batch_axes`,
    but it may count something else: ``NonZero`` or ``NonMaxSuppression`` indices over the
    whole call (``[K, 3]``). Served as batched, every call would fail on splitting them. The
    model's ``shapes`` (:func:`_probe`: the example at ``n`` and ``n + 1`` rows) tell: an axis
    that does not hold ``n`` and then ``n + 1`` does not carry the batch. A model that failed on
    these inputs (no shapes) is left as the graph says (the check after the import runs the
    example again and reports the failure). Outputs given by ``--output`` are taken as given."""
    judged = [s for s in out_specs if s.batched and s.name not in opts.outputs]
    graph = {t[0]: t for t in graph_outputs}
    specs = {s.name: s for s in out_specs}
    for s in judged:
        seen = {rows: got[s.name][s.batch_axis] if len(got[s.name]) > s.batch_axis else None
                for rows, got in shapes.items()}
        if s.name not in graph or all(got == rows for rows, got in seen.items()):
            continue
        specs[s.name] = to_spec(graph[s.name], NO_BATCH, True)
        calls = ", ".join(f"{rows} requests gave {got}" for rows, got in seen.items())
        notes.append(f"output {s.name!r}: its axis {s.batch_axis} does not follow the batch ({calls}): "
                     f"sent whole to each request")
    return tuple(specs.values())


def _output_shapes(sess: Any, in_specs: tuple[IOSpec, ...], names: list[str], example: dict[str, Any]
                   ) -> dict[int, dict[str, tuple[int, ...]]]:
    """The shapes of outputs ``names`` for a call of the example's ``n`` rows and one of
    ``n + 1`` (its first row again), by row count. Empty when the example does not fit or the
    model fails on it; only ``n`` when the second call fails (a graph with a bounded batch)."""
    import numpy as np

    batched = [s for s in in_specs if s.batched]
    try:
        first = {s.name: np.asarray(example[s.name]) for s in in_specs}
        n = int(first[batched[0].name].shape[batched[0].batch_axis])
        grown = {s.name: np.concatenate([a, np.take(a, [0], axis=s.batch_axis)], axis=s.batch_axis)
                 if s.batched else a for s, a in ((s, first[s.name]) for s in in_specs)}
    except (KeyError, IndexError, ValueError):
        return {}
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for rows, feed in ((n, first), (n + 1, grown)):
        try:
            arrays = sess.run(names, feed)
        except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidArgument kinds
            break
        out[rows] = {k: tuple(np.shape(a)) for k, a in zip(names, arrays, strict=True)}
    return out
