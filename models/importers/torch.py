"""Import a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``.pt2``).

The signature:

* input names come from the program (TorchScript ``forward`` schema; the exported
  program's user inputs), in call order;
* a ``.pt2`` program declares its input shapes, dynamic dims included (symbolic sizes
  become -1, a symbolic axis 0 is the batch axis);
* a TorchScript file declares no shapes: they come from ``--input`` flags or from
  ``--example inputs.npz`` (batch axis 0; its sizes are taken as fixed unless a flag says -1);
* outputs: the example's outputs (tuple/list -> ``output0..``, nested ones flattened depth
  first; dict -> its keys), shapes overridable with ``--output`` and names too, but for a
  dict; a dtype must be the one the program returns (float16 included; bfloat16, not a wire
  dtype, is served as float32).

Served by the torch backend (``format: torchscript | pt2``); ``--to-onnx`` exports the
program to ONNX instead (dynamic axes from the signature) and imports that graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.models.importers.common import (
    Imported,
    ImportOptions,
    merge_overrides,
    spec_from_array,
    synth_example,
    whole_batch_outputs,
)
from headrace.models.repository.manifest import NO_BATCH, IOSpec

Array = np.ndarray[Any, Any]


def load_program(path: Path, kind: str) -> tuple[Any, list[str], dict[str, IOSpec]]:
    """``(callable module, input names, declared input specs)``.

    Raises:
        ModelError: the file does not load as ``kind``.
    """
    import torch

    try:
        if kind == "torchscript":
            mod = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            args = [a.name for a in mod.forward.schema.arguments][1:]  # type: ignore[attr-defined]
            return mod.eval(), args, {}
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, zipfile errors, ...
        raise ModelError(f"{path.name} does not load as {kind}: {e}") from e
    return ep.module(), *_pt2_inputs(ep)


def _pt2_inputs(ep: Any) -> tuple[list[str], dict[str, IOSpec]]:
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs: dict[str, IOSpec] = {}
    for n in names:
        val = nodes[n].meta.get("val") if n in nodes else None
        if val is None or not hasattr(val, "shape"):
            continue
        dims = [d if isinstance(d, int) else -1 for d in val.shape]
        dtype = str(val.dtype).removeprefix("torch.")
        dtype = {"float": "float32", "long": "int64", "int": "int32", "double": "float64", "half": "float16"}.get(
            dtype, dtype)
        axis = 0 if dims and dims[0] == -1 else NO_BATCH
        specs[n] = IOSpec(n, dtype, tuple(dims[1:] if axis == 0 else dims), axis)
    return names, specs


def program_outputs(out: Any) -> tuple[list[tuple[str, Any]], bool]:
    """A program's return value as ``[(name, tensor)]`` and whether the names are the
    program's own (a dict's keys) rather than positions.

    * a dict of tensors: its items, by key;
    * a tensor: ``output0``;
    * a tuple or list, nested or not: its tensors flattened depth first, ``(x, (y, z))`` ->
      ``output0, output1, output2`` (the order ``torch.onnx.export`` gives them).

    The importer and the torch backend both read a program's answer through this, so the
    manifest's outputs are the ones the worker serves.

    Raises:
        ModelError: a value is not a tensor (None, a number, a string), or a dict sits inside
            a tuple or list (its keys could not name outputs; return a flat dict or tuple).
    """
    import torch

    if isinstance(out, dict):
        bad = {str(k): type(v).__name__ for k, v in out.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise ModelError(f"the program's dict output holds values that are not tensors {bad}: return a dict "
                             f"of tensors, or a tensor / tuple of tensors")
        return [(str(k), v) for k, v in out.items()], True
    leaves: list[Any] = []

    def walk(v: Any, where: str) -> None:
        if isinstance(v, torch.Tensor):
            leaves.append(v)
        elif isinstance(v, (tuple, list)):
            for i, item in enumerate(v):
                walk(item, f"{where}[{i}]")
        else:
            what = "a dict inside a tuple or list" if isinstance(v, dict) else f"a {type(v).__name__}, not a tensor"
            raise ModelError(f"the program's output {where} is {what}: return a tensor, a (nested) tuple of "
                             f"tensors or a flat dict of tensors")

    walk(out, "output")
    return [(f"output{i}", t) for i, t in enumerate(leaves)], False


def _run(module: Any, names: list[str], example: dict[str, Array]) -> tuple[list[tuple[str, Array]], bool]:
    """The program's outputs on ``example`` (see :func:`program_outputs`), as numpy arrays.

    Raises:
        ModelError: the program fails on the example or returns something that is not tensors.
    """
    import torch

    try:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(example[n])) for n in names])
    except Exception as e:  # noqa: BLE001 - model code raises anything
        raise ModelError(f"the program failed on the example: {e}") from e
    items, keyed = program_outputs(out)
    return [(k, tensor_to_numpy(v)) for k, v in items], keyed


def tensor_to_numpy(t: Any) -> Array:
    """A tensor as a numpy array of the dtype it is served as: its own, except bfloat16,
    which neither numpy nor the wire has (float32, the dtype it widens to without loss).
    float16 stays float16: it is a wire dtype."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()  # type: ignore[no-any-return]


