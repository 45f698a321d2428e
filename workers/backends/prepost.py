"""Pre- and post-processing shared by the ONNX and torch servables.

* text models (manifest ``preprocess: bert_tokenizer``): tokenised by
  :mod:`~headrace.workers.backends.tokens`, a batch padded to its longest member;
* tensor models: stack per-sample tensors along a new batch axis. Requests whose
  dynamic axes differ cannot share one array, so a batch is split into groups of equal
  shapes (and into ``max_batch`` chunks) that run one after the other;
* outputs are split back per request and post-processed (``l2_normalize``, ``softmax``,
  ``argmax`` along the last axis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from headrace.client.errors import ModelError, ModelInputError
from headrace.client.protocol import STRING, Request, numpy_dtype
from headrace.client.wire import take_row
from headrace.models.repository.manifest import NO_BATCH
from headrace.models.repository.store import IOSpec, Manifest
from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.tokens import TextEncoder, text_feed
from headrace.workers.backends.validate import check_tensors, check_text

Array = np.ndarray[Any, Any]
# KServe v2 / Triton platform names of the manifest formats.
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_torchscript", "pt2": "pytorch_export",
             "torch": "pytorch_safetensors", "tensorrt": "tensorrt_plan"}


def specs(items: Sequence[IOSpec]) -> tuple[TensorSpec, ...]:
    """Repository signature entries as the worker's :class:`TensorSpec`."""
    return tuple(TensorSpec(name=s.name, dtype=s.dtype, shape=tuple(s.shape), batch_axis=s.batch_axis)
                 for s in items)


def _group_key(request: Request, inputs: Sequence[TensorSpec]) -> tuple[Any, ...]:
    # Batched inputs must agree on their per-sample shape to be stacked; an input without a
    # batch axis is fed once for the whole call, so its value must be equal too.
    key: list[Any] = []
    for s in inputs:
        a = request.inputs[s.name]
        if s.batch_axis != NO_BATCH:
            key.append(tuple(a.shape))
        elif s.dtype == STRING:  # an object array's bytes are pointers, not its values
            key.append((tuple(a.shape), tuple(np.asarray(a).ravel().tolist())))
        else:
            key.append((tuple(a.shape), np.asarray(a, dtype=s.dtype).tobytes()))
    return tuple(key)


