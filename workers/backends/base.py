"""The one small interface between the worker loop and a model.

The worker loop knows nothing of ONNX Runtime or torch: it hands a list of decoded
requests (one sample each) to a :class:`Servable` and gets one output map per request.
A servable owns pre-processing (tokenising text, stacking tensors), the backend run and
post-processing (splitting the batch back into per-request outputs).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.client.protocol import Envelope, Request


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, per sample (the batch dimension is left out).

    ``shape`` uses -1 for a dynamic axis (e.g. sequence length). ``batch_axis`` is where the
    batch axis sits in the model's tensor (-1: none; see the manifest's ``IOSpec``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int = 0


KSERVE_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "string": "BYTES",
}
"""Wire dtype name -> KServe v2 / Triton datatype."""


def tensor_description(spec: TensorSpec) -> dict[str, Any]:
    """One tensor of :meth:`Servable.describe`."""
    return {"name": spec.name, "dtype": spec.dtype, "datatype": KSERVE_DATATYPES.get(spec.dtype, spec.dtype.upper()),
            "shape": list(spec.shape), "batch_axis": spec.batch_axis}


class Servable(abc.ABC):
    """A loaded model ready to run batches.

    Attributes:
        name: model name as served (``minilm``).
        version: repository version loaded.
        accepts_text: requests carry ``text`` instead of tensors.
        inputs / outputs: per-sample signature.
        thread_safe: ``infer`` may run in several threads at once (needed for a worker
            with ``instances`` > 1).
    """

    name: str
    version: str
    accepts_text: bool = False
    thread_safe: bool = False
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    @abc.abstractmethod
    def check(self, request: Request) -> None:
        """Validate one request against the signature before it joins a batch.

        Raises:
            ProtocolError subclasses (codes ``missing_field``, ``bad_dtype``, ``bad_shape``,
            ``bad_value``) for a request this model cannot take. Never raises for a valid one.
        """

    def length(self, request: Request) -> int:
        """Cost proxy used to bucket variable-length inputs (e.g. characters of text)."""
        return len(request.text) if request.text is not None else 0

    def lengths(self, requests: Sequence[Request]) -> list[int]:
        """:meth:`length` of each request, in one call (the worker calls this once per
        admitted read, off the event loop): a text servable tokenises them in one batch."""
        return [self.length(r) for r in requests]

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """How a batch of checked requests splits into model calls: lists of request
        indices, each list run by one :meth:`infer` call. The worker reports each call's
        size as its requests' ``timings.batch_size``. Default: one call for all; a servable
        that cannot run some requests together (different shapes) or has a largest call
        says so here."""
        return [list(range(len(requests)))]

    @abc.abstractmethod
    def infer(self, requests: Sequence[Request]) -> list[dict[str, np.ndarray[Any, Any]]]:
        """Run one batch; return one output map per request, in order.

        Called off the event loop (in a thread). Requests were already ``check``-ed.

        Raises:
            ModelError: the backend failed for this batch.
        """

    def runs_stacked(self) -> bool:
        """True when the servable runs samples as rows, without a request object per sample:

        * tensor models: :meth:`infer_stacked` runs samples already stacked on a leading
          axis, and :meth:`check` depends only on input names, dtypes, shapes and finiteness;
        * text models (``accepts_text``): :meth:`infer_texts` runs a list of texts, every
          output has one row per text (no per-token outputs), and :meth:`check` only asks
          for a text.

        The worker then carries a multi-sample entry as blocks (checked once, one array per
        input, or one list of texts, through batching and the model call). Default False.
        A subclass that overrides ``infer`` or ``check`` of a servable that runs stacked is
        run per request unless it overrides this method too."""
        return False

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """:meth:`lengths` of texts given as strings (the batching cost hint of each row of
        a text block; a text model tokenises them here, once). Called off the event loop."""
        env = Envelope(request_id="", reply_to="")
        return self.lengths([Request(env, text=t) for t in texts])

    def infer_texts(self, texts: Sequence[str], request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Run ``len(texts)`` texts as rows; return every output with one row per text, in
        order. ``request_ids``: whose each text is (for logs). Only called on a text model
        that :meth:`runs_stacked`; called off the event loop, like :meth:`infer`.

        Raises:
            ModelError: the backend failed for these texts.
        """
        raise NotImplementedError(f"{type(self).__name__} does not run texts as rows")

    def infer_stacked(self, inputs: Mapping[str, np.ndarray[Any, Any]],
                      request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        """Run ``len(request_ids)`` samples stacked on axis 0 of every input (one row per
        sample, all rows of one shape); return every output with the same leading axis.
        ``request_ids``: whose each row is (for logs). Only called when :meth:`runs_stacked`;
        called off the event loop, like :meth:`infer`.

        Raises:
            ModelError: the backend failed for these samples.
        """
        raise NotImplementedError(f"{type(self).__name__} does not run stacked samples")

    def interrupt(self) -> bool:
        """Ask the model call in progress to stop: the worker calls it from the event loop
        when a call runs past ``infer_timeout_s``. A servable that can stop a call makes it
        (and every backend run it starts until :meth:`resume`) raise soon, and returns True;
        the worker then fails that call's requests and keeps serving. The default, False,
        means the call cannot be stopped: the worker stops consuming, as it must when its
        inference thread is stuck."""
        return False

    def resume(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Let model calls run again after :meth:`interrupt` (called once the interrupted
        call has ended, before the next one starts)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release sessions/threads. Idempotent."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description: what workers put into the registry signatures and what
        producers read back (``headrace models describe``, ``GET /v1/models/{model}``).

        Keys: ``model``, ``version``, ``accepts_text`` (requests carry ``text``), ``inputs`` /
        ``outputs`` (per tensor: ``name``, ``dtype`` (numpy name), ``datatype`` (KServe v2
        name), ``shape`` (per request, -1 = any), ``batch_axis`` (-1 = none)), ``batched``
        (samples are stacked into model calls) and ``max_batch`` (largest model call, 0 =
        the worker's ``max_batch``). Subclasses add ``platform``, ``backend`` and model facts
        (``labels``, ``task``, ``description``).
        """
        return {"model": self.name, "version": self.version, "accepts_text": self.accepts_text,
                "inputs": [tensor_description(s) for s in self.inputs],
                "outputs": [tensor_description(s) for s in self.outputs],
                "batched": True, "max_batch": 0}


def call_cap(servable: Servable) -> int:
    """The servable's largest model call in samples, from :meth:`Servable.describe`'s
    ``max_batch`` (0 = none of its own: the worker's ``max_batch`` bounds it)."""
    try:
        return max(0, int(servable.describe().get("max_batch") or 0))
    except Exception:  # noqa: BLE001 - a description that fails says nothing about calls
        return 0


def runs_stacked(servable: Servable) -> bool:
    """The servable's :meth:`~Servable.runs_stacked`, unless a subclass changed ``infer`` or
    ``check`` below the class that says it runs stacked (its own ``infer`` is then the truth,
    and its ``check`` may look at values); False when asking fails (a servable bug must not
    stop the worker: it then runs samples one request each)."""
    for cls in type(servable).__mro__:
        if "runs_stacked" in vars(cls):
            break
        if "infer" in vars(cls) or "check" in vars(cls):
            return False
    try:
        return bool(servable.runs_stacked())
    except Exception:  # noqa: BLE001 - optional capability
        logging.getLogger(__name__).exception("%s.runs_stacked() failed; running samples as separate requests",
                                              type(servable).__name__)
        return False