def _signature(module: Any, names: list[str], declared: dict[str, IOSpec],
               opts: ImportOptions) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...], dict[str, Array]]:
    unknown = [n for n in opts.inputs if n not in names]
    if unknown:
        # Without this a misspelled --input would be dropped silently and the model's own
        # input get a shape from the example (or none at all).
        raise ModelError(f"--input {unknown}: the program has no such input; its inputs are {names}")
    specs = dict(declared)
    specs.update(opts.inputs)
    example = dict(opts.example) if opts.example is not None else None
    missing = [n for n in names if n not in specs and (example is None or n not in example)]
    if missing:
        raise ModelError(f"the program's inputs {missing} have no declared shape: give --example inputs.npz "
                         f"(arrays named {names}, batch axis first) or --input NAME:DTYPE:SHAPE for each")
    for n in names:
        if n not in specs and example is not None:
            specs[n] = spec_from_array(n, example[n])
    inputs = tuple(specs[n] for n in names)
    batched = any(s.batched for s in inputs)
    if example is None:
        example = synth_example(inputs, batched)
    outs, keyed = _run(module, names, example)
    dynamic = {int(example[s.name].shape[i + (1 if s.batched and i >= s.batch_axis else 0)])
               for s in inputs for i, d in enumerate(s.shape) if d == -1}
    axes = _output_axes(module, names, inputs, example, outs) if batched else {}
    detected = []
    for name, arr in outs:
        spec = spec_from_array(name, arr, axes.get(name, NO_BATCH))
        detected.append(IOSpec(name, spec.dtype, tuple(-1 if d in dynamic else d for d in spec.shape),
                               spec.batch_axis))
    outputs = _rename_outputs(detected, opts.outputs, keyed)
    return inputs, outputs, example


def _output_axes(module: Any, names: list[str], inputs: tuple[IOSpec, ...], example: dict[str, Array],
                 outs: list[tuple[str, Array]]) -> dict[str, int]:
    """Each output's batch axis: the axis that holds the example's batch size and grows by
    one when the program runs again on the example plus one more row (``NO_BATCH`` for an
    output with none, e.g. a sum over the batch). Two sizes, so a fixed dim that happens to
    equal the batch size is not taken for it.

    A program that refuses the extra row (exported with a bounded batch dim) is judged by
    the example alone: the first axis holding its batch size.
    """
    batched = [s for s in inputs if s.batched]
    n = int(example[batched[0].name].shape[batched[0].batch_axis])
    grown = {k: (np.concatenate([v, np.take(v, [0], axis=s.batch_axis)], axis=s.batch_axis)
                 if (s := next((i for i in batched if i.name == k), None)) is not None else v)
             for k, v in example.items()}
    try:
        again = dict(_run(module, names, grown)[0])
    except ModelError:
        again = {}
    axes: dict[str, int] = {}
    for name, arr in outs:
        other = again.get(name)
        if other is None or other.ndim != arr.ndim:
            axes[name] = next((i for i in range(arr.ndim) if arr.shape[i] == n), NO_BATCH)
        else:
            axes[name] = next((i for i in range(arr.ndim) if arr.shape[i] == n and other.shape[i] == n + 1),
                              NO_BATCH)
    return axes


def _rename_outputs(detected: list[IOSpec], overrides: Any, keyed: bool) -> tuple[IOSpec, ...]:
    """The outputs with the ``--output`` flags applied: by name, or, for a program whose
    outputs have no names (a tensor or tuple), in order when no flag uses a detected name.

    Raises:
        ModelError: a flag names no output (a dict's outputs are named by its keys, which the
            worker looks them up by), the flags are not one per output, or a flag declares
            another dtype than the program returns (the worker never converts it).
    """
    names = [s.name for s in detected]
    if overrides and not keyed and all(n not in names for n in overrides):
        given = list(overrides.values())
        if len(given) != len(detected):
            raise ModelError(f"the program returns {len(detected)} outputs; --output gave {len(given)}")
        pairs = list(zip(detected, given, strict=True))
        outputs = tuple(given)
    else:
        unknown = [n for n in overrides if n not in names]
        if keyed and unknown:
            raise ModelError(f"--output {unknown}: the program returns a dict, so its outputs are named by its "
                             f"keys {names}; use those names in --output (e.g. --output {names[0]}:...)")
        outputs = merge_overrides("output", detected, overrides, names)
        pairs = [(d, overrides[d.name]) for d in detected if d.name in overrides]
    wrong = [(d, g) for d, g in pairs if g.dtype != d.dtype]
    if wrong:
        said = "; ".join(f"--output {g.name!r} says {g.dtype}; the program returns {d.dtype}"
                         + ("" if g.name == d.name else f" (its {d.name})") for d, g in wrong)
        d, g = wrong[0]
        raise ModelError(f"{said}. The worker serves what the program returns and never converts it: declare "
                         f"the program's dtype (e.g. --output {g.name}:{d.dtype}:...)")
    return outputs


