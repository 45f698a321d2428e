"""torch servable for the torch formats.

* ``torchscript``: a ``torch.jit.save`` file, loaded with ``torch.jit.load`` (TorchScript
  code and tensors; no pickle of Python objects).
* ``pt2``: a ``torch.export.save`` program, loaded with ``torch.export.load``.
* ``torch``: a safetensors state dict (never a pickle, so no ``torch.load``) plus code that
  knows the architecture.

The architecture comes from the manifest: ``extra.arch == "minilm"`` builds our
:class:`~headrace.models.builtin.minilm.MiniLM` from ``model.safetensors`` + ``minilm_config.json``;
otherwise ``extra.torch_factory = "headrace.some.module:function"`` names a factory
``function(folder: Path, manifest: Manifest) -> torch.nn.Module``. Factories are only looked
up inside the ``headrace`` package, so a manifest cannot make a worker import arbitrary code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from headrace.client import errors as E
from headrace.client.optional import require
from headrace.client.wire import dtype_name
from headrace.models.importers.torch import program_outputs, tensor_to_numpy
from headrace.models.repository.store import Manifest
from headrace.models.torch_factory import BUILTIN_ARCHS, FACTORY_PREFIX, Factory, build_module, resolve_factory
from headrace.workers.backends import prepost, tokens

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The factory rules live in headrace.models.torch_factory (the compression pipeline builds the
# same modules); re-exported here for callers of this module.
__all__ = ["BUILTIN_ARCHS", "FACTORY_PREFIX", "Factory", "TorchServable", "load_torch_servable", "resolve_factory"]


def load_program(manifest: Manifest, path: Path) -> torch.nn.Module:
    """The module of a ``torchscript`` or ``pt2`` file.

    Raises:
        ModelError: the file does not load as that format.
    """
    import torch

    try:
        if manifest.format == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call,no-any-return]
        if manifest.format == "pt2":
            return torch.export.load(str(path)).module()  # type: ignore[no-any-return]
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, zipfile errors, ...
        raise E.ModelError(f"{manifest.name}/{manifest.version}: cannot load {path.name} as {manifest.format}: "
                           f"{e}") from e
    raise E.ModelError(f"{manifest.name}/{manifest.version}: format {manifest.format!r} is not a torch program")


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchServable(prepost.ManifestServable):
    """A torch module served batch by batch under ``torch.inference_mode``.

    Args:
        manifest: signature and pre/post-processing.
        module: the model; called with the inputs in manifest order (text models:
            ``module(input_ids, attention_mask)``).
        tokenizer_path: ``tokenizer.json`` for text models.
        intra_op_threads: ``torch.set_num_threads`` (process-wide!) when > 0.
        device: ``cpu``/``cuda``/...; None = CUDA when available.
        reject_non_finite: answer ``bad_value`` for float inputs holding NaN/Inf.
    """

    def __init__(self, manifest: Manifest, module: torch.nn.Module, *, tokenizer_path: Path | None = None,
                 intra_op_threads: int = 0, device: str | None = None, reject_non_finite: bool = True) -> None:
        import torch

        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.accepts_text = manifest.accepts_text
        self.inputs = prepost.specs(manifest.inputs)
        self.outputs = prepost.specs(manifest.outputs)
        self.reject_non_finite = reject_non_finite
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        self.device = pick_device(device)
        self.module: Any = module.to(self.device)
        try:
            self.module.eval()
        except NotImplementedError:  # a torch.export program module has no train/eval mode
            pass
        # True once this servable made the module half precision itself: its float32 outputs
        # then come back float16, and only that change of ours is undone (see _output).
        self._halved = False
        if manifest.precision == "fp16":
            # fp16 is a GPU target: CPU kernels for half matmuls are slow or missing, so on a
            # CPU host the same weights run in fp32 (and the log says so).
            if self.device.startswith("cuda"):
                self.module = self.module.half()
                self._halved = True
            else:
                log.warning("%s/%s is fp16 but runs on %s: serving it in fp32", self.name, self.version, self.device)
        self._encoder: tokens.TextEncoder | None = None
        if self.accepts_text:
            if tokenizer_path is None:
                raise E.ModelError(f"{self.name}/{self.version}: text model without a tokenizer file")
            self._text_inputs = tokens.text_inputs_of(manifest)
            self._encoder = tokens.text_encoder(manifest, tokenizer_path)
        log.info("loaded %s/%s (torch, %s) on %s", self.name, self.version, manifest.precision, self.device)

    def _run(self, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """One model call; the outputs by manifest name, each of its manifest dtype.

        Raises:
            ModelError: the forward fails, or its answer does not fit the manifest: a dict
                without a key the manifest names, another number of outputs, a value that
                is not a tensor, or another dtype. Each is the model's failure (model_error),
                handled as a forward that raised is.
        """
        import torch

        if self.module is None:
            raise E.ModelError(f"{self.name}/{self.version} is closed")
        try:
            with torch.inference_mode():
                args = [torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feed.values()]
                out = self.module(*args)
        except Exception as e:  # noqa: BLE001 - a model can raise anything; the worker must survive it
            raise E.ModelError(f"{self.name}/{self.version}: torch forward failed: {e}") from e
        try:
            items, keyed = program_outputs(out)
        except E.ModelError as e:
            raise E.ModelError(f"{self.name}/{self.version}: {e.message}") from e
        if keyed:
            # A dict is read by key: the manifest's names are the program's keys. A key that
            # is missing (a program whose keys vary with its input) is the model's failure.
            got = dict(items)
            missing = [s.name for s in self.outputs if s.name not in got]
            if missing:
                raise E.ModelError(f"{self.name}/{self.version}: the module returned a dict with keys {sorted(got)}; "
                                   f"the manifest's outputs {missing} are not among them")
            outs = [got[s.name] for s in self.outputs]
        else:
            outs = [t for _, t in items]
        if len(outs) != len(self.outputs):
            raise E.ModelError(f"{self.name}/{self.version}: module returned {len(outs)} outputs, "
                               f"manifest lists {len(self.outputs)}")
        return {s.name: self._output(s.name, s.dtype, o) for s, o in zip(self.outputs, outs, strict=True)}

    def _output(self, name: str, dtype: str, t: Any) -> np.ndarray[Any, Any]:
        """Output ``name`` as numpy, checked against its manifest ``dtype``.

        Raises:
            ModelError: the module returned another dtype. It is not converted: casting
                float32 to a manifest's int64 would truncate every value in silence, so a
                manifest that disagrees with its model must be fixed instead.
        """
        arr = tensor_to_numpy(t)
        got = dtype_name(arr.dtype)
        if got == dtype:
            return arr
        if self._halved and got == "float16" and dtype == "float32":
            return arr.astype(np.float32)  # our own .half() made it float16: undo only that
        raise E.ModelError(f"{self.name}/{self.version}: the manifest does not match the model: output {name!r}: "
                           f"manifest says {dtype}; the model returned {got}. Fix the manifest (headrace models add "
                           f"re-reads the model) or serve the version it was made for")

    def _run_tensors(self, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        # Order the feed like the manifest: the module takes its inputs positionally.
        return self._run({s.name: feed[s.name] for s in self.inputs})

    def close(self) -> None:
        self.module = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(backend="torch", format=self.manifest.format, precision=self.manifest.precision, device=self.device)
        return d


def load_torch_servable(manifest: Manifest, folder: Path, *, tokenizer_path: Path | None = None,
                        intra_op_threads: int = 0, device: str | None = None,
                        reject_non_finite: bool = True) -> TorchServable:
    """Build the module with the manifest's factory and wrap it.

    Raises:
        ModelError: no usable factory, or the weights do not load.
        MissingDependencyError: torch is not installed (``[torch]``).
    """
    require("torch", "torch", purpose="the torch backend")
    if manifest.format in ("torchscript", "pt2"):
        module = load_program(manifest, folder / manifest.model_file)
    else:
        module = build_module(folder, manifest)
    return TorchServable(manifest, module, tokenizer_path=tokenizer_path, intra_op_threads=intra_op_threads,
                         device=device, reject_non_finite=reject_non_finite)
