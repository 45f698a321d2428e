"""Importers: turn a user's model into what a repository version needs (``headrace models add``).

One module per source kind; :func:`import_source` picks one from the path:

=====================================  ===================================================
source                                 importer
=====================================  ===================================================
``*.onnx``                             :mod:`.onnx` (signature from the graph)
``*.pt`` / ``*.jit`` / ``*.ts``        :mod:`.torch` (TorchScript; ``--to-onnx`` converts)
``*.pt2``                              :mod:`.torch` (``torch.export`` program)
folder with ``config.json``            :mod:`.huggingface` (BERT/RoBERTa/DistilBERT family)
folder with ``saved_model.pb``,
``*.keras`` / ``*.h5``, ``*.tflite``   :mod:`.tensorflow` (tf2onnx, the ``[tf]`` extra)
=====================================  ===================================================

Importers never write into the repository: they return an :class:`Imported` (files,
format, signature, example) that ``add`` checks through the worker's servable and then
publishes as the next version.
"""

from __future__ import annotations

from pathlib import Path

from headrace.client.errors import ModelError, ModelNotFoundError
from headrace.client.optional import WORKER, require_all
from headrace.models.importers.common import TASKS, Imported, ImportOptions, parse_io

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".jit", ".ts", ".torchscript")
KERAS_SUFFIXES = (".keras", ".h5")
# What importing each kind imports, by the extra that brings it; checked before any work so
# that a missing extra is named at once. Every import ends in an ONNX Runtime or torch load
# of the result (the servable check of `add`); tf2onnx brings onnx.
_ONNX: dict[str, str | tuple[str, ...]] = {"onnx": "compress", "onnxruntime": WORKER}
_TF: dict[str, str | tuple[str, ...]] = {"tensorflow": "tf", "tf2onnx": "tf", "onnxruntime": WORKER}
IMPORT_NEEDS: dict[str, dict[str, str | tuple[str, ...]]] = {
    "onnx": _ONNX, "torchscript": {"torch": "torch"}, "pt2": {"torch": "torch"},
    "huggingface": {"torch": "compress", "transformers": "compress", **_ONNX},
    "savedmodel": _TF, "keras": _TF, "tflite": _TF}


def source_kind(source: Path) -> str:
    """``onnx``, ``torchscript``, ``pt2``, ``huggingface``, ``savedmodel``, ``keras`` or ``tflite``.

    Raises:
        ModelNotFoundError: the path does not exist.
        ModelError: a file or folder of a kind no importer takes.
    """
    if not source.exists():
        raise ModelNotFoundError(f"{source} does not exist")
    suffix = source.suffix.lower()
    if source.is_dir():
        if (source / "saved_model.pb").is_file():
            return "savedmodel"
        if (source / "config.json").is_file():
            return "huggingface"
        raise ModelError(f"{source} is a folder without config.json (Hugging Face) or saved_model.pb "
                         f"(TensorFlow); point at the model file instead")
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if suffix == ".pt2":
        return "pt2"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix == ".tflite":
        return "tflite"
    raise ModelError(f"{source.name}: no importer for {suffix or 'files without a suffix'!r}; headrace takes "
                     f".onnx, TorchScript (.pt/.jit), torch.export (.pt2), a Hugging Face folder, a TensorFlow "
                     f"SavedModel folder, .keras/.h5 or .tflite")


def import_source(source: Path, opts: ImportOptions, work_dir: Path) -> Imported:
    """Import ``source`` with the importer its kind needs; conversions write under ``work_dir``.

    Raises:
        ModelNotFoundError / ModelError: see the importer.
        MissingDependencyError: a missing extra (a ``ConfigError``), named in the message.
    """
    kind = source_kind(source)
    require_all({**IMPORT_NEEDS[kind], **(_ONNX if opts.to_onnx else {})}, purpose=f"importing {source.name}")
    if kind == "onnx":
        from headrace.models.importers.onnx import import_onnx

        return import_onnx(source, opts)
    if kind in ("torchscript", "pt2"):
        from headrace.models.importers.torch import import_torch

        return import_torch(source, kind, opts, work_dir)
    if kind == "huggingface":
        from headrace.models.importers.huggingface import import_huggingface

        return import_huggingface(source, opts, work_dir)
    from headrace.models.importers.tensorflow import import_tensorflow

    return import_tensorflow(source, kind, opts, work_dir)


__all__ = ["TASKS", "ImportOptions", "Imported", "import_source", "parse_io", "source_kind"]