def shape_groups(requests: Sequence[Request], inputs: Sequence[TensorSpec], max_batch: int) -> Iterator[list[int]]:
    """Indices of requests that can run in one model call (same per-sample shapes, equal
    values of inputs without a batch axis), in chunks of at most ``max_batch`` (0 = unbounded)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(_group_key(r, inputs), []).append(i)
    for idx in groups.values():
        step = max_batch or len(idx)
        for start in range(0, len(idx), step):
            yield idx[start:start + step]


def stack(requests: Sequence[Request], idx: Sequence[int], inputs: Sequence[TensorSpec]) -> dict[str, Array]:
    """Stack the chosen requests' inputs into batch arrays (dtype from the signature), each
    along its own ``batch_axis``; an input without a batch axis is taken from the first."""
    feed: dict[str, Array] = {}
    for s in inputs:
        if s.batch_axis == NO_BATCH:
            feed[s.name] = np.asarray(requests[idx[0]].inputs[s.name], dtype=numpy_dtype(s.dtype))
        else:
            feed[s.name] = np.stack([np.asarray(requests[i].inputs[s.name], dtype=numpy_dtype(s.dtype)) for i in idx],
                                    axis=s.batch_axis)
    return feed


def postprocess(kind: str, arr: Array) -> Array:
    """Apply the manifest's post-processing to one batch output (along the last axis); string
    outputs (labels) are passed through."""
    if kind == "none" or arr.dtype.kind == "O":
        return arr
    if kind == "l2_normalize":
        a = arr.astype(np.float32, copy=False)
        return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    if kind == "softmax":
        a = arr.astype(np.float32, copy=False)
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if kind == "argmax":
        return np.argmax(arr, axis=-1).astype(np.int64)
    raise ModelError(f"unknown postprocess {kind!r}")


def split(outputs: Mapping[str, Array], n: int, kind: str,
          specs: Sequence[TensorSpec] = ()) -> list[dict[str, Array]]:
    """Batch outputs -> one output map per request, each output cut along its spec's
    ``batch_axis`` (0 when it has no spec); an output without a batch axis goes whole to
    every request. Rows are views (no copy).

    Raises:
        ModelInputError: an output's batch axis does not hold ``n`` rows (what these inputs
            give every time).
    """
    axes = {s.name: s.batch_axis for s in specs}
    per_request: list[dict[str, Array]] = [{} for _ in range(n)]
    for name, arr in outputs.items():
        a = postprocess(kind, np.asarray(arr))
        axis = axes.get(name, 0)
        if axis == NO_BATCH:
            for out in per_request:
                out[name] = a
            continue
        if a.ndim <= axis or a.shape[axis] != n:
            # the same inputs give the same shape: not worth a retry (see ModelInputError)
            raise ModelInputError(f"output {name!r} has shape {list(a.shape)}; expected {n} rows on its batch axis "
                                  f"{axis} (a length set by the values, not the batch, must be served whole: "
                                  f"--output NAME:DTYPE:SHAPE:nobatch)")
        for i, out in enumerate(per_request):
            out[name] = np.take(a, i, axis=axis) if axis else take_row(a, i)
    return per_request


def run_tensor_batch(requests: Sequence[Request], manifest: Manifest, inputs: Sequence[TensorSpec],
                     run: Callable[[dict[str, Array]], dict[str, Array]],
                     outputs: Sequence[TensorSpec] = ()) -> list[dict[str, Array]]:
    """Run a tensor-model batch group by group with ``run(feed) -> outputs`` and reassemble
    the per-request results in request order. An unbatched model (``batch_dim`` -1) runs
    each request on its own, tensors as sent."""
    if not manifest.batched:
        return [{k: postprocess(manifest.postprocess, np.asarray(v)) for k, v in
                 run({s.name: np.asarray(r.inputs[s.name], dtype=numpy_dtype(s.dtype)) for s in inputs}).items()}
                for r in requests]
    results: list[dict[str, Array] | None] = [None] * len(requests)
    for idx in shape_groups(requests, inputs, manifest.max_batch):
        outs = split(run(stack(requests, idx, inputs)), len(idx), manifest.postprocess, outputs)
        for i, o in zip(idx, outs, strict=True):
            results[i] = o
    return [r if r is not None else {} for r in results]


def unpad(results: list[dict[str, Array]], mask: Array, per_token: Sequence[str]) -> None:
    """Cut per-token outputs (first per-sample axis = the token axis) at each sample's own
    token count, in place: a 3-token text gets ``[3, H]``, not the batch's padded length."""
    if not per_token:
        return
    lengths = mask.sum(axis=1)
    for out, n in zip(results, lengths, strict=True):
        for name in per_token:
            if name in out:
                out[name] = out[name][:int(n)]


def concat_rows(chunks: Sequence[dict[str, Array]]) -> dict[str, Array]:
    """The outputs of consecutive calls as one map (each output concatenated on axis 0).

    Raises:
        ModelError: the calls' outputs differ in names or row shapes.
    """
    if len(chunks) == 1:
        return chunks[0]
    try:
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    except (KeyError, ValueError) as e:
        raise ModelError(f"the outputs of consecutive model calls do not stack: {e}") from e


