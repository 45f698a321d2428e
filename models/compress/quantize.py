"""Post-training quantization of an ONNX model with ONNX Runtime's quantization tools.

* :func:`quantize_dynamic_int8`: INT8 weights (per output channel by default: per-tensor
  scales lose too much on MiniLM, whose projection rows differ widely in range), activations
  quantized on the fly per batch. No calibration data; on x86 with VNNI the MatMuls run as
  ``DynamicQuantizeMatMul``.
* :func:`quantize_static_int8`: QDQ format with activation ranges calibrated on real inputs
  (:class:`FeedsCalibrationReader`), cached as JSON so a sensitivity scan calibrates once.
* :func:`sensitivity_scan` + :func:`mixed_precision`: quantize one weight-bearing node at a
  time to measure how much each costs, then leave the most sensitive ones in fp32 -- as few
  as the fidelity budget allows (found by doubling then bisection over the ranked list).
* :func:`convert_fp16`: fp16 weights and compute for GPU targets (TensorRT, CUDA EP), keeping
  graph inputs and outputs fp32 so callers do not change.

Every function writes a new file and never modifies its input.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError
from headrace.client.optional import WORKER, require
from headrace.models.compress.graph import (  # noqa: F401 - re-exported: quantize is where callers look
    DYNAMIC_CANDIDATES,
    STATIC_CNN_OPS,
    STATIC_WEIGHT_OPS,
    WEIGHT_OPS,
    WeightNode,
    choose_op_types,
    constants_to_initializers,
    graph_op_types,
    ml_adjacent_nodes,
    weight_nodes,
)
from headrace.models.compress.mixed import (  # noqa: F401 - re-exported
    MixedPrecisionResult,
    NodeSensitivity,
    QuantizeFn,
    ScoreFn,
    mixed_precision,
    sensitivity_scan,
)

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray[Any, Any]]


# Dynamic quantization also stores embedding tables (Gather) as int8: MiniLM's word table is
# 47 of its 90 MB; measured on 512 held-out sentences it moves mean cosine by 0.0003.
DYNAMIC_OPS = (*WEIGHT_OPS, "Gather")
STATIC_OPS = ("MatMul", "Gemm")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _ort_quant() -> Any:
    return require("onnxruntime.quantization", WORKER, purpose="quantization")


@contextlib.contextmanager
def _in_dir(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory: ONNX Runtime's quantization tools drop
    files there (``sym_shape_infer_temp.onnx``, uuid-named ``.data`` external weights of a
    model they save and reload), which would otherwise pile up wherever the user ran
    ``headrace compress``."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _check_paths(src: Path, dst: Path) -> tuple[Path, Path]:
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if not src.is_file():
        raise ModelError(f"no ONNX model at {src}")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"quantization output {dst} must differ from its input")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return src, dst


_PREPROCESS_WARNED: set[str] = set()


def _preprocess(src: Path, tmp: Path) -> Path:
    """Shape inference before quantization (ORT's recommended pre-processing), which lets the
    quantizer see activation shapes and dtypes, after moving Constant-node weights into
    initializers (:func:`constants_to_initializers`). Optimisation is skipped: the input is
    either already optimised or will be optimised by the session."""
    staged = tmp / "constants.onnx"
    if constants_to_initializers(src, staged) == 0:
        staged = src
    out = tmp / "preprocessed.onnx"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # In the scratch folder: symbolic shape inference dumps sym_shape_infer_temp.onnx into
        # the working directory when it gives up (it does on graphs with If subgraphs).
        with _in_dir(tmp):
            quant_pre_process(str(staged), str(out), skip_optimization=True, skip_symbolic_shape=False)
        return out
    except Exception as e:  # noqa: BLE001 - symbolic shape inference gives up on some graphs; only a help
        # once per graph: the mixed-precision search quantizes the same graph many times
        level = logging.DEBUG if str(src) in _PREPROCESS_WARNED else logging.WARNING
        _PREPROCESS_WARNED.add(str(src))
        log.log(level, "quantization pre-processing of %s failed (%s); quantizing without it", src, e)
        return staged


# --- dynamic and static INT8 -------------------------------------------------------------


_VNNI = re.compile(r"\b(avx512_vnni|avx_vnni|amx_int8)\b")


def cpu_needs_reduce_range(cpuinfo: str | None = None) -> bool:
    """True on an x86 host without VNNI (AVX512-VNNI, AVX-VNNI or AMX): there ONNX Runtime's
    uint8 x int8 kernels (``VPMADDUBSW``) add pairs of products in int16, which saturates
    with 8-bit weights (a 25 % error on a plain MatMul was measured), so weights must be
    quantized to 7 bits (ORT's ``reduce_range``). Other CPUs (ARM, x86 with VNNI) take
    8-bit weights.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (None: read it; an x86 host where it cannot
            be read counts as lacking VNNI, the choice that is accurate everywhere).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        return _host_needs_reduce_range()
    return _VNNI.search(cpuinfo) is None


@functools.cache
def _host_needs_reduce_range() -> bool:
    # read once: the CPU does not change under a process, and a mixed-precision search
    # quantizes many times
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return _VNNI.search(cpuinfo) is None


def resolve_reduce_range(asked: bool | None) -> bool:
    """``asked``, or for None what :func:`cpu_needs_reduce_range` says for this host."""
    return cpu_needs_reduce_range() if asked is None else asked


def quantize_dynamic_int8(
    src: str | Path,
    dst: str | Path,
    *,
    per_channel: bool = True,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = DYNAMIC_OPS,
    reduce_range: bool | None = None,
) -> Path:
    """INT8 dynamic quantization: int8 weights, uint8 activations quantized per batch.

    Args:
        per_channel: one scale per output channel of each weight (default; per-tensor
            scales cost MiniLM several points of cosine).
        nodes_to_quantize: only these nodes (None = every node of ``op_types``).
        op_types: op types to quantize; embedding ``Gather`` tables included by default.
        nodes_to_exclude: keep these nodes in fp32 (mixed precision).
        reduce_range: 7-bit weights, for x86 CPUs without VNNI where 8-bit products
            saturate; None: as :func:`cpu_needs_reduce_range` says for this host (quantize
            on the kind of CPU that will serve, or pass True when unsure: 7-bit weights are
            accurate everywhere).

    Returns ``dst``. Raises ModelError if the model is missing or quantization fails.
    """
    src, dst = _check_paths(Path(src), Path(dst))
    q = _ort_quant()
    reduce_range = resolve_reduce_range(reduce_range)
    with tempfile.TemporaryDirectory(prefix="headrace-quant-") as tmp, _in_dir(Path(tmp)):
        pre = _preprocess(src, Path(tmp))
        try:
            q.quantize_dynamic(
                pre, dst, per_channel=per_channel, reduce_range=reduce_range, weight_type=q.QuantType.QInt8,
                op_types_to_quantize=list(op_types), nodes_to_quantize=_with_gemm_aliases(nodes_to_quantize or []),
                nodes_to_exclude=_with_gemm_aliases(nodes_to_exclude),
                # Weights inside If/Loop bodies (e.g. a model with one branch per sample rate)
                # are only reached with subgraph quantization on.
                extra_options={"EnableSubgraph": True, **_untyped_is_float()},
            )
        except Exception as e:  # the quantizer raises bare Exceptions/ValueErrors for odd graphs
            raise ModelError(f"dynamic INT8 quantization of {src} failed: {e}") from e
    log.info("quantized %s -> %s (dynamic int8, per_channel=%s, reduce_range=%s, %d nodes kept fp32)",
             src.name, dst, per_channel, reduce_range, len(nodes_to_exclude))
    return dst


def _untyped_is_float() -> dict[str, int]:
    """ORT's ``DefaultTensorType`` extra option: the type its quantizer assumes for a tensor
    that shape inference left untyped, instead of raising "Unable to find data type for
    weight_name". Inference stops at ``ai.onnx.ml`` ops (an sklearn Pipeline's Scaler feeding
    a PCA MatMul); compress only quantizes fp32 graphs (see :mod:`.lineage`), so an untyped
    tensor a MatMul/Gemm takes is float32. (ORT's QDQ quantizer skips untyped tensors rather
    than asking; the option is harmless there.)"""
    from onnx import TensorProto

    return {"DefaultTensorType": TensorProto.FLOAT}


def _with_gemm_aliases(names: Sequence[str]) -> list[str]:
    # Dynamic quantization first rewrites each Gemm as MatMul + Add, renaming the node
    # "<name>_MatMul"; without the alias a Gemm named in a node list would be silently ignored.
    return [alias for n in names for alias in (n, f"{n}_MatMul")]


class FeedsCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over a list of input feeds (one per batch).

    Re-iterable: :meth:`rewind` starts over, which ORT's calibrators do not do themselves.
    """

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        if not feeds:
            raise ConfigError("calibration needs at least one batch of inputs")
        self._feeds = [dict(f) for f in feeds]
        self._it: Iterator[dict[str, np.ndarray[Any, Any]]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def model_input_names(model_path: str | Path) -> list[str]:
    """Names of a model's graph inputs (initializers excluded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def text_feeds(
    tokenizer: Any, sentences: Sequence[str], input_names: Sequence[str], *, batch_size: int = 16,
    same_length: bool = False,
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """Tokenised batches of ``sentences`` as ONNX feeds for an encoder whose inputs are among
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` (zeros).

    ``same_length`` pads every batch to the longest sentence of all (masked padding, so the
    embeddings do not change): ORT's histogram calibrators (percentile, entropy) stack the
    activations of all batches and need equal shapes.
    """
    from headrace.models.tokenizer import encode_batch

    known = {"input_ids", "attention_mask", "token_type_ids"}
    if not set(input_names) <= known:
        raise ConfigError(f"text feeds cover inputs {sorted(known)}, the model wants {list(input_names)}")
    encoded = [encode_batch(tokenizer, sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)]
    width = max((ids.shape[1] for ids, _ in encoded), default=0)
    feeds: list[dict[str, np.ndarray[Any, Any]]] = []
    for ids, mask in encoded:
        if same_length and ids.shape[1] < width:
            pad = ((0, 0), (0, width - ids.shape[1]))
            ids, mask = np.pad(ids, pad), np.pad(mask, pad)  # [PAD] id and mask are both 0
        all_inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds.append({n: all_inputs[n] for n in input_names})
    return feeds


def quantize_static_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Sequence[Feeds],
    *,
    per_channel: bool = True,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = STATIC_OPS,
    method: str = "minmax",
    cache_path: str | Path | None = None,
    symmetric_activations: bool = False,
    reduce_range: bool | None = None,
) -> Path:
    """INT8 static quantization in QDQ format, activations calibrated on ``calibration``.

    Args:
        calibration: input feeds (batches) of real data, e.g. :func:`text_feeds` of corpus
            training sentences.
        per_channel: per-output-channel weight scales.
        op_types: op types to quantize. MatMul/Gemm only by default: quantizing residual Adds
            and LayerNorm inputs of a transformer costs far more fidelity than it saves.
        method: ``minmax``, ``percentile`` (99.999th, clips rare outliers) or ``entropy``.
        cache_path: JSON calibration cache; reused if it exists (the graph and calibration
            data must be the same as when it was written), written otherwise.
        symmetric_activations: int8 symmetric activations (what TensorRT expects) instead
            of asymmetric uint8 (what x86 CPU kernels are fastest with).
        reduce_range: 7-bit weights; None: as :func:`cpu_needs_reduce_range` says for this
            host (see :func:`quantize_dynamic_int8`).

    Returns ``dst``. Raises ConfigError for a bad method, ModelError if quantization fails.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method {method!r}: choose one of {list(CALIBRATION_METHODS)}")
    src, dst = _check_paths(Path(src), Path(dst))
    q = _ort_quant()
    cal_method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                  "entropy": q.CalibrationMethod.Entropy}[method]
    reader = FeedsCalibrationReader(calibration)
    act_type = q.QuantType.QInt8 if symmetric_activations else q.QuantType.QUInt8
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                             **_untyped_is_float()}
    with tempfile.TemporaryDirectory(prefix="headrace-quant-") as tmp, _in_dir(Path(tmp)):
        pre = _preprocess(src, Path(tmp))
        try:
            q.quantize_static(
                pre, dst, reader, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                per_channel=per_channel, activation_type=act_type, weight_type=q.QuantType.QInt8,
                reduce_range=resolve_reduce_range(reduce_range),
                nodes_to_quantize=list(nodes_to_quantize or []), nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=cal_method, extra_options=extra,
                calibration_cache_path=str(cache_path) if cache_path is not None else None,
            )
        except Exception as e:  # the quantizer raises bare Exceptions/ValueErrors for odd graphs
            raise ModelError(f"static INT8 quantization of {src} failed: {e}") from e
    log.info("quantized %s -> %s (static QDQ int8, %s calibration over %d batches, %d nodes kept fp32)",
             src.name, dst, method, len(reader), len(nodes_to_exclude))
    return dst


# --- fp16 ----------------------------------------------------------------------------------


def convert_fp16(src: str | Path, dst: str | Path, *, keep_io_types: bool = True,
                 op_block_list: Iterable[str] | None = None) -> Path:
    """Convert weights and compute to fp16 for GPU targets (CUDA EP, TensorRT).

    Graph inputs/outputs stay fp32 when ``keep_io_types`` (casts are inserted at the edges),
    so callers and the wire signature do not change. Ops that are numerically fragile in
    fp16 stay fp32 through ORT's default block list (plus ``op_block_list``), and so do
    the nodes next to ``ai.onnx.ml`` ops (:func:`~.graph.ml_adjacent_nodes`), which keep float32. Uses
    ORT's transformer-aware converter (symbolic shape inference handles fused contrib ops).

    Raises:
        ModelError: the model cannot be read or converted.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    src, dst = _check_paths(Path(src), Path(dst))
    onnx = require("onnx", "compress", purpose="fp16 conversion")
    require("onnxruntime", WORKER, purpose="fp16 conversion")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel
    try:
        # In a scratch folder: the converter's symbolic shape inference drops
        # sym_shape_infer_temp.onnx into the working directory when it gives up.
        with tempfile.TemporaryDirectory(prefix="headrace-fp16-") as tmp, _in_dir(Path(tmp)):
            loaded = onnx.load(str(src))
            model = OnnxModel(loaded)
            blocks = list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list or [])
            model.convert_float_to_float16(keep_io_types=keep_io_types, op_block_list=blocks,
                                           node_block_list=ml_adjacent_nodes(loaded))
            model.save_model_to_file(str(dst))
    except Exception as e:  # the converter raises plain Exceptions for graphs it cannot type
        raise ModelError(f"fp16 conversion of {src} failed: {e}") from e
    log.info("converted %s -> %s (fp16, io fp32=%s)", src.name, dst, keep_io_types)
    return dst
