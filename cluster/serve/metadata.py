"""KServe-v2-style model metadata from the workers' registry (``<ns>:models`` in Redis).

What ``headrace models describe NAME`` prints and ``GET /v1/models/{model}`` returns. It is
built on the SDK's ``Client.describe(model)`` (:class:`~headrace.client.health.ModelDescription`:
what live workers registered, their versions, batching limits and the
``Servable.describe()`` of each version), never from a local model repository, so a producer
anywhere learns what the served model takes:

.. code-block:: json

    {"name": "iris", "versions": ["2"], "platform": "onnxruntime_onnx", "ready": true,
     "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4], "sample_shape": [4], "dtype": "float32"}],
     "outputs": [...], "accepts_text": false, "batched": true, "max_batch_size": 32,
     "workers": 2, "signature_version": "2"}

``shape`` is the model tensor's (KServe: -1 on the batch axis); ``sample_shape`` is what one
request carries (the wire protocol has no batch axis). A text model has one input ``text``
(``BYTES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from headrace.client import errors as E
from headrace.client.health import ModelDescription
from headrace.client.registry import ModelRecord


def _tensor(t: Mapping[str, Any], batched: bool) -> dict[str, Any]:
    sample = [int(d) for d in t.get("shape", [])]
    axis = int(t.get("batch_axis", 0))
    shape = [*sample[:axis], -1, *sample[axis:]] if batched and axis >= 0 else list(sample)
    dtype = str(t.get("dtype", ""))
    out: dict[str, Any] = {"name": str(t.get("name", "")), "datatype": str(t.get("datatype") or dtype.upper()), "shape": shape,
           "sample_shape": sample, "dtype": dtype}
    if batched and axis > 0:
        out["batch_axis"] = axis
    if axis < 0:
        out["batch_axis"] = -1
    return out


def model_metadata(desc: ModelDescription, *, version: str | None = None) -> dict[str, Any]:
    """The metadata of one model from the SDK's :class:`~headrace.client.health.ModelDescription`
    (``version``: that version's signature; default the newest version live workers serve,
    else the newest registered).

    Raises:
        ModelNotFoundError: no signature of ``version`` is registered.
    """
    pick = version or (desc.versions[0] if desc.versions else None)
    sig = desc.signature(pick)
    if sig is None:
        raise E.ModelNotFoundError(f"model {desc.model!r} has no registered signature for version {pick!r}; "
                                   f"known: {sorted(desc.signatures)}")
    pick = pick or str(sig.get("version") or "")
    batched = bool(sig.get("batched", True))
    limits = [x for x in (int(sig.get("max_batch") or 0),
                          desc.batching[pick].max_batch if pick in desc.batching else 0) if x > 0]
    inputs = ([{"name": "text", "datatype": "BYTES", "shape": [-1] if batched else [1], "sample_shape": [],
                "dtype": "str"}] if sig.get("accepts_text")
              else [_tensor(t, batched) for t in sig.get("inputs", [])])
    out: dict[str, Any] = {
        "name": desc.model, "versions": list(desc.versions),
        "platform": str(sig.get("platform") or sig.get("backend") or ""), "ready": desc.live_workers > 0,
        "inputs": inputs, "outputs": [_tensor(t, batched) for t in sig.get("outputs", [])],
        "accepts_text": bool(sig.get("accepts_text")), "batched": batched,
        "max_batch_size": (min(limits) if limits else 0) if batched else 1,
        "workers": desc.live_workers, "signature_version": str(sig.get("version") or pick or ""),
    }
    for key in ("labels", "task", "description", "max_length"):
        if key in sig:
            out[key] = sig[key]
    return out


def models_index(records: Mapping[str, ModelRecord], now_ms: int) -> list[dict[str, Any]]:
    """One row per registered model: name, live versions, ready (a live worker), workers."""
    rows = []
    for name in sorted(records):
        rec = records[name]
        live = rec.live_workers(now_ms)
        rows.append({"name": name, "versions": list(rec.versions(now_ms)), "ready": bool(live), "workers": len(live)})
    return rows
