"""Operator-written servables: the public base class and how a worker loads one.

An operator serves a model that needs code of its own (custom pre-processing, a stateful
model, a framework headrace has no backend for) by subclassing :class:`CustomServable` in a
module of their own and starting the worker with ``headrace worker --servable
my_pkg.my_module:MyServable`` (or ``servable`` in the Ray app's ``worker_overrides``).
The class is operator configuration: a manifest can never name it, so the model
repository stays data (docs/security.md).

.. code-block:: python

    class Doubler(CustomServable):
        inputs = (TensorSpec("x", "float32", (-1,)),)
        outputs = (TensorSpec("y", "float32", (-1,)),)

        def load(self) -> None:                       # files of the repository version
            self.factor = float((self.folder / "factor.txt").read_text())

        def infer_batch(self, batch):                 # one model call, list in -> list out
            return [{"y": s["x"] * self.factor} for s in batch]

The worker still does everything else: consumer groups, batching, deadlines, retries,
dead-lettering, the registry entry producers ``describe``.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Request
from headrace.models.repository.store import Manifest
from headrace.workers.backends.base import Servable, TensorSpec
from headrace.workers.backends.validate import check_tensors, check_text

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
Sample = dict[str, Any]


class CustomServable(Servable):
    """Base class of an operator-written servable.

    Subclasses implement :meth:`load` and :meth:`infer_batch`, and may override
    :meth:`preprocess` / :meth:`postprocess`. Class attributes:

    * ``inputs`` / ``outputs``: what producers send and get, per sample (``TensorSpec``;
      default: the manifest's signature). Requests are checked against ``inputs`` before
      they join a batch, so ``infer_batch`` only sees valid samples.
    * ``accepts_text``: requests carry ``text``; ``preprocess`` gets ``{"text": str}``.
    * ``thread_safe``: ``infer_batch`` may run in several threads (worker ``instances`` > 1).
    * ``max_batch``: most samples per ``infer_batch`` call (0 = the worker's ``max_batch``).

    Attributes set before :meth:`load`: ``name``, ``version``, ``manifest`` (None when the
    repository has no such model) and ``folder`` (the verified version folder, or None).
    """

    accepts_text: bool = False
    thread_safe: bool = False
    max_batch: int = 0

    def __init__(self, name: str, version: str = "", *, manifest: Manifest | None = None,
                 folder: Path | None = None, reject_non_finite: bool = True) -> None:
        self.name = name
        self.manifest = manifest
        self.folder = folder
        self.version = version or (manifest.version if manifest is not None else "") or "1"
        self.reject_non_finite = reject_non_finite
        if manifest is not None:
            from headrace.workers.backends.prepost import specs

            if not type(self).inputs and not self.accepts_text:
                self.inputs = specs(manifest.inputs)
            if not type(self).outputs:
                self.outputs = specs(manifest.outputs)
        if not self.outputs:
            raise E.ConfigError(f"{type(self).__name__} declares no outputs and {name!r} has no manifest")

    # --- what an operator implements ------------------------------------------------------

    @abc.abstractmethod
    def load(self) -> None:
        """Open the model (files under ``self.folder``). Called once, before any request.

        Raises:
            Anything: the worker refuses to start, naming the error.
        """

    def preprocess(self, request: Request) -> Sample:
        """One request -> the sample ``infer_batch`` gets. Default: its inputs, or
        ``{"text": text}`` for a text model."""
        return {"text": request.text} if self.accepts_text else dict(request.inputs)

    @abc.abstractmethod
    def infer_batch(self, batch: Sequence[Sample]) -> list[dict[str, Array]]:
        """Run one batch; return one output map per sample, in order."""

    def postprocess(self, outputs: dict[str, Array], request: Request) -> dict[str, Array]:
        """One sample's outputs -> what its producer gets. Default: unchanged."""
        return outputs

    # --- the Servable interface the worker drives ------------------------------------------

    def check(self, request: Request) -> None:
        """Raises MissingFieldError / InvalidTensorError / ProtocolError for a request that
        does not fit ``inputs`` (or lacks text)."""
        if self.accepts_text:
            check_text(request)
        else:
            check_tensors(request, self.inputs, self.reject_non_finite)

    def plan(self, requests: Sequence[Request]) -> list[list[int]]:
        """The ``infer_batch`` calls of :meth:`infer`: chunks of ``max_batch``."""
        step = self.max_batch or len(requests) or 1
        return [list(range(i, min(i + step, len(requests)))) for i in range(0, len(requests), step)]

    def infer(self, requests: Sequence[Request]) -> list[dict[str, Array]]:
        """pre-process, ``infer_batch`` in chunks of ``max_batch``, post-process.

        Raises:
            ModelError: any of the three raised, or ``infer_batch`` returned a wrong count.
        """
        out: list[dict[str, Array]] = []
        step = self.max_batch or len(requests) or 1
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            try:
                samples = [self.preprocess(r) for r in chunk]
                results = self.infer_batch(samples)
                if len(results) != len(chunk):
                    raise E.ModelError(f"{type(self).__name__}.infer_batch returned {len(results)} results "
                                       f"for {len(chunk)} samples")
                out.extend(self.postprocess({k: np.asarray(v) for k, v in res.items()}, r)
                           for res, r in zip(results, chunk, strict=True))
            except E.HeadraceError:
                raise
            except Exception as e:  # noqa: BLE001 - operator code may raise anything; the worker survives
                raise E.ModelError(f"{self.name}/{self.version}: {type(self).__name__} failed: {e}") from e
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(backend="custom", platform="python", servable=f"{type(self).__module__}:{type(self).__qualname__}")
        if self.max_batch:
            d["max_batch"] = self.max_batch
        return d


def import_servable_class(ref: str) -> type[CustomServable]:
    """The class named by ``package.module:Class``.

    The module is looked up on ``sys.path``, with the current directory appended.

    Raises:
        ConfigError: malformed reference, import failure, or not a CustomServable subclass.
    """
    mod_name, sep, cls_name = ref.partition(":")
    if not sep or not mod_name or not cls_name:
        raise E.ConfigError(f"--servable {ref!r} must be 'package.module:Class'")
    # Like uvicorn's --app-dir: a module beside where the operator starts the worker is found
    # without installing it (appended, so an installed package of the same name wins).
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in cls_name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise E.ConfigError(f"cannot import servable {ref!r}: {e}. Is its package installed or on PYTHONPATH?") from e
    if not (isinstance(obj, type) and issubclass(obj, CustomServable)):
        raise E.ConfigError(f"servable {ref!r} is not a subclass of headrace.workers.backends.CustomServable")
    return obj


def load_custom(ref: str, name: str, *, manifest: Manifest | None, folder: Path | None,
                reject_non_finite: bool = True) -> CustomServable:
    """Import, construct and ``load()`` an operator servable.

    Raises:
        ConfigError: the class cannot be imported or constructed.
        ModelError: its ``load()`` failed.
    """
    cls = import_servable_class(ref)
    servable = cls(name, manifest=manifest, folder=folder, reject_non_finite=reject_non_finite)
    try:
        servable.load()
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001 - operator code may raise anything
        raise E.ModelError(f"{ref}.load() failed for {name}/{servable.version}: {e}") from e
    log.info("loaded operator servable %s for %s/%s", ref, name, servable.version)
    return servable


__all__ = ["CustomServable", "TensorSpec", "import_servable_class", "load_custom"]
