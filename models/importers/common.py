"""What every importer takes and gives: the ``headrace models add`` options, the result
(files, format, signature, example) and the ``NAME:DTYPE:SHAPE`` signature syntax.

Signature syntax (``--input`` / ``--output``)::

    x:float32:3,224,224        per-sample shape; the batch axis is axis 0 of the model tensor
    state:float32:2,B,128      B marks where the batch axis sits in the model tensor
    sr:int64:                  a scalar per sample (model tensor [B])
    sr:int64::nobatch          no batch axis: the tensor is the model's own, shared by a call
    x:float32:1,512:nobatch    (an unbatched model takes its tensors as they are)

``-1`` (or ``?``) is a dynamic dim. The fields are read from the right, so a name may hold
``:`` (tf2onnx names tensors ``x:0``): ``x:0:float32:4``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.client.protocol import STRING, WIRE_DTYPES
from headrace.client.wire import dtype_name
from headrace.models.repository.manifest import NO_BATCH, IOSpec

Array = np.ndarray[Any, Any]

TASKS = ("feature-extraction", "sentence-embedding", "text-classification")


@dataclass(frozen=True)
class ImportOptions:
    """The options of ``headrace models add`` that importers read.

    Attributes:
        inputs / outputs: signature overrides by name (see the module doc).
        example: example model inputs (batch axis included), e.g. from ``--example inputs.npz``.
        tokenizer: a ``tokenizer.json`` that makes the model a text model.
        preprocess / postprocess: manifest values (``bert_tokenizer``; ``l2_normalize``, ...).
        max_batch: largest model call (0 = unbounded).
        task: Hugging Face task (:data:`TASKS`).
        to_onnx: convert a torch program to ONNX on add.
        max_length: token truncation length for text models (0 = the tokenizer's / model's).
        opset: ONNX opset of conversions.
    """

    inputs: Mapping[str, IOSpec] = field(default_factory=dict)
    outputs: Mapping[str, IOSpec] = field(default_factory=dict)
    example: Mapping[str, Array] | None = None
    tokenizer: Path | None = None
    preprocess: str = ""
    postprocess: str = ""
    max_batch: int = 0
    task: str = ""
    to_onnx: bool = False
    max_length: int = 0
    opset: int = 17


@dataclass
class Imported:
    """A model ready to become a repository version.

    Attributes:
        files: relative path in the version folder -> file on disk (every file the model needs,
            ONNX external data and tokenizer included).
        format / model_file: manifest ``format`` and main file.
        inputs / outputs / batch_dim / max_batch / preprocess / postprocess: the signature.
        example: model inputs to check the servable with (stored as ``example.npz``).
        extra / source / recipe / notes: manifest extras, provenance, conversion steps, and
            lines for the user (e.g. "served unbatched").
    """

    files: dict[str, Path]
    format: str
    model_file: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    batch_dim: int = 0
    max_batch: int = 0
    preprocess: str = "none"
    postprocess: str = "none"
    example: dict[str, Array] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    recipe: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_io(text: str) -> IOSpec:
    """An :class:`IOSpec` from ``NAME:DTYPE:SHAPE[:nobatch]`` (see the module doc). The fields
    are read from the right, so NAME may hold ``:`` (tf2onnx's ``x:0``).

    Raises:
        ModelError: malformed text, unknown dtype, a bad dim or two ``B``.
    """
    parts = text.split(":")
    nobatch = len(parts) >= 4 and parts[-1] == "nobatch"
    fields = parts[:-1] if nobatch else parts
    name = ":".join(fields[:-2])
    if len(fields) < 3 or not name:
        raise ModelError(f"{text!r}: expected NAME:DTYPE:SHAPE (e.g. x:float32:3,224,224 or state:float32:2,B,128)")
    dtype, shape_text = fields[-2], fields[-1]
    if dtype not in WIRE_DTYPES:
        if shape_text in WIRE_DTYPES:
            raise ModelError(f"{text!r}: expected NAME:DTYPE:SHAPE; the shape is missing "
                             f"(NAME:{shape_text}: for a scalar per sample)")
        if any(f in WIRE_DTYPES for f in fields[1:-2]):
            raise ModelError(f"{text!r}: only 'nobatch' may follow the shape (NAME:DTYPE:SHAPE:nobatch)")
        raise ModelError(f"{text!r}: dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    dims: list[int] = []
    axis = 0
    tokens = [t.strip() for t in shape_text.split(",")] if shape_text.strip() else []
    if tokens.count("B") > 1 or (nobatch and "B" in tokens):
        raise ModelError(f"{text!r}: at most one B, and none with nobatch")
    for i, tok in enumerate(tokens):
        if tok == "B":
            axis = i
            continue
        if tok in ("?", "-1"):
            dims.append(-1)
            continue
        try:
            d = int(tok)
        except ValueError:
            raise ModelError(f"{text!r}: dim {tok!r} is not a number, -1/? or B") from None
        if d < 1:
            raise ModelError(f"{text!r}: dim {d} must be >= 1 (or -1 for dynamic)")
        dims.append(d)
    return IOSpec(name=name, dtype=dtype, shape=tuple(dims), batch_axis=NO_BATCH if nobatch else axis)


def merge_overrides(kind: str, detected: Sequence[IOSpec], overrides: Mapping[str, IOSpec],
                    known: Sequence[str] | None = None) -> tuple[IOSpec, ...]:
    """``detected`` with the user's overrides swapped in by name.

    Raises:
        ModelError: an override names a tensor the model does not have (when ``known``).
    """
    names = list(known) if known is not None else [s.name for s in detected]
    unknown = [n for n in overrides if known is not None and n not in names]
    if unknown:
        raise ModelError(f"--{kind} {unknown}: the model has no such {kind}; its {kind}s are {names}")
    by_name = {s.name: s for s in detected}
    by_name.update(overrides)
    ordered = [n for n in names if n in by_name] + [n for n in by_name if n not in names]
    return tuple(by_name[n] for n in ordered)


def whole_batch_outputs(outputs: Sequence[IOSpec], batched_sources: Callable[[str], Sequence[str]]) -> list[str]:
    """Notes for the outputs of a batched model that have no batch axis yet are computed
    from batched inputs (``batched_sources(name)``: those inputs, empty when none): a value
    of the whole model call, such as a sum over the batch. Each request would be given one
    made from its call-mates' inputs too, so a model with any is served one request per
    call (``max_batch`` 1). Empty: none (an output from shared inputs only goes whole to
    every request of its call)."""
    notes = []
    for s in outputs:
        sources = [] if s.batched else list(batched_sources(s.name))
        if sources:
            notes.append(f"output {s.name!r} has no batch axis but is computed from the batched input(s) "
                         f"{sources}: a value of the whole call, so each request runs as its own model call "
                         f"(max_batch 1)")
    return notes


def spec_from_array(name: str, a: Array, batch_axis: int = 0) -> IOSpec:
    """Per-sample signature of an example array (``batch_axis`` removed)."""
    shape = list(a.shape)
    if batch_axis != NO_BATCH:
        del shape[batch_axis]
    return IOSpec(name=name, dtype=a.dtype.name, shape=tuple(shape), batch_axis=batch_axis)


def load_npz(path: Path) -> dict[str, Array]:
    """Arrays of an ``.npz`` (``allow_pickle=False``).

    Raises:
        ModelError: unreadable, or a dtype that is not a wire dtype.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read example {path}: {e} (save it with numpy.savez)") from e
    bad = {k: a.dtype.name for k, a in arrays.items() if dtype_name(a.dtype) not in WIRE_DTYPES}
    if bad:
        raise ModelError(f"example {path}: dtypes {bad} are not wire dtypes ({sorted(WIRE_DTYPES)}; "
                         f"strings as numpy str arrays)")
    return arrays


def synth_example(inputs: Sequence[IOSpec], batched: bool, batch: int = 2, seed: int = 0) -> dict[str, Array]:
    """Model inputs made from a signature (dynamic dims = 1 .. 4, a batch of ``batch``):
    small random values, ints in [0, 2), short words for strings (numpy str arrays, which
    ``numpy.savez`` stores without pickle)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for s in inputs:
        dims = [d if d != -1 else 4 for d in s.shape]
        if batched and s.batched:
            dims.insert(s.batch_axis, batch)
        if s.dtype == STRING:
            words = np.array(["headrace", "checks", "this", "model"])
            out[s.name] = words[rng.integers(0, len(words), dims)]
            continue
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            out[s.name] = rng.standard_normal(dims).astype(dt)
        elif dt.kind == "b":
            out[s.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            out[s.name] = rng.integers(0, 2, dims).astype(dt)
    return out