def import_torch(path: Path, kind: str, opts: ImportOptions, work_dir: Path) -> Imported:
    """An :class:`Imported` for a TorchScript / ``.pt2`` file (``opts.to_onnx``: as ONNX).

    Raises:
        ModelError: the file does not load, the signature cannot be told, the example fails,
            or the ONNX export fails.
    """
    module, names, declared = load_program(path, kind)
    inputs, outputs, example = _signature(module, names, declared, opts)
    batched = any(s.batched for s in inputs)
    if opts.to_onnx:
        return _as_onnx(module, path, inputs, outputs, example, opts, work_dir)
    model_file = "model.pt" if kind == "torchscript" else "model.pt2"
    notes = [] if batched else ["no batch axis: served unbatched (one request = one model call)"]
    # A program's data flow is not read here: an output without a batch axis is taken to be
    # made from the batched inputs (the graph of an ONNX export tells, see import_onnx).
    sources = sorted(s.name for s in inputs if s.batched)
    whole = whole_batch_outputs(outputs, lambda _name: sources) if batched else []
    notes += whole
    return Imported(files={model_file: path}, format=kind, model_file=model_file, inputs=inputs, outputs=outputs,
                    batch_dim=0 if batched else NO_BATCH, max_batch=1 if whole or not batched else opts.max_batch,
                    example=example, source=path.name, notes=notes)


def _axes(specs: tuple[IOSpec, ...]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for s in specs:
        full = s.model_shape(-2) if s.batched else s.shape
        named = {i: ("batch" if d == -2 else f"{s.name}_dim{i}") for i, d in enumerate(full) if d in (-1, -2)}
        if named:
            axes[s.name] = named
    return axes


def _flat_outputs(module: Any, args: tuple[Any, ...]) -> Any:
    """``module`` returning its outputs as one flat tuple of tensors, in the order
    :func:`program_outputs` names them (a dict's values, nested tuples depth first): the
    exporter cannot export a dict, and the export's check compares flat outputs, so both
    see exactly the outputs the manifest lists.

    A TorchScript module is wrapped by tracing the wrapper on ``args``: the ONNX exporter's
    own tracer refuses a loaded ScriptModule called from Python code ("not part of the
    active trace"), while ``torch.jit.trace`` records it as a call of the scripted method,
    whose code (control flow, dynamic sizes) stays scripted.

    Raises:
        ModelError: the wrapper cannot be traced.
    """
    import torch

    class FlatOutputs(torch.nn.Module):
        def __init__(self, program: Any) -> None:
            super().__init__()
            self.program = program

        def forward(self, *inputs: Any) -> tuple[Any, ...]:
            return tuple(t for _, t in program_outputs(self.program(*inputs))[0])

    flat = FlatOutputs(module)
    if not isinstance(module, torch.jit.ScriptModule):
        return flat
    try:
        with torch.no_grad():
            return torch.jit.trace(flat, args, strict=False, check_trace=False)  # type: ignore[no-untyped-call]
    except Exception as e:  # noqa: BLE001 - the tracer raises RuntimeError and others
        raise ModelError(f"cannot prepare the program for ONNX export: {e}") from e


def _as_onnx(module: Any, path: Path, inputs: tuple[IOSpec, ...], outputs: tuple[IOSpec, ...],
             example: dict[str, Array], opts: ImportOptions, work_dir: Path) -> Imported:
    import torch

    from headrace.models.compress.export import export_onnx
    from headrace.models.importers.onnx import import_onnx

    onnx_path = work_dir / "converted" / "model.onnx"
    ex = {s.name: torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in inputs}
    report = export_onnx(_flat_outputs(module, tuple(ex.values())), ex, onnx_path, output_names=[s.name for s in outputs],
                         dynamic_axes=_axes(inputs + outputs), opset=opts.opset)
    specs = {s.name: s for s in inputs}
    out_specs = {s.name: s for s in outputs}
    imp = import_onnx(onnx_path, ImportOptions(inputs=specs, outputs=out_specs, max_batch=opts.max_batch))
    imp.example = example
    imp.source = path.name
    imp.recipe = [{"step": "export", "params": {"exporter": report.exporter, "opset": report.opset,
                                                "from": "torchscript" if path.suffix != ".pt2" else "pt2",
                                                "max_abs_diff": report.max_abs_diff}}]
    imp.notes.append(f"converted to ONNX (opset {report.opset}, max |onnx - torch| {report.max_abs_diff:.2g})")
    return imp
