"""Reading the batch axes of an ONNX graph's tensors from their dims (see
:mod:`headrace.models.importers.onnx`), and the signatures they give."""

from __future__ import annotations

from collections import Counter

from headrace.models.importers.common import ImportOptions, merge_overrides
from headrace.models.repository.manifest import NO_BATCH, IOSpec

Dim = int | str | None
"""A graph dim: a fixed size, a symbolic name, or None (unknown)."""
GraphTensor = tuple[str, str, tuple[Dim, ...]]


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


def specs(inputs: list[GraphTensor], outputs: list[GraphTensor], axes: dict[str, int], opts: ImportOptions
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
