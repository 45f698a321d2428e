"""Model backends behind the :class:`~headrace.workers.backends.base.Servable` interface.

``load_servable(settings)`` reads the manifest from the model repository and returns an
ONNX Runtime or torch servable; the heavy libraries are imported only when used.
"""

from __future__ import annotations

from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.custom import CustomServable
from headrace.workers.backends.loader import load_servable, select_manifest, servable_from_manifest

__all__ = ["CustomServable", "Servable", "TensorSpec", "load_servable", "select_manifest", "servable_from_manifest"]
