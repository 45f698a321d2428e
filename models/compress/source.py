"""The model being compressed: a repository entry in ONNX or torch format, opened as an fp32
ONNX graph (every quantizer works on that) plus, for torch entries, the module itself
(structured pruning and distillation need it).

A torch entry is exported with the TorchScript exporter on the user's own calibration
samples, every input's sample axis marked dynamic, and checked against the module on a
batch of another size before anything is compressed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress.data import Declared, Feed, Samples, TextEncoder
from headrace.models.compress.graph import load_graph
from headrace.models.repository.manifest import Manifest
from headrace.models.repository.store import ModelRepository

log = logging.getLogger(__name__)

COMPRESSIBLE = ("onnx", "torch")


@dataclass
class Source:
    """An opened repository entry.

    Attributes:
        repo / manifest: where it lives.
        folder: its version folder.
        onnx_path: the fp32 ONNX graph (the entry's own file, or the export of a torch module).
        module: the torch module (torch entries only).
        declared: graph input name -> declared dims (None = dynamic).
        output_names: graph outputs, in order.
        encode: texts -> feeds, for text models (``preprocess: bert_tokenizer``).
        dtypes: graph input name -> the numpy dtype it takes (string inputs: object).
        note: why this version was opened rather than the one asked for ("" when it was).
    """

    repo: ModelRepository
    manifest: Manifest
    folder: Path
    onnx_path: Path | None
    module: Any
    declared: Declared
    output_names: tuple[str, ...]
    encode: TextEncoder | None
    note: str = ""
    dtypes: dict[str, np.dtype[Any]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}/{self.manifest.version}"

    @property
    def accepts_text(self) -> bool:
        return self.encode is not None


def graph_signature(path: str | Path) -> tuple[dict[str, list[int | None]], tuple[str, ...]]:
    """(input name -> declared dims with None for dynamic ones, output names) of an ONNX file.

    Raises:
        ModelError: the file is not a readable ONNX model.
    """
    model = load_graph(path)
    inits = {i.name for i in model.graph.initializer}
    declared: dict[str, list[int | None]] = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        declared[i.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return declared, tuple(o.name for o in model.graph.output)


def _text_encoder(repo: ModelRepository, m: Manifest, names: Sequence[str]) -> TextEncoder:
    """Texts -> feeds as the worker makes them: truncated at ``extra.max_length`` (a long
    text tokenised only as far as that needs), padded with ``extra.pad_id``. Each text is
    tokenised once: compression feeds the same texts many times (calibration, checks,
    evaluation of every step), so the ids are kept for the encoder's life."""
    from headrace.models.tokenizer import PrefixTokenizer, pad_ids

    tok = PrefixTokenizer(repo.file_path(m, str(m.extra.get("tokenizer", "tokenizer.json"))),
                          max_length=int(m.extra.get("max_length", 256)))
    pad = m.extra.get("pad_id")
    pad_id = int(pad) if isinstance(pad, int) else tok.pad_id
    known: dict[str, list[int]] = {}

    def encode(texts: Sequence[str]) -> Feed:
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            known.update(zip(new, tok.ids_of(new), strict=True))
        ids, mask = pad_ids([known[t] for t in texts], pad_id)
        every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {n: every[n] for n in names}

    return encode


def open_source(repo: ModelRepository, name: str, version: str | None = None) -> Source:
    """Open ``name``/``version`` (latest when None) for compression; checksums are verified.

    Raises:
        ModelNotFoundError: no such model/version. RepositoryError: a modified file.
        ConfigError: a format that cannot be compressed here, or a compress product (INT8, fp16)
            that cannot be traced back to its fp32 version (:func:`.lineage.resolve`).
        ModelError: the module cannot be built.
    """
    m = repo.verify(name, version or None)
    note = ""
    if m.format in COMPRESSIBLE:  # an INT8/fp16 copy is never "your fp32 model" (see lineage)
        from headrace.models.compress.lineage import resolve

        m, note = resolve(repo, m, version or None)
    if m.format not in COMPRESSIBLE:
        hint = (f"add the file again as ONNX (headrace models add {name} MODEL{'.pt2' if m.format == 'pt2' else '.pt'} "
                "--to-onnx) and compress that entry" if m.format in ("torchscript", "pt2") else
                "compress the entry it was made from")
        raise ConfigError(f"{name}/{m.version} is format {m.format!r}; compress works on {list(COMPRESSIBLE)} "
                          f"entries: {hint}")
    folder = repo.path(m.name, m.version)
    if m.format == "onnx":
        onnx_path = repo.file_path(m, m.model_file)
        declared, outputs = graph_signature(onnx_path)
        module = None
    else:
        from headrace.models.torch_factory import build_module

        module = build_module(folder, m)
        onnx_path = None
        declared = {s.name: [None, *(None if d == -1 else d for d in s.shape)] for s in m.inputs}
        outputs = tuple(s.name for s in m.outputs)
    encode = _text_encoder(repo, m, list(declared)) if m.accepts_text else None
    dtypes = input_dtypes(onnx_path) if onnx_path is not None else {s.name: _np_dtype(s.dtype) for s in m.inputs}
    return Source(repo, m, folder, onnx_path, module, declared, outputs, encode, note, dtypes)


def _np_dtype(wire: str) -> np.dtype[Any]:
    return np.dtype(object) if wire == "string" else np.dtype(wire)


def input_dtypes(path: str | Path) -> dict[str, np.dtype[Any]]:
    """Graph input name -> numpy dtype (initializers excluded; inputs of an unknown element
    type are left out, so nothing is refused on a guess).

    Raises:
        ModelError: the file is not a readable ONNX model.
    """
    from onnx.helper import tensor_dtype_to_np_dtype

    model = load_graph(path)
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, np.dtype[Any]] = {}
    for i in model.graph.input:
        elem = i.type.tensor_type.elem_type
        if i.name not in inits and elem:
            try:
                out[i.name] = np.dtype(tensor_dtype_to_np_dtype(elem))
            except (KeyError, TypeError):  # bfloat16/float8 and the like: no numpy twin to compare
                continue
    return out


