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
``add`` refuses and prints the ``--input`` to pass (``state:0:float32:2,B,128``, names as they are).

An output that leads with a dim other than the batch's is checked before it is served batched
(:mod:`~headrace.models.importers.onnx_probe`). A tensor the file gives no shape takes
onnxruntime's view of it (an input without one is refused: see :func:`_input_ranks`). The
batch-axis reading itself lives in :mod:`~headrace.models.importers.onnx_axes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from headrace.client.errors import ModelError
from headrace.models.importers.common import Imported, ImportOptions, whole_batch_outputs
from headrace.models.importers.onnx_axes import Dim, GraphTensor, batch_axes, specs, to_spec
from headrace.models.importers.onnx_deps import inputs_feeding, value_shaped_ops
from headrace.models.importers.onnx_probe import Shapes, example_feed, probe, rows_differing_alone
from headrace.models.repository.manifest import NO_BATCH, IOSpec, check_relpath

RawTensor = tuple[str, str, tuple[Dim, ...] | None]
"""A graph tensor as the file declares it: dims None when it declares no shape (any rank)."""


def _np_dtype(elem_type: int) -> str:
    import onnx

    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, TypeError, ValueError):
        return f"onnx-type-{elem_type}"


def _tensor(v: Any) -> RawTensor:
    """``(name, dtype, dims)`` of a graph value; dims None when the file gives no shape at all
    (any rank: not a scalar, which has a shape of no dims)."""
    if not v.type.HasField("tensor_type"):
        return v.name, "", ()
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return v.name, _np_dtype(tt.elem_type), None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return v.name, _np_dtype(tt.elem_type), tuple(dims)


class Graph(NamedTuple):
    """What :func:`read_graph` reads from an ONNX file.

    Attributes:
        inputs / outputs: its tensors (dims None: no shape in the file).
        external: the external-data files its tensors point to.
        feeding: output -> the graph inputs it is computed from.
        value_shaped: output -> the operators it is computed through whose output length is
            set by values (``NonZero``, ...; see :func:`~.onnx_deps.value_shaped_ops`).
    """

    inputs: list[RawTensor]
    outputs: list[RawTensor]
    external: list[str]
    feeding: dict[str, set[str]]
    value_shaped: dict[str, set[str]]


def read_graph(path: Path) -> Graph:
    """The :class:`Graph` of an ONNX file, weights not loaded. A non-tensor value (a sequence
    or map, e.g. skl2onnx's ZipMap) has dtype ``""``.

    Raises:
        ModelError: not a readable ONNX model.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    names = [v.name for v in model.graph.output]
    return Graph([_tensor(v) for v in model.graph.input if v.name not in inits],
                 [_tensor(v) for v in model.graph.output], external_files(model),
                 inputs_feeding(model.graph, names), value_shaped_ops(model.graph, names))


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


def _check_types(tensors: list[RawTensor], kind: str, path: Path) -> None:
    from headrace.client.protocol import WIRE_DTYPES

    bad = {n: dtype or "a sequence/map" for n, dtype, _ in tensors if dtype not in WIRE_DTYPES}
    if bad:
        raise ModelError(f"{path.name}: {kind}s {bad} have types headrace cannot carry on the wire "
                         f"(it carries {sorted(WIRE_DTYPES)}); export the model with tensors of those types there")


def import_onnx(path: Path, opts: ImportOptions) -> Imported:
    """An :class:`Imported` for an ONNX file (and its external data).

    Raises:
        ModelError: unreadable graph, a missing external-data file, a dtype headrace cannot
            carry, a tensor whose rank neither the file nor onnxruntime tells, or a batch axis
            the graph does not tell (names the ``--input`` to give).
    """
    graph = read_graph(path)
    raw_outputs = [t for t in graph.outputs if t[1]]
    notes = [f"output {n!r} is not a tensor (a sequence or map, e.g. skl2onnx's ZipMap): not served; "
             f"convert without it (skl2onnx: options={{'zipmap': False}})" for n, dtype, _ in graph.outputs if not dtype]
    _check_types(graph.inputs, "input", path)
    _check_types(raw_outputs, "output", path)
    if not raw_outputs:
        raise ModelError(f"{path.name} has no tensor output headrace can return")
    files: dict[str, Path] = {"model.onnx": path}
    for rel in graph.external:
        check_relpath(rel)
        src = path.parent / rel
        if not src.is_file():
            raise ModelError(f"{path.name} keeps weights in {rel!r}, which is not beside it ({src})")
        files[rel] = src
    sess = open_session(path)
    inputs = _input_ranks(graph.inputs, path)
    outputs = refine_with_runtime(sess, _output_ranks(sess, inputs, raw_outputs, opts, path), outputs=True)
    axes, unclear = batch_axes(inputs, outputs)
    unclear = [n for n in unclear if n not in opts.inputs]
    if unclear:
        shown = {n: ",".join(str(d) if isinstance(d, int) else "?" for d in dims) for n, _, dims in inputs
                 if n in unclear}
        first = next(t for t in inputs if t[0] == unclear[0])
        raise ModelError(f"cannot tell the batch axis of input(s) {shown} from the graph (unnamed dims). "
                         f"Say where it is, e.g. --input {_suggest(first, True)} (B = batch axis), or "
                         f"--input {_suggest(first, False)}:nobatch for an input shared by a call")
    in_specs, out_specs, batched = specs(inputs, outputs, axes, opts)
    left = [n for n, _, dims in inputs if dims and isinstance(dims[0], str) and axes[n] == NO_BATCH
            and n not in opts.inputs]
    judged = any(s.batched and s.name not in opts.outputs for s in out_specs)
    names = [t[0] for t in outputs]
    # the model run at n and n + 1 rows, once per reading of the batch axes it is tried with
    shapes = probe(sess, in_specs, names, opts) if batched and (left or judged) else {}
    if batched and left and len(shapes) < 2:
        # A dynamic leading dim named apart from the batch (A [N, 4] + B [M, 4]) may be the
        # batch all the same; the reading the model runs with at two batch sizes wins.
        alt = specs(inputs, outputs, {**axes, **dict.fromkeys(left, 0)}, opts)
        alt_shapes = probe(sess, alt[0], names, opts)
        if len(alt_shapes) == 2:
            (in_specs, out_specs, batched), shapes = alt, alt_shapes
            notes.append(f"input(s) {left} lead with a dim named apart from the batch, but the model runs only "
                         f"with them batched: read as batched on axis 0")
    notes += _input_notes(in_specs, batched)
    if batched:
        doubts = _guessed_doubts(sess, inputs, outputs, in_specs, out_specs, graph.value_shaped, opts)
        out_specs = _unfollowed_to_whole(shapes, doubts, out_specs, outputs, opts, notes)
    batched_inputs = {s.name for s in in_specs if s.batched}
    whole = whole_batch_outputs(out_specs, lambda name: sorted(graph.feeding.get(name, set()) & batched_inputs)) \
        if batched else []
    notes += whole
    return Imported(files=files, format="onnx", model_file="model.onnx", inputs=in_specs, outputs=out_specs,
                    batch_dim=0 if batched else NO_BATCH,
                    max_batch=1 if whole or not batched else opts.max_batch, source=path.name, notes=notes)


def _input_notes(in_specs: tuple[IOSpec, ...], batched: bool) -> list[str]:
    """The lines ``add`` prints about how the inputs are batched."""
    if not batched:
        return ["no batch axis in the graph: served unbatched (one request = one model call, "
                "tensors sent as the model takes them)"]
    notes = []
    for s in in_specs:
        if not s.batched:
            notes.append(f"input {s.name!r} has no batch axis: requests with equal {s.name!r} share a call")
        elif s.batch_axis > 0:
            notes.append(f"input {s.name!r} carries the batch on axis {s.batch_axis}")
    return notes


def _suggest(t: GraphTensor, with_batch: bool) -> str:
    """An ``--input`` value for graph tensor ``t`` that parses: its name and dtype, its fixed
    dims, ``-1`` for dynamic ones, and ``B`` (``with_batch``) on the first dynamic one."""
    name, dtype, dims = t
    shown = [str(d) if isinstance(d, int) else "-1" for d in dims]
    dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    if with_batch and dynamic:
        shown[dynamic[0]] = "B"
    elif with_batch:
        shown.insert(0, "B")
    return f"{name}:{dtype}:{','.join(shown)}"


def _shape_fix(name: str, what: str) -> str:
    return (f"give {what} {name!r} a shape in the file, e.g. onnx.tools.update_model_dims."
            f"update_inputs_outputs_dims(model, {{'x': ['N', 4]}}, {{'y': ['N', 4]}}) with its real dims, "
            f"then add it again")


def _input_ranks(inputs: list[RawTensor], path: Path) -> list[GraphTensor]:
    """``inputs`` with a rank each.

    Raises:
        ModelError: an input declares no shape at all (any rank): requests could not be
            checked, nor stacked, and onnxruntime cannot say either (it reports no dims).
    """
    shapeless = [n for n, _, dims in inputs if dims is None]
    if shapeless:
        raise ModelError(f"{path.name}: input(s) {shapeless} declare no shape (any rank); headrace serves inputs "
                         f"of a known rank: {_shape_fix(shapeless[0], 'input')}")
    return [(n, dtype, dims) for n, dtype, dims in inputs if dims is not None]


def _output_ranks(sess: Any, inputs: list[GraphTensor], outputs: list[RawTensor], opts: ImportOptions,
                  path: Path) -> list[GraphTensor]:
    """``outputs`` with a rank each: where the file declares no shape, the dims onnxruntime
    infers (its session's view, which the worker checks the manifest against); where it
    infers none either, a run of the example must show a scalar.

    Raises:
        ModelError: a shapeless output that onnxruntime cannot give dims and that is no scalar
            (or the model fails on the example, so nothing tells).
    """
    runtime = {o.name: list(o.shape or []) for o in sess.get_outputs()}
    out: list[GraphTensor] = []
    unknown: list[str] = []
    for name, dtype, dims in outputs:
        if dims is None:
            dims = tuple(d if isinstance(d, int) and d > 0 else d if isinstance(d, str) and d else None
                         for d in runtime.get(name, []))
            if not dims:
                unknown.append(name)
        out.append((name, dtype, dims))
    if unknown:
        ranks = _run_ranks(sess, inputs, unknown, opts)
        wrong = {n: r for n, r in ranks.items() if r != 0}
        if len(ranks) < len(unknown) or wrong:
            shown = {n: f"rank {ranks[n]} when run" if n in ranks else "not run" for n in unknown}
            raise ModelError(f"{path.name}: output(s) {shown} declare no shape and onnxruntime infers none: "
                             f"{_shape_fix(unknown[0], 'output')}")
    return out


def _run_ranks(sess: Any, inputs: list[GraphTensor], names: list[str], opts: ImportOptions) -> dict[str, int]:
    """The ranks outputs ``names`` have when the model runs the example; empty when it fails."""
    axes, _ = batch_axes(inputs, [])
    in_specs = specs(inputs, [], axes, opts)[0]
    try:
        return {n: a.ndim for n, a in zip(names, sess.run(names, example_feed(in_specs, opts)), strict=True)}
    except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidArgument kinds
        return {}


def _guessed_doubts(sess: Any, inputs: list[GraphTensor], outputs: list[GraphTensor], in_specs: tuple[IOSpec, ...],
                    out_specs: tuple[IOSpec, ...], value_shaped: dict[str, set[str]], opts: ImportOptions
                    ) -> dict[str, str]:
    """Why each batched output whose batch axis is a guess (its dim there is not a batched
    input's batch dim; not given by ``--output``) is no batch axis, by name: computed through
    an operator whose length is set by values, or row ``i`` differing from sample ``i`` run
    alone (:func:`~.onnx_probe.rows_differing_alone`)."""
    graph_in = {t[0]: t[2] for t in inputs}
    batch_dims = {graph_in[s.name][s.batch_axis] for s in in_specs if s.batched and s.name in graph_in
                  and len(graph_in[s.name]) > s.batch_axis}
    graph_out = {t[0]: t[2] for t in outputs}
    guessed = {s.name: s.batch_axis for s in out_specs if s.batched and s.name not in opts.outputs
               and s.name in graph_out and not (len(graph_out[s.name]) > s.batch_axis
                                                and isinstance(graph_out[s.name][s.batch_axis], str)
                                                and graph_out[s.name][s.batch_axis] in batch_dims)}
    doubts = {n: f"its length is set by the values of the call, through {', '.join(sorted(value_shaped[n]))}"
              for n in guessed if value_shaped.get(n)}
    rest = {n: a for n, a in guessed.items() if n not in doubts}
    doubts.update(rows_differing_alone(sess, in_specs, rest, example_feed(in_specs, opts)))
    return doubts


def _unfollowed_to_whole(shapes: Shapes, doubts: dict[str, str], out_specs: tuple[IOSpec, ...],
                         graph_outputs: list[GraphTensor], opts: ImportOptions, notes: list[str]
                         ) -> tuple[IOSpec, ...]:
    """``out_specs`` with the outputs whose batch axis, as read from the graph, does not follow
    the batch taken as whole-call values (``NO_BATCH``), a note for each.

    An unnamed or differently named leading dim is taken for the batch by :func:`batch_axes`,
    but it may count something else: ``NonZero`` or ``NonMaxSuppression`` indices over the
    whole call (``[K, 3]``). Served as batched, requests would get other requests' rows, or
    calls would fail on splitting them. It does not follow when ``doubts`` names it
    (:func:`_guessed_doubts`), or when the model's ``shapes`` (:func:`~.onnx_probe.probe`: the
    example at ``n`` and ``n + 1`` rows) show an axis that does not hold ``n`` and then
    ``n + 1``. A model that failed on these inputs (no shapes) is left as the graph says (the
    check after the import runs the example again and reports the failure), ``doubts``
    included: such a model is refused there. Outputs given by ``--output`` are taken as given."""
    judged = [s for s in out_specs if s.batched and s.name not in opts.outputs] if shapes else []
    graph = {t[0]: t for t in graph_outputs}
    specs = {s.name: s for s in out_specs}
    for s in judged:
        seen = {rows: got[s.name][s.batch_axis] if len(got[s.name]) > s.batch_axis else None
                for rows, got in shapes.items()}
        counted = all(got == rows for rows, got in seen.items())
        if s.name not in graph or (s.name not in doubts and counted):
            continue
        specs[s.name] = to_spec(graph[s.name], NO_BATCH, True)
        # the row counts, when they show it, are the plainest evidence to print
        why = doubts[s.name] if counted else ", ".join(f"{rows} requests gave {got}" for rows, got in seen.items())
        notes.append(f"output {s.name!r}: its axis {s.batch_axis} does not follow the batch ({why}): "
                     f"sent whole to each request; if it does follow, say so with --output")
    return tuple(specs.values())
