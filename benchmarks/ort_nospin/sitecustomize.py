"""Benchmark experiment hook, not used in production: turn off ONNX Runtime's intra-op
spin-wait (``session.intra_op.allow_spinning = 0``) in every session a process creates.

Python imports ``sitecustomize`` at start-up from ``sys.path``, so putting this folder on
``PYTHONPATH`` applies it to a process and its children (worker processes, Ray replicas).
``benchmarks/e2e_vs_raw.py --ort-spin off`` and ``benchmarks/compare.py --ort-spin off`` do
that for every compared system alike. The servable has no setting for it (yet); this lets
the benchmarks measure what it would change.
"""

from __future__ import annotations

from typing import Any


def install() -> bool:
    """Patch ``onnxruntime.InferenceSession`` once; False when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if getattr(ort.InferenceSession, "_headrace_nospin", False):
        return True
    original = ort.InferenceSession.__init__

    def init(self: Any, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
        opts = sess_options if sess_options is not None else ort.SessionOptions()
        # Idle pool threads block instead of burning a core each while the worker's event
        # loop, the client and Redis need the CPU (measured in BENCHMARKS.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        original(self, path_or_bytes, opts, *args, **kwargs)

    ort.InferenceSession.__init__ = init  # type: ignore[method-assign]
    ort.InferenceSession._headrace_nospin = True  # type: ignore[attr-defined]
    return True


install()