def export_source(src: Source, samples: Samples, work: Path) -> Path:
    """The fp32 ONNX graph of a torch source, exported on two of the user's batches (sizes 4
    and 3, the second proving the sample axes are dynamic); ONNX sources are returned as is.

    Raises:
        ModelError: the export failed or differs from the module.
    """
    if src.onnx_path is not None:
        return src.onnx_path
    from headrace.models.compress.export import export_onnx

    feeds = samples.feeds(4, src.encode)
    if len(feeds) < 2 and samples.n < 2:
        raise ConfigError("exporting a torch model needs at least 2 samples")
    check = samples.subset(range(min(3, samples.n))).feeds(3, src.encode)
    axes: dict[str, dict[int, str]] = {k: {a: "batch"} for k, a in samples.batch_axes.items() if a is not None}
    if src.accepts_text:
        axes = {k: {0: "batch", 1: "sequence"} for k in src.declared}
    axes.update({o: {0: "batch"} for o in src.output_names})
    path = work / "source-fp32.onnx"
    export_onnx(src.module, feeds[0], path, output_names=src.output_names, dynamic_axes=axes,
                check_inputs=[feeds[0], *check], atol=1e-3)
    src.onnx_path = path
    log.info("exported %s to %s for compression", src.ref, path)
    return path


def sample_outputs_axes(path: Path, feeds: Sequence[Feed], sizes: Sequence[int],
                        output_names: Sequence[str]) -> dict[str, int]:
    """The sample axis of every output, found by running two batches of different sizes
    and looking for the axis whose length follows the batch (silero-vad's ``stateN`` is
    ``[2, batch, 128]``); axis 0 when the batches are the same size.

    Raises:
        ModelError: the graph does not run on the feeds.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        outs = [sess.run(list(output_names), f) for f in feeds[:2]]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises Fail/InvalidArgument/RuntimeException
        raise ModelError(f"{path.name} does not run on the data: {e}") from e
    axes: dict[str, int] = {}
    for i, name in enumerate(output_names):
        shapes = [np.shape(o[i]) for o in outs]
        axes[name] = 0
        if len(shapes) == 2 and sizes[0] != sizes[1]:
            for ax in range(len(shapes[0])):
                if shapes[0][ax] == sizes[0] and shapes[1][ax] == sizes[1]:
                    axes[name] = ax
                    break
    return axes
