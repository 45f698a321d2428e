"""Is the entry being compressed itself a product of compression?

``headrace compress NAME --publish version`` makes NAME's latest version an INT8 (or fp16)
copy. Compressing NAME again would take that copy for "your fp32 model": the gate would
measure against the INT8 copy, quantization would stack, and QDQ or fp16 graphs make ORT's
quantizers fail with raw errors. So a version that is a compress product (its manifest's
precision is not fp32, a precision-changing compress step is in its recipe, or its graph
holds Q/DQ nodes or float16 tensors) is not compressed: when NAME was asked for without a
version and the product records the version of NAME it was made from (``manifest.source``,
followed back to an fp32 version), that version is compressed instead, and the run says so;
otherwise a :class:`ConfigError` names the version to pass.
"""

from __future__ import annotations

import re
from pathlib import Path

from headrace.client.errors import ConfigError, ModelNotFoundError, RepositoryError
from headrace.models.repository.manifest import Manifest
from headrace.models.repository.store import ModelRepository

# Recipe steps that change the numeric precision of a graph (pruning keeps fp32: a pruned
# entry is a model of its own and may be quantized).
PRECISION_STEPS = ("quantize-dynamic", "quantize-static", "fp16", "tflite")
# Nodes only a quantized graph holds.
QUANTIZED_NODES = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                   "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QLinearConv", "QLinearMatMul",
                   "QGemm", "MatMulIntegerToFloat")
_REF = re.compile(r"^(?P<name>[^/\s]+)/(?P<version>[1-9][0-9]*)$")
MAX_HOPS = 16


def product_kind(m: Manifest, onnx_path: Path | None) -> str:
    """What makes ``m`` a compress product ("int8", "fp16 (Q/DQ nodes in its graph)"...), or ""
    for a plain fp32 model."""
    if m.precision != "fp32":
        return m.precision
    steps = [str(s.get("step")) for s in m.recipe if s.get("step") in PRECISION_STEPS]
    if steps:
        return f"made by {' + '.join(steps)}"
    if onnx_path is None:
        return ""
    from headrace.models.compress.graph import float16_tensors, float_weight_elements, graph_op_types

    ops = graph_op_types(onnx_path)
    quantized = sorted(op for op in QUANTIZED_NODES if ops.get(op))
    if quantized:
        return f"already quantized ({', '.join(quantized)} nodes in its graph)"
    half, full = float_weight_elements(onnx_path)
    # an fp32 model may hold a float16 constant or two (a Cast's operand): its weights decide
    if half > full or (not full and float16_tensors(onnx_path)):
        return "fp16 (float16 tensors in its graph)"
    return ""


def _made_from(repo: ModelRepository, m: Manifest) -> Manifest | None:
    """The fp32 version ``m`` was made from, following ``manifest.source`` back through other
    products (``kmodel/3`` <- ``kmodel/2`` <- ``kmodel/1``); None when the chain leaves the
    repository or never reaches an fp32 version."""
    for _ in range(MAX_HOPS):
        ref = _REF.match(m.source or "")
        if ref is None:
            return None
        try:
            m = repo.verify(ref["name"], ref["version"])
        except (ModelNotFoundError, RepositoryError):
            return None
        if m.format in ("onnx", "torch") and not product_kind(m, _model_path(repo, m)):
            return m
    return None


def _model_path(repo: ModelRepository, m: Manifest) -> Path | None:
    return repo.file_path(m, m.model_file) if m.format == "onnx" else None


def resolve(repo: ModelRepository, m: Manifest, version_asked: str | None) -> tuple[Manifest, str]:
    """(the manifest to compress, a note for the output: "" when it is ``m`` itself).

    Raises:
        ConfigError: ``m`` is a compress product and no fp32 version of the same name can be
            taken in its place (a version was asked for, or the origin is unknown or another
            entry); the message names what to run instead.
    """
    what = product_kind(m, _model_path(repo, m))
    if not what:
        return m, ""
    ref = f"{m.name}/{m.version}"
    origin = _made_from(repo, m)
    if origin is not None and origin.name == m.name and version_asked is None:
        return origin, (f"{ref} (the latest version) is {what} made from {origin.name}/{origin.version}: "
                        f"compressing {origin.name}/{origin.version}, the fp32 model, instead")
    if origin is not None:
        raise ConfigError(f"{ref} is {what} made from {origin.name}/{origin.version}; compress works on the fp32 "
                          f"model: run `headrace compress {origin.name} --version {origin.version}`")
    base = _base_entry(repo, m.name)
    hint = (f"; `{base.name}` (fp32, version {base.version}) looks like it: `headrace compress {base.name}`"
            if base is not None else "")
    raise ConfigError(f"{ref} is {what}, not an fp32 model; compressing it again would stack quantization and "
                      "judge fidelity against a copy: compress the fp32 model it was made from (add it with "
                      f"`headrace models add` if the repository lacks it){hint}")


def _base_entry(repo: ModelRepository, name: str) -> Manifest | None:
    """The latest fp32 version of the entry ``name`` was published from by ``--publish name``
    (``digits`` for ``digits-int8``; the built-in recipes record where the data came from, not
    the entry), or None when there is no such entry."""
    base, sep, _suffix = name.rpartition("-")
    if not sep or not base:
        return None
    try:
        m = repo.load_manifest(base)
    except (ModelNotFoundError, RepositoryError):
        return None
    return m if m.format in ("onnx", "torch") and not product_kind(m, _model_path(repo, m)) else None


def describe_reference(m: Manifest) -> str:
    """The reference row's note: which entry the figures are measured against."""
    shaped = [str(s.get("step")) for s in m.recipe if s.get("step") in ("prune", "prune-heads", "drop-layers")]
    made = f", {' + '.join(shaped)} from {m.source}" if shaped and m.source else ""
    return f"your fp32 model {m.name}/{m.version}{made}"
