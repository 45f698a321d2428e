"""LiteRT servable for ``format: tflite`` entries: the INT8 TFLite artifacts of
``headrace compress --steps tflite``, so a small device (ARM board, phone-class CPU) joins the
same consumer group as the ONNX Runtime workers and answers the same requests.

The entry's manifest keeps the ONNX signature (names, per-sample shapes, dtypes);
``extra.tflite_inputs`` / ``extra.tflite_outputs`` name the tensors in ONNX order, and the
TFLite signature runner resizes the batch axis per call. Transformer files are frozen to one
sample of a fixed token length (``extra.tflite_static_shapes``, see
:mod:`headrace.models.compress.freeze`): batches run sample by sample, shorter sequences padded.
Text entries are tokenised here as on the ONNX servable (truncated at ``extra.max_length``,
which the frozen length covers). Only ``ai-edge-litert`` (and ``tokenizers`` for text) is
needed on the device (no TensorFlow, no onnxruntime).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Request
from headrace.models.repository.store import Manifest
from headrace.workers.backends import prepost, tokens

log = logging.getLogger(__name__)


class LiteRTServable(prepost.ManifestServable):
    """A manifest-described TFLite model on a LiteRT interpreter.

    Args:
        manifest: the version's manifest (signature, post-processing, max_batch).
        model_path: the verified ``model.tflite``.
        tokenizer_path: ``tokenizer.json`` for text entries (``preprocess: bert_tokenizer``).
        intra_op_threads: interpreter threads (0 = 1).
        reject_non_finite: answer ``bad_value`` for float inputs holding NaN/Inf.

    Raises:
        ModelError: LiteRT is missing, the file does not load, or its signature does not match
            the manifest.
    """

    # One interpreter holds its tensors between calls: concurrent calls would overwrite them.
    thread_safe = False

    def __init__(self, manifest: Manifest, model_path: Path, *, tokenizer_path: Path | None = None,
                 intra_op_threads: int = 0, reject_non_finite: bool = True) -> None:
        from headrace.models.compress.edge import litert_run_all

        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.accepts_text = manifest.accepts_text
        if self.accepts_text:
            if tokenizer_path is None:
                raise E.ModelError(f"{manifest.name}/{manifest.version} takes text but no tokenizer file was given")
            # Truncated at the entry's max_length, which the frozen sequence length covers.
            self._encoder = tokens.text_encoder(manifest, tokenizer_path)
            self._text_inputs = tokens.text_inputs_of(manifest)
        self.inputs = prepost.specs(manifest.inputs)
        self.outputs = prepost.specs(manifest.outputs)
        self.reject_non_finite = reject_non_finite
        extra = {"tflite_inputs": manifest.extra.get("tflite_inputs", [s.name for s in self.inputs]),
                 "tflite_outputs": manifest.extra.get("tflite_outputs", [s.name for s in self.outputs])}
        frozen = manifest.extra.get("tflite_static_shapes") or {}
        if frozen:
            extra.update(tflite_static_shapes=frozen, tflite_pad=bool(manifest.extra.get("tflite_pad", False)))
        # Per-sample shapes a frozen file takes: exactly these, or up to these when padded.
        self._frozen = {k: tuple(int(d) for d in v[1:]) for k, v in frozen.items()}
        self._pad = bool(extra.get("tflite_pad", False))
        self._call: Any = litert_run_all(model_path, max(1, intra_op_threads), extra)
        self._lock = threading.Lock()
        log.info("loaded %s/%s (tflite, %s) on LiteRT", self.name, self.version, manifest.precision)

    def check(self, request: Request) -> None:
        """The signature's checks, then the frozen shape of a static file (onnx2tf's
        transformer exports): a longer token sequence is a bad request, never truncated.

        Raises:
            MissingFieldError / InvalidTensorError: code ``bad_shape`` for a sample that does
                not fit the frozen shape.
        """
        super().check(request)
        for name, want in self._frozen.items():
            have = tuple(request.inputs[name].shape) if name in request.inputs else want
            fits = len(have) == len(want) and all(h <= w if self._pad else h == w for h, w in zip(have, want, strict=False))
            if not fits:
                raise E.InvalidTensorError(
                    f"input {name!r} of request {request.request_id} has shape {list(have)}; this TFLite model "
                    f"takes {list(want)}{' at most (shorter is padded)' if self._pad else ''}", code=E.BAD_SHAPE)

    def _run(self, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        if self._call is None:
            raise E.ModelError(f"{self.name}/{self.version} is closed")
        with self._lock:
            try:
                out = self._call(feed)
            except E.HeadraceError:
                raise
            except Exception as e:  # noqa: BLE001 - the interpreter raises assorted errors; the worker survives
                raise E.ModelError(f"{self.name}/{self.version}: LiteRT run failed: {e}") from e
        return {s.name: np.asarray(out[s.name]).astype(s.dtype, copy=False) for s in self.outputs}

    def close(self) -> None:
        self._call = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(backend="litert", format=self.manifest.format, precision=self.manifest.precision)
        return d
