"""The manifest checked against the model it describes, at ``models add`` and at worker start.

Two checks, both raising :class:`~headrace.client.errors.ModelError` with every mismatch
named from both sides (``manifest says float32 [B,3,32,32]; model.onnx has float32 [B,3,64,64]``):

* static (ONNX): the graph's declared inputs and outputs against the manifest's names,
  dtypes, ranks, batch axes and fixed dims;
* a smoke run (every format): the version's stored example (``example.npz``, or
  ``extra.example_text`` for text models) runs through the servable, and each output is
  checked against the manifest's per-sample signature. A torch program declares no
  signature, so this run is how its manifest is held to it.

A manifest that says ``-1`` (any size) where the model fixes a size is a mismatch too:
requests of another size would all fail inside the backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request
from headrace.client.wire import dtype_name
from headrace.models.repository.manifest import NO_BATCH, IOSpec, Manifest
from headrace.workers.backends.base import Servable

Array = np.ndarray[Any, Any]
GraphSpec = tuple[str, str, tuple[int, ...]]
"""``(name, dtype, dims)`` of a model tensor as the model declares it; -1 = dynamic dim."""

EXAMPLE_FILE = "example.npz"
DEFAULT_EXAMPLE_TEXT = "headrace checks this model before it serves it."

ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "string",
}


def fmt_dims(dims: Sequence[int], batch_axis: int | None = None) -> str:
    """``[B,3,-1]``: the batch axis as ``B``, dynamic dims as -1."""
    return "[" + ",".join("B" if i == batch_axis else str(d) for i, d in enumerate(dims)) + "]"


def fmt_spec(spec: IOSpec, batched: bool = True) -> str:
    axis = spec.batch_axis if batched and spec.batched else None
    dims = spec.model_shape(-1) if batched else spec.shape
    return f"{spec.dtype} {fmt_dims(dims, axis)}"


def ort_specs(nodes: Sequence[Any]) -> list[GraphSpec]:
    """Graph tensors from onnxruntime's ``get_inputs()`` / ``get_outputs()``."""
    out = []
    for n in nodes:
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (n.shape or []))
        out.append((n.name, ORT_DTYPES.get(n.type, n.type), dims))
    return out


def _dim_problem(spec: IOSpec, dims: tuple[int, ...], batched: bool, max_batch: int) -> str | None:
    want = spec.model_shape(-1) if batched and spec.batched else spec.shape
    if len(want) != len(dims):
        return f"rank {len(want)} vs {len(dims)}"
    for i, (w, g) in enumerate(zip(want, dims, strict=True)):
        if batched and spec.batched and i == spec.batch_axis:
            if g != -1 and not (g == 1 and max_batch == 1):
                return (f"the model fixes its batch axis {i} at {g}; serve it unbatched (batch_dim -1) "
                        f"or with max_batch {g}" if g > 1 else f"the model fixes its batch axis {i} at 1; "
                        f"set max_batch 1 or serve it unbatched (batch_dim -1)")
            continue
        if g != -1 and w != g:
            return f"dim {i}: {'any (-1)' if w == -1 else w} vs {g}"
    return None


def compare(manifest: Manifest, kind: str, specs: Sequence[IOSpec], graph: Sequence[GraphSpec],
            model_file: str, *, exact_names: bool) -> list[str]:
    """Mismatches between the manifest's ``specs`` and the model's ``graph`` tensors."""
    problems: list[str] = []
    by_name = {g[0]: g for g in graph}
    names = [s.name for s in specs]
    missing = [n for n in names if n not in by_name]
    if missing:
        problems.append(f"{kind}s {missing} of the manifest are not in {model_file}, which has "
                        f"{[g[0] for g in graph]}")
    if exact_names:
        extra = [g[0] for g in graph if g[0] not in names]
        if extra:
            problems.append(f"{model_file} {kind}s {extra} are missing from the manifest's {names}")
    argmax = kind == "output" and manifest.postprocess == "argmax"
    for s in specs:
        if s.name not in by_name:
            continue
        _, dtype, dims = by_name[s.name]
        if argmax:  # the model's last axis is reduced away by the post-processing
            dims = dims[:-1]
        axis = s.batch_axis if manifest.batched and s.batched and s.batch_axis < len(dims) and \
            dims[s.batch_axis] == -1 else None
        theirs = f"{model_file} has {dtype} {fmt_dims(dims, axis)}"
        if not argmax and dtype != s.dtype:
            problems.append(f"{kind} {s.name!r}: manifest says {fmt_spec(s, manifest.batched)}; {theirs}")
            continue
        why = _dim_problem(s, dims, manifest.batched, manifest.max_batch)
        if why is not None:
            problems.append(f"{kind} {s.name!r}: manifest says {fmt_spec(s, manifest.batched)}; {theirs} ({why})")
    return problems


def raise_problems(manifest: Manifest, problems: Sequence[str]) -> None:
    """Raises ModelError listing ``problems`` (nothing when empty)."""
    if problems:
        raise E.ModelError(f"{manifest.name}/{manifest.version}: the manifest does not match the model: "
                           + "; ".join(problems) + ". Fix the manifest (headrace models add re-reads the "
                           "model) or serve the version it was made for")


