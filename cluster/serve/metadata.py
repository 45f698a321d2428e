"""KServe-v2-style model metadata from the workers' registry (``<ns>:models`` in Redis).

What ``headrace models describe NAME`` prints and ``GET /v1/models/{model}`` returns. It is
built only from what live workers registered (their versions, batching limits and the
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

from collections.abc import Mapping, Sequence
from typing import Any

from headrace.client import errors as E
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


def _max_batch(model_limit: int, worker_limits: Sequence[int]) -> int:
    limits = [x for x in (model_limit, *worker_limits) if x > 0]
    return min(limits) if limits else 0


def model_metadata(record: ModelRecord | None, now_ms: int, *, model: str = "",
                   version: str | None = None) -> dict[str, Any]:
    """The metadata of one model (``version``: that version's signature; default the newest
    version live workers serve, else the newest registered).

    Raises:
        ModelNotFoundError: no worker ever registered the model, or no signature of ``version``.
    """
    if record is None:
        raise E.ModelNotFoundError(f"no worker has registered model {model!r}; check the name "
                                   f"(headrace models describe, GET /v1/models) or start a worker for it")
    live = record.live_workers(now_ms)
    versions = list(record.versions(now_ms))
    pick = version or (versions[0] if versions else None)
    sig = record.signature(pick)
    if sig is None:
        raise E.ModelNotFoundError(f"model {record.model!r} has no registered signature for version {pick!r}; "
                                   f"known: {sorted(record.signatures)}")
    batched = bool(sig.get("batched", True))
    inputs = ([{"name": "text", "datatype": "BYTES", "shape": [-1] if batched else [1], "sample_shape": [],
                "dtype": "str"}] if sig.get("accepts_text")
              else [_tensor(t, batched) for t in sig.get("inputs", [])])
    out: dict[str, Any] = {
        "name": record.model, "versions": versions, "platform": str(sig.get("platform") or sig.get("backend") or ""),
        "ready": bool(live), "inputs": inputs, "outputs": [_tensor(t, batched) for t in sig.get("outputs", [])],
        "accepts_text": bool(sig.get("accepts_text")), "batched": batched,
        "max_batch_size": _max_batch(int(sig.get("max_batch") or 0), [w.max_batch for w in live]) if batched else 1,
        "workers": len(live), "signature_version": str(sig.get("version") or pick or ""),
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
