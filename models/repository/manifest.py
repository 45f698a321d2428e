"""The manifest of one model version (``manifest.json``) and the path/name rules of the
model repository. Plain JSON, validated on read; see :mod:`headrace.models.repository.store`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from headrace.client.errors import RepositoryError
from headrace.client.protocol import WIRE_DTYPES

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
FORMATS = frozenset({"onnx", "torch", "torchscript", "pt2", "tensorrt", "tflite"})
TORCH_FORMATS = frozenset({"torch", "torchscript", "pt2"})
PREPROCESS = frozenset({"none", "bert_tokenizer"})
POSTPROCESS = frozenset({"none", "l2_normalize", "softmax", "argmax"})
DEFAULT_MODEL_FILE = {"onnx": "model.onnx", "torch": "model.safetensors", "torchscript": "model.pt",
                      "pt2": "model.pt2", "tensorrt": "model.plan", "tflite": "model.tflite"}
NO_BATCH = -1
"""``batch_axis`` / ``batch_dim`` value for "no batch axis" (see :class:`IOSpec`)."""
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
TOKEN_RE = re.compile(r"^[a-z0-9_]{1,32}$")
CHUNK_BYTES = 1 << 20


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe model name (also a Redis key part).

    Raises:
        RepositoryError: empty, too long, ``.``/``..``, or characters other than [A-Za-z0-9_.-].
    """
    if not isinstance(name, str) or not NAME_RE.match(name) or name in {".", ".."}:
        raise RepositoryError(f"model name {name!r} must be 1-128 characters of letters, digits, '-', '_' or '.'")
    return name


def check_version(version: str | int) -> str:
    """Return the canonical version string (positive integer, no leading zeros).

    Raises:
        RepositoryError: not a positive integer.
    """
    v = str(version)
    if not VERSION_RE.match(v):
        raise RepositoryError(f"version {version!r} must be a positive integer such as '1'")
    return v


