"""The ``tflite`` step of the any-model run: an INT8 TFLite file through onnx2tf, run in LiteRT
before it is offered. Text entries are frozen to a token length first (onnx2tf guesses layouts
wrong on symbolic shapes; see :mod:`~headrace.models.compress.freeze`).
"""

from __future__ import annotations

import logging
from typing import Any

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress.steps import Candidate, StepContext, step

log = logging.getLogger(__name__)


@step("tflite")
def tflite(ctx: StepContext) -> list[Candidate]:
    """INT8 TFLite through onnx2tf, run in LiteRT before it is offered."""
    from headrace.models.compress.edge import export_tflite, static_shapes
    from headrace.models.compress.freeze import needs_freezing
    from headrace.models.compress.source import graph_signature

    samples = ctx.feeds(1)[:100]
    declared = graph_signature(ctx.onnx_path)[0]
    quant = ctx.tflite.quant or ("dynamic" if ctx.encode else "integer")
    lengths = _frozen_lengths(ctx) if needs_freezing(declared) and ctx.encode else [0]
    for i, seq in enumerate(lengths):
        # onnx2tf guesses layouts wrong on symbolic shapes (see freeze.py): frozen first
        shapes = static_shapes(declared, samples[0], seq_length=seq) if needs_freezing(declared) else None
        try:
            exp = export_tflite(ctx.onnx_path, samples, ctx.work / "tflite", quant=quant,
                                shapes=shapes, pad=ctx.encode is not None)
            break
        except ModelError as e:  # e.g. one token past the position table: the next length down
            if i + 1 == len(lengths):
                raise
            log.info("tflite: %s; trying a sequence length of %d", e, lengths[i + 1])
    ctx.details["tflite"] = exp.to_dict()
    extra = exp.manifest_extra()
    limit = _seq_length(ctx.tokenizer, 0)
    if seq and limit and seq < limit:
        extra["max_length"] = seq  # texts are cut at the entry's max_length: every one then fits the file
    return [Candidate(f"tflite int8 ({quant})", exp.path, "tflite", "int8",
                      [{"step": "tflite", "params": exp.to_dict()}], "LiteRT", extra=extra)]


def _frozen_lengths(ctx: StepContext) -> list[int]:
    """Token lengths to freeze a text entry's TFLite file to, best first:
    ``--tflite-seq-length`` as given, else around the tokenizer's limit
    (:func:`~headrace.models.compress.freeze.free_lengths`).

    Raises:
        ConfigError: ``--tflite-seq-length`` is a dimension of the graph's weights (onnx2tf
            would take a tensor of that length for a transposed one).
    """
    from headrace.models.compress.freeze import free_lengths

    n = ctx.tflite.seq_length
    if not n:
        return free_lengths(ctx.onnx_path, _seq_length(ctx.tokenizer, 256))
    free = free_lengths(ctx.onnx_path, n)
    if free != [n]:
        raise ConfigError(f"--tflite-seq-length {n} is also a dimension of the graph's weights, which onnx2tf would "
                          f"take for a transposed axis; try {' or '.join(map(str, free))}")
    return [n]


def _seq_length(tokenizer: Any, default: int) -> int:
    """The tokenizer's truncation length (``default`` when it has none)."""
    trunc = getattr(tokenizer, "truncation", None) or {}
    return int(trunc.get("max_length", 0)) or default
