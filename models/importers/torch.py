"""Import a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``.pt2``).

The signature:

* input names come from the program (TorchScript ``forward`` schema; the exported
  program's user inputs), in call order;
* a ``.pt2`` program declares its input shapes, dynamic dims included (symbolic sizes
  become -1, a symbolic axis 0 is the batch axis);
* a TorchScript file declares no shapes: they come from ``--input`` flags or from
  ``--example inputs.npz`` (batch axis 0; its sizes are taken as fixed unless a flag says -1);
* outputs: the example's outputs (tuple/list -> ``output0..``, dict -> its keys), names and
  shapes overridable with ``--output``.

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


def _run(module: Any, names: list[str], example: dict[str, Array]) -> list[tuple[str, Array]]:
    import torch

    try:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(example[n])) for n in names])
    except Exception as e:  # noqa: BLE001 - model code raises anything
        raise ModelError(f"the program failed on the example: {e}") from e
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = [(f"output{i}", o) for i, o in enumerate(out)]
    else:
        items = [("output0", out)]
    return [(str(k), v.detach().float().numpy() if v.dtype in (torch.float16, torch.bfloat16) else v.detach().numpy())
            for k, v in items]


def _signature(module: Any, names: list[str], declared: dict[str, IOSpec],
               opts: ImportOptions) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...], dict[str, Array]]:
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
    outs = _run(module, names, example)
    dynamic = {int(example[s.name].shape[i + (1 if s.batched and i >= s.batch_axis else 0)])
               for s in inputs for i, d in enumerate(s.shape) if d == -1}
    axes = _output_axes(module, names, inputs, example, outs) if batched else {}
    detected = []
    for name, arr in outs:
        spec = spec_from_array(name, arr, axes.get(name, NO_BATCH))
        detected.append(IOSpec(name, spec.dtype, tuple(-1 if d in dynamic else d for d in spec.shape),
                               spec.batch_axis))
    outputs = _rename_outputs(detected, opts.outputs)
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
        again = dict(_run(module, names, grown))
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


def _rename_outputs(detected: list[IOSpec], overrides: Any) -> tuple[IOSpec, ...]:
    # Tuple outputs have no names: --output flags name them in order.
    if overrides and all(n not in {s.name for s in detected} for n in overrides):
        given = list(overrides.values())
        if len(given) != len(detected):
            raise ModelError(f"the program returns {len(detected)} outputs; --output gave {len(given)}")
        return tuple(given)
    return merge_overrides("output", detected, overrides, [s.name for s in detected])


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


def _as_onnx(module: Any, path: Path, inputs: tuple[IOSpec, ...], outputs: tuple[IOSpec, ...],
             example: dict[str, Array], opts: ImportOptions, work_dir: Path) -> Imported:
    import torch

    from headrace.models.compress.export import export_onnx
    from headrace.models.importers.onnx import import_onnx

    onnx_path = work_dir / "converted" / "model.onnx"
    ex = {s.name: torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in inputs}
    report = export_onnx(module, ex, onnx_path, output_names=[s.name for s in outputs],
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