def check_relpath(rel: str) -> PurePosixPath:
    """Validate a file path relative to a version folder.

    Raises:
        RepositoryError: absolute, empty, containing ``..``/backslashes/NUL, or the manifest itself.
    """
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise RepositoryError(f"file path {rel!r} must be a non-empty relative POSIX path")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in {"..", ".", ""} for part in p.parts) or rel.startswith("/"):
        raise RepositoryError(f"file path {rel!r} escapes its version folder (absolute or '..')")
    if rel == MANIFEST_FILE:
        raise RepositoryError(f"{MANIFEST_FILE} is reserved for the manifest")
    return p


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class IOSpec:
    """One input or output, per sample: the batch axis is not in ``shape``; -1 = dynamic.

    ``batch_axis`` is where the batch axis sits in the model's tensor (0 for most models;
    silero-vad's state ``[2, B, 128]`` has 1). ``-1`` (:data:`NO_BATCH`): the tensor has
    no batch axis. Such an input is shared by a model call, so only requests with equal
    values run together (e.g. a sample rate); such an output is given whole to every
    request of the call.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int = 0

    @property
    def batched(self) -> bool:
        return self.batch_axis != NO_BATCH

    def model_shape(self, batch: int = -1) -> tuple[int, ...]:
        """The tensor's shape as the model sees it: ``batch`` inserted at ``batch_axis``."""
        if not self.batched:
            return tuple(self.shape)
        return (*self.shape[:self.batch_axis], batch, *self.shape[self.batch_axis:])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.batch_axis != 0:
            d["batch_axis"] = self.batch_axis
        return d

    @classmethod
    def from_dict(cls, d: Any) -> IOSpec:
        if not isinstance(d, Mapping) or not {"name", "dtype", "shape"} <= set(d):
            raise RepositoryError(f"signature entry {d!r} needs name, dtype and shape")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or not name:
            raise RepositoryError(f"signature name {name!r} must be a non-empty string")
        if dtype not in WIRE_DTYPES:
            raise RepositoryError(f"{name}: dtype {dtype!r} is not a wire dtype ({sorted(WIRE_DTYPES)})")
        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in shape):
            raise RepositoryError(f"{name}: shape {shape!r} must be a list of ints >= -1 (-1 = dynamic)")
        axis = d.get("batch_axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool) or not NO_BATCH <= axis <= len(shape):
            raise RepositoryError(f"{name}: batch_axis {axis!r} must be -1 (none) or an axis 0..{len(shape)} "
                                  f"of the model's tensor")
        unknown = set(d) - {"name", "dtype", "shape", "batch_axis"}
        if unknown:
            raise RepositoryError(f"{name}: unknown signature fields {sorted(unknown)}")
        return cls(name=name, dtype=dtype, shape=tuple(shape), batch_axis=axis)


@dataclass(frozen=True)
class FileEntry:
    """A file of a version: relative POSIX path, sha256 (hex) and size in bytes."""

    path: str
    sha256: str
    size_bytes: int

    @classmethod
    def from_dict(cls, d: Any) -> FileEntry:
        if not isinstance(d, Mapping) or not {"path", "sha256", "size_bytes"} <= set(d):
            raise RepositoryError(f"file entry {d!r} needs path, sha256 and size_bytes")
        check_relpath(d["path"])
        if not isinstance(d["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", d["sha256"]):
            raise RepositoryError(f"file {d['path']!r}: sha256 must be 64 lowercase hex digits")
        return cls(path=d["path"], sha256=d["sha256"], size_bytes=int(d["size_bytes"]))


@dataclass(frozen=True)
class Manifest:
    """Everything known about one model version (``manifest.json``).

    Attributes:
        name / version: where it lives (``<repo>/<name>/<version>``).
        format: ``onnx``, ``torch`` (safetensors state dict + built-in architecture),
            ``torchscript`` (``torch.jit.save`` file), ``pt2`` (``torch.export.save`` program)
            ``tensorrt`` or ``tflite`` (LiteRT).
        backend: runtime that serves it (``onnxruntime`` or ``torch``).
        precision: ``fp32``, ``fp16``, ``int8``, ...
        inputs / outputs: per-sample signature.
        batch_dim: 0: the model takes batches (each input's ``batch_axis`` says where);
            -1: the model has no batch axis, one request is one model call and the
            signature shapes are the model's own.
        max_batch: largest batch the model accepts; 0 = unbounded.
        preprocess: ``bert_tokenizer`` (text in; ``tokenizer.json`` in the folder) or ``none``.
        postprocess: ``none``, ``l2_normalize``, ``softmax`` or ``argmax`` (done in the servable).
        model_file: the main file (``model.onnx``, ``model.safetensors``).
        source: what it was made from (e.g. ``sentence-transformers/all-MiniLM-L6-v2``).
        recipe: compression steps in order, each ``{"step": ..., "params": {...}}``.
        measured: free JSON dict (size_bytes, params, throughput, fidelity, ...).
        files: every file with its sha256 and size.
        created: ISO-8601 UTC creation time.
        extra: free JSON dict for loaders (e.g. ``minilm_config``, ``max_length``).
        description: one line for humans.
    """

    name: str
    version: str
    format: str
    backend: str
    precision: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    batch_dim: int = 0
    max_batch: int = 0
    preprocess: str = "none"
    postprocess: str = "none"
    model_file: str = ""
    source: str = ""
    recipe: tuple[dict[str, Any], ...] = ()
    measured: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def accepts_text(self) -> bool:
        return self.preprocess == "bert_tokenizer"

    @property
    def batched(self) -> bool:
        """The model takes batches (``batch_dim`` 0)."""
        return self.batch_dim != NO_BATCH

    def file(self, rel: str) -> FileEntry:
        """The entry for ``rel``. Raises RepositoryError if the manifest does not list it."""
        for f in self.files:
            if f.path == rel:
                return f
        raise RepositoryError(f"{self.name}/{self.version}: {rel!r} is not listed in the manifest")

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [s.to_dict() for s in self.inputs]
        d["outputs"] = [s.to_dict() for s in self.outputs]
        d["recipe"] = [dict(step) for step in self.recipe]
        d["files"] = [asdict(f) for f in self.files]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Build and validate a manifest from its JSON dict.

        Raises:
            RepositoryError: a field is missing, has the wrong type, or is not allowed.
        """
        if not isinstance(d, Mapping):
            raise RepositoryError("manifest must be a JSON object")
        missing = {"name", "version", "format", "inputs", "outputs"} - set(d)
        if missing:
            raise RepositoryError(f"manifest misses required fields {sorted(missing)}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RepositoryError(f"manifest has unknown fields {sorted(unknown)}")
        fmt = d["format"]
        if fmt not in FORMATS:
            raise RepositoryError(f"format {fmt!r} must be one of {sorted(FORMATS)}")
        kw: dict[str, Any] = dict(d)
        kw["name"] = check_name(d["name"])
        kw["version"] = check_version(d["version"])
        kw.setdefault("backend", "torch" if fmt in TORCH_FORMATS else "onnxruntime")
        kw.setdefault("precision", "fp32")
        kw.setdefault("model_file", DEFAULT_MODEL_FILE[fmt])
        kw["inputs"] = tuple(IOSpec.from_dict(x) for x in _list(d["inputs"], "inputs"))
        kw["outputs"] = tuple(IOSpec.from_dict(x) for x in _list(d["outputs"], "outputs"))
        kw["files"] = tuple(FileEntry.from_dict(x) for x in _list(d.get("files", []), "files"))
        recipe = _list(d.get("recipe", []), "recipe")
        if not all(isinstance(s, Mapping) and isinstance(s.get("step"), str) for s in recipe):
            raise RepositoryError("every recipe step must be an object with a 'step' name")
        kw["recipe"] = tuple(dict(s) for s in recipe)
        for key in ("measured", "extra"):
            if not isinstance(kw.get(key, {}), Mapping):
                raise RepositoryError(f"{key} must be a JSON object")
            kw[key] = dict(kw.get(key, {}))
        m = cls(**kw)
        m.validate()
        return m

    def validate(self) -> None:
        """Raises RepositoryError if fields are inconsistent."""
        if not TOKEN_RE.match(self.precision) or not TOKEN_RE.match(self.backend):
            raise RepositoryError(f"precision {self.precision!r} / backend {self.backend!r} must be short lowercase tokens")
        if self.preprocess not in PREPROCESS:
            raise RepositoryError(f"preprocess {self.preprocess!r} must be one of {sorted(PREPROCESS)}")
        if self.postprocess not in POSTPROCESS:
            raise RepositoryError(f"postprocess {self.postprocess!r} must be one of {sorted(POSTPROCESS)}")
        if self.batch_dim not in (0, NO_BATCH) or self.max_batch < 0:
            raise RepositoryError("batch_dim must be 0 (batched) or -1 (unbatched), and max_batch >= 0 "
                                  "(0 = unbounded)")
        if self.batch_dim == 0 and self.inputs and not any(s.batched for s in self.inputs):
            raise RepositoryError("a batched model (batch_dim 0) needs an input with a batch axis; "
                                  "set batch_dim -1 to serve it unbatched")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise RepositoryError(f"{kind} {names}: a name is listed twice")
        if not self.outputs or (not self.inputs and not self.accepts_text):
            raise RepositoryError("a model needs outputs, and inputs unless it takes text")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise RepositoryError("a file is listed twice in the manifest")
        if self.files and self.model_file not in paths:
            raise RepositoryError(f"model_file {self.model_file!r} is not among the listed files")


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise RepositoryError(f"{what} must be a JSON list")
    return value


@dataclass(frozen=True)
class ManifestSummary:
    """One row of ``headrace models list``."""

    name: str
    version: str
    format: str
    precision: str
    preprocess: str
    size_bytes: int
    created: str
    source: str
    recipe: tuple[str, ...]
    measured: dict[str, Any]

    @classmethod
    def of(cls, m: Manifest) -> ManifestSummary:
        return cls(name=m.name, version=m.version, format=m.format, precision=m.precision,
                   preprocess=m.preprocess, size_bytes=m.size_bytes, created=m.created, source=m.source,
                   recipe=tuple(str(s.get("step")) for s in m.recipe), measured=dict(m.measured))