class ManifestServable(Servable):
    """What the ONNX and torch servables share: requests are checked against the manifest's
    signature and costed for length bucketing the same way, whatever runs the model.
    Subclasses set ``manifest``, ``inputs``, ``accepts_text``, ``reject_non_finite``,
    ``_encoder`` and ``_text_inputs``, and implement ``_run`` (one backend call)."""

    manifest: Manifest
    reject_non_finite: bool = True
    # ONNX Runtime sessions and torch modules in inference mode take concurrent calls; the
    # tokenizer is shared read-only (its kept ids are behind a lock).
    thread_safe = True
    _encoder: TextEncoder | None = None
    _text_inputs: tuple[str, ...] = ()

    def _run(self, feed: dict[str, Array]) -> dict[str, Array]:
        """One backend call on a ready feed. Raises ModelError."""
        raise NotImplementedError

    def _run_tensors(self, feed: dict[str, Array]) -> dict[str, Array]:
        """The backend call for stacked tensor inputs (a hook for positional backends)."""
        return self._run(feed)

    def infer(self, requests: Sequence[Request]) -> list[dict[str, Array]]:
        """Run one batch (text: tokenised per ``max_batch`` chunk). Raises ModelError if the backend fails."""
        if not requests:
            return []
        if self._encoder is not None:
            results: list[dict[str, Array]] = []
            step = self.manifest.max_batch or len(requests)
            per_token = [s.name for s in self.outputs if s.shape[:1] == (-1,)]
            for start in range(0, len(requests), step):
                chunk = requests[start:start + step]
                ids, mask = self._encoder.encode([r.text or "" for r in chunk])
                outs = split(self._run(text_feed(ids, mask, self._text_inputs)), len(chunk),
                             self.manifest.postprocess, self.outputs)
                unpad(outs, mask, per_token)
                results.extend(outs)
            return results
        return run_tensor_batch(requests, self.manifest, self.inputs, self._run_tensors, self.outputs)

    def runs_stacked(self) -> bool:
        """Batched models whose outputs all carry the batch on axis 0: tensor models whose
        inputs do too, and text models without per-token outputs (each text's output rows
        then have one shape, whatever its token count)."""
        if not self.manifest.batched or not all(s.batch_axis == 0 for s in self.outputs):
            return False
        if self.accepts_text:
            return (self._encoder is not None and bool(self.outputs)
                    and not any(s.shape[:1] == (-1,) for s in self.outputs))
        return self._encoder is None and all(s.batch_axis == 0 for s in self.inputs)

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts`` from one ``encode_batch`` (the ids are kept for the call)."""
        if self._encoder is None:
            return [len(t) for t in texts]
        return self._encoder.count_batch(texts)

    def infer_texts(self, texts: Sequence[str], request_ids: Sequence[str]) -> dict[str, Array]:
        """Tokenise and run ``texts`` in calls of at most the manifest's ``max_batch``, each
        padded to its longest text, post-processed. Raises ModelError if the backend fails."""
        if self._encoder is None:
            raise ModelError(f"{self.name}: not a text model")
        step = self.manifest.max_batch or len(texts) or 1
        chunks: list[dict[str, Array]] = []
        for start in range(0, len(texts), step):
            ids, mask = self._encoder.encode(texts[start:start + step])
            chunks.append({k: postprocess(self.manifest.postprocess, np.asarray(v))
                           for k, v in self._run(text_feed(ids, mask, self._text_inputs)).items()})
        return concat_rows(chunks)

    def infer_stacked(self, inputs: Mapping[str, Array], request_ids: Sequence[str]) -> dict[str, Array]:
        """Run stacked samples in calls of at most the manifest's ``max_batch``, post-processed.
        Raises ModelError if the backend fails."""
        n = len(request_ids)
        feed = {s.name: np.asarray(inputs[s.name], dtype=numpy_dtype(s.dtype)) for s in self.inputs}
        step = self.manifest.max_batch or n or 1
        chunks: list[dict[str, Array]] = []
        for start in range(0, n, step):
            part = feed if step >= n else {k: v[start:start + step] for k, v in feed.items()}
            chunks.append({k: postprocess(self.manifest.postprocess, np.asarray(v))
                           for k, v in self._run_tensors(part).items()})
        return concat_rows(chunks)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """The model calls :meth:`infer` would make: ``max_batch`` chunks of text, or groups
        of equal input shapes in ``max_batch`` chunks."""
        if self._encoder is not None:
            step = self.manifest.max_batch or len(requests) or 1
            return [list(range(i, min(i + step, len(requests)))) for i in range(0, len(requests), step)]
        return list(shape_groups(requests, self.inputs, self.manifest.max_batch))

    def check(self, request: Request) -> None:
        """Raises MissingFieldError / InvalidTensorError / ProtocolError for a request this model cannot take."""
        if self.accepts_text:
            check_text(request)
        else:
            check_tensors(request, self.inputs, self.reject_non_finite)

    def describe(self) -> dict[str, Any]:
        """:meth:`Servable.describe` plus what the manifest knows: batching, platform,
        labels of a classifier, task, description."""
        m = self.manifest
        d = super().describe()
        d.update(batched=m.batched, max_batch=m.max_batch, format=m.format, precision=m.precision,
                 platform=PLATFORMS.get(m.format, m.format), postprocess=m.postprocess)
        for key in ("labels", "task", "max_length"):
            if key in m.extra:
                d[key] = m.extra[key]
        if m.description:
            d["description"] = m.description
        return d

    def length(self, request: Request) -> int:
        """Token count for text models (what padding costs), else total input elements."""
        if self._encoder is not None and request.text is not None:
            return self._encoder.count(request.text)
        return int(sum(a.size for a in request.inputs.values()))

    def lengths(self, requests: Sequence[Request]) -> list[int]:
        """Token counts of texts from one ``encode_batch`` (the ids are kept for the batch)."""
        if self._encoder is not None and all(r.text is not None for r in requests):
            return self._encoder.count_batch([r.text or "" for r in requests])
        return [self.length(r) for r in requests]
