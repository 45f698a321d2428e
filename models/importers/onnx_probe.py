"""Running an ONNX graph on its example to see which outputs truly follow the batch.

The graph's dims say where an output's batch axis is when it carries the inputs' batch dim
(``N``). An output that leads with a dim of its own (``K``, or an unnamed one) is read as
batched by :func:`~headrace.models.importers.onnx.batch_axes`, but that is a guess: it may
count detections or kept rows of the whole call. Such a guessed output stays batched only
when it passes every check below; otherwise it is a value of the whole call.

* it is not computed through an operator whose output length is set by values
  (:data:`~headrace.models.importers.onnx_deps.VALUE_SHAPED_OPS`: ``NonZero``,
  ``NonMaxSuppression``, ...): read from the graph, so it needs no example;
* its axis holds ``n`` rows for an ``n``-row call and ``n + 1`` for ``n + 1`` rows;
* row ``i`` of an ``n``-row call equals the output of sample ``i`` run alone (a length that
  happens to equal the row count, one detection per image, passes the count check only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from headrace.models.importers.common import ImportOptions, synth_example
from headrace.models.repository.manifest import IOSpec

Shapes = dict[int, dict[str, tuple[int, ...]]]

#: Most samples of the example run alone for the row check (each is a model call).
MAX_ALONE = 4

#: A float row may differ from its sample run alone by this share of the output's scale
#: (its largest magnitude over the whole call). Dynamic INT8 quantisation takes one activation
#: scale over the whole call, so a row moves by ~1 % of that scale with its call-mates;
#: another sample's row (rows that are not the samples') differs by the order of the values
#: themselves. As workers/backends/call_mates.py's MIXING_SHARE.
ROW_SHARE = 0.1


def example_feed(in_specs: tuple[IOSpec, ...], opts: ImportOptions) -> dict[str, Any]:
    """The example the probes run: ``--example``, else one made from ``in_specs``."""
    return dict(opts.example) if opts.example is not None else synth_example(in_specs, True)


def probe(sess: Any, in_specs: tuple[IOSpec, ...], names: list[str], opts: ImportOptions) -> Shapes:
    """:func:`output_shapes` of outputs ``names`` on the example, read with ``in_specs``'
    batch axes: both row counts when the model runs with that reading."""
    return output_shapes(sess, in_specs, names, example_feed(in_specs, opts))


def output_shapes(sess: Any, in_specs: tuple[IOSpec, ...], names: list[str], example: dict[str, Any]) -> Shapes:
    """The shapes of outputs ``names`` for a call of the example's ``n`` rows and one of
    ``n + 1`` (its first row again), by row count. Empty when the example does not fit or the
    model fails on it; only ``n`` when the second call fails (a graph with a bounded batch)."""
    batched = [s for s in in_specs if s.batched]
    try:
        first = {s.name: np.asarray(example[s.name]) for s in in_specs}
        n = int(first[batched[0].name].shape[batched[0].batch_axis])
        grown = {s.name: np.concatenate([a, np.take(a, [0], axis=s.batch_axis)], axis=s.batch_axis)
                 if s.batched else a for s, a in ((s, first[s.name]) for s in in_specs)}
    except (KeyError, IndexError, ValueError):
        return {}
    out: Shapes = {}
    for rows, feed in ((n, first), (n + 1, grown)):
        try:
            arrays = sess.run(names, feed)
        except Exception:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidArgument kinds
            break
        out[rows] = {k: tuple(np.shape(a)) for k, a in zip(names, arrays, strict=True)}
    return out


def _same(batched_row: np.ndarray[Any, Any], alone: np.ndarray[Any, Any], scale: float) -> bool:
    """Equal shapes, and equal values: floats within :data:`ROW_SHARE` of ``scale`` (the
    output's largest magnitude over the whole call: far above the noise of kernels that block
    a batch differently and of dynamic quantisation, whose step is set by the whole call),
    other dtypes exactly."""
    if batched_row.shape != alone.shape:
        return False
    if batched_row.dtype.kind in "fc":
        diff = np.abs(np.nan_to_num(batched_row.astype(np.complex128)) - np.nan_to_num(alone.astype(np.complex128)))
        return float(np.max(diff, initial=0.0)) <= ROW_SHARE * scale + 1e-6
    return bool(np.array_equal(batched_row, alone))


def _scale(a: np.ndarray[Any, Any]) -> float:
    return float(np.max(np.abs(np.nan_to_num(a)), initial=0.0)) if a.dtype.kind in "fc" else 0.0


def rows_differing_alone(sess: Any, in_specs: tuple[IOSpec, ...], axes: Mapping[str, int],
                         example: dict[str, Any]) -> dict[str, str]:
    """The outputs (``axes``: name -> batch axis) whose row ``i`` of a call of the example's
    rows differs from what sample ``i`` gives run alone (its first :data:`MAX_ALONE` samples),
    each with a line saying how. Empty when the model does not run the example, as one call or
    a sample alone (the check after the import reports such failures)."""
    names = list(axes)
    if not names:
        return {}
    batched = [s for s in in_specs if s.batched]
    try:
        feed = {s.name: np.asarray(example[s.name]) for s in in_specs}
        n = int(feed[batched[0].name].shape[batched[0].batch_axis])
        together = dict(zip(names, (np.asarray(a) for a in sess.run(names, feed)), strict=True))
    except Exception:  # noqa: BLE001 - a bad example or onnxruntime's own Fail/InvalidArgument kinds
        return {}
    found: dict[str, str] = {}
    for i in range(min(n, MAX_ALONE)):
        one = {s.name: np.take(a, [i], axis=s.batch_axis) if s.batched else a
               for s, a in ((s, feed[s.name]) for s in in_specs)}
        try:
            alone = dict(zip(names, (np.asarray(a) for a in sess.run(names, one)), strict=True))
        except Exception:  # noqa: BLE001 - as above
            return found
        for name, axis in axes.items():
            got = together[name]
            row = np.take(got, [i], axis=axis) if got.ndim > axis and got.shape[axis] > i else None
            if name not in found and (row is None or not _same(row, alone[name], _scale(got))):
                found[name] = (f"sample {i} run alone gives shape {list(alone[name].shape)}, unlike row {i} of "
                               f"the {n}-sample call (shape {list(got.shape)})" if row is None or
                               row.shape != alone[name].shape else
                               f"sample {i} run alone gives other values than row {i} of the {n}-sample call")
    return found