def check_graph(manifest: Manifest, inputs: Sequence[GraphSpec], outputs: Sequence[GraphSpec],
                model_file: str, text_inputs: Sequence[str] = ()) -> None:
    """The static check of a model with a declared signature (ONNX).

    Raises:
        ModelError: a name, dtype, rank, batch axis or fixed dim differs.
    """
    problems: list[str] = []
    if manifest.accepts_text:
        names = [g[0] for g in inputs]
        if sorted(names) != sorted(text_inputs):
            problems.append(f"{model_file} inputs {names} are not the tokenizer's {list(text_inputs)}")
        problems += [f"text input {g[0]!r}: {model_file} has {g[1]} {fmt_dims(g[2])}; the tokenizer feeds "
                     f"int64 [B,-1]" for g in inputs if g[1] != "int64" or len(g[2]) != 2]
    else:
        problems += compare(manifest, "input", manifest.inputs, inputs, model_file, exact_names=True)
    problems += compare(manifest, "output", manifest.outputs, outputs, model_file, exact_names=False)
    raise_problems(manifest, problems)


# --- examples and the smoke run ------------------------------------------------------------


def load_example(path: Path) -> dict[str, Array]:
    """Arrays of an ``.npz`` file (never pickles: ``allow_pickle=False``).

    Raises:
        ModelError: not a readable npz of plain arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise E.ModelError(f"cannot read example {path}: {e}") from e


def example_samples(manifest: Manifest, example: Mapping[str, Array]) -> list[dict[str, Array]]:
    """Per-request inputs from an example of model tensors (batch axis included, as a model
    call takes them). An unbatched model's example is one request as is.

    Raises:
        ModelError: the example misses an input or its inputs disagree on the batch size.
    """
    missing = [s.name for s in manifest.inputs if s.name not in example]
    if missing:
        raise E.ModelError(f"the example has {sorted(example)}; the model takes {[s.name for s in manifest.inputs]}")
    if not manifest.batched:
        return [{s.name: np.asarray(example[s.name]) for s in manifest.inputs}]
    sizes = {s.name: np.asarray(example[s.name]).shape[s.batch_axis] for s in manifest.inputs if s.batched
             if np.asarray(example[s.name]).ndim > s.batch_axis}
    if len(set(sizes.values())) != 1:
        raise E.ModelError(f"the example's inputs disagree on the batch size (batch axis sizes {sizes})")
    n = next(iter(sizes.values()))
    return [{s.name: (np.take(np.asarray(example[s.name]), i, axis=s.batch_axis) if s.batched
                      else np.asarray(example[s.name])) for s in manifest.inputs} for i in range(n)]


def example_requests(manifest: Manifest, example: Mapping[str, Array] | None, text: str | None = None) -> list[Request]:
    """Requests to smoke-run: texts for a text model, else the example's samples."""
    if manifest.accepts_text:
        texts = [text or str(manifest.extra.get("example_text") or DEFAULT_EXAMPLE_TEXT), "a second, shorter one"]
        return [Request(Envelope(f"smoke-{i}", "smoke"), text=t) for i, t in enumerate(texts)]
    if example is None:
        raise E.ModelError(f"{manifest.name}/{manifest.version}: no example to check the model with")
    samples = example_samples(manifest, example)
    if manifest.batched and len(samples) == 1 and manifest.max_batch != 1:
        samples = samples * 2  # a call of two shows the batch axes are where the manifest says
    return [Request(Envelope(f"smoke-{i}", "smoke"), inputs=s) for i, s in enumerate(samples)]


def check_results(manifest: Manifest, specs: Sequence[Any], results: Sequence[Mapping[str, Array]]) -> None:
    """Each result against the per-sample output signature (names, dtypes, ranks, fixed dims).

    Raises:
        ModelError: naming the output, the manifest's side and what the model returned.
    """
    problems: list[str] = []
    for s in specs:
        for r in results:
            a = r.get(s.name)
            if a is None:
                problems.append(f"output {s.name!r} of the manifest was not returned (got {sorted(r)})")
                break
            a = np.asarray(a)
            want = tuple(s.shape)
            if dtype_name(a.dtype) != s.dtype or a.ndim != len(want) or any(
                    w not in (-1, g) for w, g in zip(want, a.shape, strict=False)):
                problems.append(f"output {s.name!r}: manifest says {s.dtype} {fmt_dims(want)} per sample; "
                                f"the model returned {a.dtype.name} {fmt_dims(a.shape)}")
                break
    raise_problems(manifest, problems)


def smoke_run(servable: Servable, manifest: Manifest, example: Mapping[str, Array] | None) -> list[dict[str, Array]]:
    """Run the example through ``servable`` exactly as a worker would and check the outputs.

    Returns the per-request outputs.

    Raises:
        ModelError: a request is refused, the model call fails, or an output does not match.
    """
    requests = example_requests(manifest, example)
    try:
        for r in requests:
            servable.check(r)
    except E.HeadraceError as e:
        raise E.ModelError(f"{manifest.name}/{manifest.version}: the example does not fit the manifest: "
                           f"{e.message}") from e
    results = servable.infer(requests)
    if len(results) != len(requests):
        raise E.ModelError(f"{manifest.name}/{manifest.version}: {len(requests)} requests gave {len(results)} results")
    check_results(manifest, servable.outputs, results)
    return results


def stored_example(manifest: Manifest, folder: Path) -> dict[str, Array] | None:
    """The version's ``example.npz`` when the manifest lists it."""
    if any(f.path == EXAMPLE_FILE for f in manifest.files):
        return load_example(folder / EXAMPLE_FILE)
    return None


__all__ = ["EXAMPLE_FILE", "NO_BATCH", "check_graph", "check_results", "compare", "example_requests",
           "example_samples", "load_example", "ort_specs", "smoke_run", "stored_example"]
