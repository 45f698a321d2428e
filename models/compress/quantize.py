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

import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray[Any, Any]]
# (src, dst, nodes_to_quantize or None for all, nodes_to_exclude) -> None
QuantizeFn = Callable[[Path, Path, Sequence[str] | None, Sequence[str]], None]
# model path -> score, higher is better (mean cosine, accuracy)
ScoreFn = Callable[[Path], float]

# Op types whose constant weight input makes them worth quantizing. Attention is the fused
# com.microsoft op the transformer optimizer produces (q/k/v packed into one weight).
WEIGHT_OPS = ("MatMul", "Gemm", "Attention")
# Dynamic quantization also stores embedding tables (Gather) as int8: MiniLM's word table is
# 47 of its 90 MB; measured on 512 held-out sentences it moves mean cosine by 0.0003.
DYNAMIC_OPS = (*WEIGHT_OPS, "Gather")
STATIC_OPS = ("MatMul", "Gemm")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _ort_quant() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise ModelError("onnxruntime is not installed; pip install 'headrace[worker]'") from e
    return quantization


def _check_paths(src: Path, dst: Path) -> tuple[Path, Path]:
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelError(f"no ONNX model at {src}")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"quantization output {dst} must differ from its input")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return src, dst


def constants_to_initializers(src: str | Path, dst: str | Path) -> int:
    """Rewrite ``Constant`` nodes holding a tensor as initializers, in the graph and its
    subgraphs (If/Loop bodies), and write ``dst``. Exporters such as TorchScript-to-ONNX of
    scripted modules emit weights as Constant nodes; ORT's quantizers only see initializers.

    Returns the number of constants moved.
    """
    model = _load(src)
    moved = 0

    def visit(graph: Any) -> None:
        nonlocal moved
        keep = []
        for node in graph.node:
            value = [a for a in node.attribute if a.name == "value" and a.HasField("t")]
            if node.op_type == "Constant" and value and len(node.output) == 1:
                t = value[0].t
                t.name = node.output[0]
                graph.initializer.append(t)
                moved += 1
                continue
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                    visit(sub)
            keep.append(node)
        del graph.node[:]
        graph.node.extend(keep)

    visit(model.graph)
    import onnx

    onnx.save(model, str(dst))
    return moved


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

        quant_pre_process(str(staged), str(out), skip_optimization=True, skip_symbolic_shape=False)
        return out
    except Exception as e:  # noqa: BLE001 - symbolic shape inference gives up on some graphs; only a help
        log.warning("quantization pre-processing of %s failed (%s); quantizing without it", src, e)
        return staged


# --- node discovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class WeightNode:
    """A node with a constant weight input that quantization would turn into INT8."""

    name: str
    op_type: str
    weight: str
    params: int


def _walk(graph: Any, inits: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies), with the initializers
    visible to it (a subgraph sees its own and its parents')."""
    scope = {**inits, **{i.name: i for i in graph.initializer}}
    for node in graph.node:
        yield node, scope
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                yield from _walk(sub, scope)


def _load(model_path: str | Path) -> Any:
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / OSError variants
        raise ModelError(f"cannot read ONNX model {model_path}: {e}") from e


def weight_nodes(model_path: str | Path, op_types: Sequence[str] = WEIGHT_OPS) -> list[WeightNode]:
    """Nodes of ``op_types`` whose weight input (B of MatMul/Gemm, W of Conv, the packed
    weight of Attention, the table of Gather) is an initializer, in graph order, subgraphs
    (If/Loop bodies) included.

    Raises:
        ModelError: the file is not a readable ONNX model, or a node has no name (the
            quantizer addresses nodes by name).
    """
    model = _load(model_path)
    out: list[WeightNode] = []
    consts = {n.output[0]: a.t for n, _ in _walk(model.graph, {}) if n.op_type == "Constant"
              for a in n.attribute if a.name == "value" and a.HasField("t")}
    for node, scope in _walk(model.graph, {}):
        inits = {**consts, **scope}
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        w = node.input[0] if node.op_type == "Gather" else node.input[1]
        if w not in inits:
            continue
        if not node.name:
            raise ModelError(f"{model_path}: a {node.op_type} node has no name; re-export with named nodes")
        out.append(WeightNode(node.name, node.op_type, w, int(np.prod(inits[w].dims))))
    return out


def graph_op_types(model_path: str | Path) -> dict[str, int]:
    """Op type -> count over the graph and its subgraphs."""
    counts: dict[str, int] = {}
    for node, _ in _walk(_load(model_path).graph, {}):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# Ops that carry a constant weight; each is worth INT8 storage and kernels.
STATIC_WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# In a convolutional graph these sit between quantized convolutions: quantizing them keeps the
# activations in INT8 across residual Adds and pools instead of a DQ -> fp32 -> Q round trip
# around each. In a transformer they are left fp32 (residual Adds and LayerNorm inputs of a
# transformer cost far more fidelity than they save).
STATIC_CNN_OPS = ("Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Relu", "Clip", "Resize")
DYNAMIC_CANDIDATES = ("MatMul", "Gemm", "Attention", "Conv", "LSTM", "GRU", "Gather")


def choose_op_types(model_path: str | Path, mode: str) -> tuple[str, ...]:
    """The op types to quantize, chosen from what the graph holds.

    ``dynamic``: every weight-bearing op ORT's dynamic quantizer handles (MatMul, Gemm,
    Attention, Conv, LSTM, GRU) plus embedding tables (Gather of a 2-D initializer).
    ``static``: Conv/ConvTranspose/MatMul/Gemm, and for convolutional graphs the ops between
    them (:data:`STATIC_CNN_OPS`).

    Raises:
        ConfigError: an unknown mode. ModelError: an unreadable graph, or nothing to quantize.
    """
    if mode not in ("dynamic", "static"):
        raise ConfigError(f"quantization mode {mode!r}: dynamic or static")
    present = graph_op_types(model_path)
    if mode == "dynamic":
        chosen = [op for op in DYNAMIC_CANDIDATES if op in present and op != "Gather"]
        if "Gemm" in chosen and "MatMul" not in chosen:
            chosen.insert(0, "MatMul")  # the dynamic quantizer rewrites each Gemm as MatMul + Add first
        tables = [n for n in weight_nodes(model_path, ("Gather",)) if n.params >= 1024]
        chosen += ["Gather"] if tables else []
    else:
        chosen = [op for op in STATIC_WEIGHT_OPS if op in present]
        if "Conv" in present:
            chosen += [op for op in STATIC_CNN_OPS if op in present]
    if not any(op in present for op in (*STATIC_WEIGHT_OPS, "Attention", "LSTM", "GRU")):
        raise ModelError(f"{Path(model_path).name} has no weight-bearing op to quantize "
                         f"(ops: {sorted(present)})")
    return tuple(chosen)


# --- dynamic and static INT8 -------------------------------------------------------------


def quantize_dynamic_int8(
    src: str | Path,
    dst: str | Path,
    *,
    per_channel: bool = True,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = DYNAMIC_OPS,
    reduce_range: bool = False,
) -> Path:
    """INT8 dynamic quantization: int8 weights, uint8 activations quantized per batch.

    Args:
        per_channel: one scale per output channel of each weight (default; per-tensor
            scales cost MiniLM several points of cosine).
        nodes_to_quantize: only these nodes (None = every node of ``op_types``).
        op_types: op types to quantize; embedding ``Gather`` tables included by default.
        nodes_to_exclude: keep these nodes in fp32 (mixed precision).
        reduce_range: 7-bit weights, for CPUs without VNNI where 8-bit products saturate.

    Returns ``dst``. Raises ModelError if the model is missing or quantization fails.
    """
    src, dst = _check_paths(Path(src), Path(dst))
    q = _ort_quant()
    with tempfile.TemporaryDirectory(prefix="headrace-quant-") as tmp:
        pre = _preprocess(src, Path(tmp))
        try:
            q.quantize_dynamic(
                pre, dst, per_channel=per_channel, reduce_range=reduce_range, weight_type=q.QuantType.QInt8,
                op_types_to_quantize=list(op_types), nodes_to_quantize=_with_gemm_aliases(nodes_to_quantize or []),
                nodes_to_exclude=_with_gemm_aliases(nodes_to_exclude),
                # Weights inside If/Loop bodies (e.g. a model with one branch per sample rate)
                # are only reached with subgraph quantization on.
                extra_options={"EnableSubgraph": True},
            )
        except Exception as e:  # the quantizer raises bare Exceptions/ValueErrors for odd graphs
            raise ModelError(f"dynamic INT8 quantization of {src} failed: {e}") from e
    log.info("quantized %s -> %s (dynamic int8, per_channel=%s, %d nodes kept fp32)",
             src.name, dst, per_channel, len(nodes_to_exclude))
    return dst


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
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
    with tempfile.TemporaryDirectory(prefix="headrace-quant-") as tmp:
        pre = _preprocess(src, Path(tmp))
        try:
            q.quantize_static(
                pre, dst, reader, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                per_channel=per_channel, activation_type=act_type, weight_type=q.QuantType.QInt8,
                nodes_to_quantize=list(nodes_to_quantize or []), nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=cal_method, extra_options=extra,
                calibration_cache_path=str(cache_path) if cache_path is not None else None,
            )
        except Exception as e:  # the quantizer raises bare Exceptions/ValueErrors for odd graphs
            raise ModelError(f"static INT8 quantization of {src} failed: {e}") from e
    log.info("quantized %s -> %s (static QDQ int8, %s calibration over %d batches, %d nodes kept fp32)",
             src.name, dst, method, len(reader), len(nodes_to_exclude))
    return dst


# --- mixed precision ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSensitivity:
    """Score of the model with only ``node`` quantized; ``loss`` = baseline - score."""

    node: str
    op_type: str
    score: float
    loss: float


@dataclass(frozen=True)
class MixedPrecisionResult:
    """Outcome of :func:`mixed_precision`.

    Attributes:
        path: the written model.
        excluded: nodes left in fp32, most sensitive first.
        score: the written model's score on the scan data.
        threshold: the budget it had to meet.
        met: whether it met the budget (False only if even the fp32 baseline does not).
        trials: (number of excluded nodes, score) for every candidate tried.
        sensitivities: the scan, most sensitive first.
    """

    path: Path
    excluded: tuple[str, ...]
    score: float
    threshold: float
    met: bool
    trials: tuple[tuple[int, float], ...] = ()
    sensitivities: tuple[NodeSensitivity, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"excluded": list(self.excluded), "score": self.score, "threshold": self.threshold,
                "met": self.met, "trials": [list(t) for t in self.trials],
                "sensitivities": [s.__dict__ for s in self.sensitivities[:10]]}


def sensitivity_scan(
    src: str | Path,
    quantize: QuantizeFn,
    score: ScoreFn,
    nodes: Sequence[WeightNode],
    *,
    baseline: float | None = None,
    progress: bool = True,
) -> list[NodeSensitivity]:
    """Quantize each node alone and score the result; most sensitive (largest loss) first.

    Cost: one quantization and one scoring per node.

    Args:
        quantize: ``(src, dst, nodes_to_quantize, nodes_to_exclude)``, e.g. a partial of
            :func:`quantize_dynamic_int8`.
        score: higher-is-better score of a model file on scan data.
        baseline: the fp32 model's score (computed if not given).
    """
    from tqdm.auto import tqdm

    src = Path(src)
    base = score(src) if baseline is None else baseline
    out: list[NodeSensitivity] = []
    with tempfile.TemporaryDirectory(prefix="headrace-scan-") as tmp:
        dst = Path(tmp) / "one.onnx"
        for node in tqdm(nodes, desc="sensitivity scan", unit="node", disable=not progress):
            quantize(src, dst, [node.name], ())
            s = score(dst)
            out.append(NodeSensitivity(node.name, node.op_type, s, base - s))
    out.sort(key=lambda x: x.loss, reverse=True)
    return out


def mixed_precision(
    src: str | Path,
    dst: str | Path,
    quantize: QuantizeFn,
    score: ScoreFn,
    threshold: float,
    *,
    nodes: Sequence[WeightNode] | None = None,
    sensitivities: Sequence[NodeSensitivity] | None = None,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Quantize ``src`` to ``dst`` leaving in fp32 the fewest most-sensitive nodes for which
    ``score(model) >= threshold``.

    First the fully quantized model is tried; if it meets the budget no scan is run. Otherwise
    the nodes are ranked by :func:`sensitivity_scan` (unless ``sensitivities`` is given) and
    the number kept in fp32 is found by doubling, then bisection (assumes the score grows as
    more nodes stay fp32, which holds closely in practice).

    Raises:
        ModelError: quantization failed.
    """
    src, dst = Path(src), Path(dst)
    candidates = list(nodes) if nodes is not None else weight_nodes(src)
    trials: list[tuple[int, float]] = []

    def attempt(k: int, ranked: Sequence[NodeSensitivity]) -> float:
        quantize(src, dst, None, [s.node for s in ranked[:k]])
        s = score(dst)
        trials.append((k, s))
        log.info("mixed precision: %d node(s) in fp32 -> score %.5f (budget %.5f)", k, s, threshold)
        return s

    first = attempt(0, [])
    if first >= threshold:
        return MixedPrecisionResult(dst, (), first, threshold, True, tuple(trials), tuple(sensitivities or ()))

    ranked = list(sensitivities) if sensitivities is not None else sensitivity_scan(
        src, quantize, score, candidates, progress=progress)
    scores: dict[int, float] = {0: first}
    hi = _fewest_passing(lambda k: attempt(k, ranked), len(ranked), threshold, scores)
    if hi is None:
        n = len(ranked)
        log.warning("mixed precision: even with every candidate node in fp32 the score %.5f misses %.5f",
                    scores[n], threshold)
        return MixedPrecisionResult(dst, tuple(s.node for s in ranked), scores[n], threshold, False,
                                    tuple(trials), tuple(ranked))
    if trials[-1][0] != hi:  # the file on disk must be the chosen one
        attempt(hi, ranked)
    return MixedPrecisionResult(dst, tuple(s.node for s in ranked[:hi]), scores[hi], threshold, True,
                                tuple(trials), tuple(ranked))


def _fewest_passing(attempt: Callable[[int], float], n: int, threshold: float,
                    scores: dict[int, float]) -> int | None:
    """The smallest k in 1..n with ``attempt(k) >= threshold``, by doubling then bisection
    (``scores`` collects every tried k); None if even ``k = n`` fails."""
    lo, hi, k = 0, None, 1  # lo: largest k known to fail; hi: smallest k known to pass
    while k <= n:
        scores[k] = attempt(k)
        if scores[k] >= threshold:
            hi = k
            break
        lo, k = k, k * 2
    if hi is None:
        if n not in scores:
            scores[n] = attempt(n)
        if scores[n] < threshold:
            return None
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        scores[mid] = attempt(mid)
        lo, hi = (lo, mid) if scores[mid] >= threshold else (mid, hi)
    return hi


# --- fp16 ----------------------------------------------------------------------------------


def convert_fp16(src: str | Path, dst: str | Path, *, keep_io_types: bool = True,
                 op_block_list: Iterable[str] | None = None) -> Path:
    """Convert weights and compute to fp16 for GPU targets (CUDA EP, TensorRT).

    Graph inputs/outputs stay fp32 when ``keep_io_types`` (casts are inserted at the edges),
    so callers and the wire signature do not change. Ops that are numerically fragile in
    fp16 stay fp32 through ORT's default block list (plus ``op_block_list``). Uses
    ORT's transformer-aware converter (symbolic shape inference handles fused contrib ops).

    Raises:
        ModelError: the model cannot be read or converted.
    """
    src, dst = _check_paths(Path(src), Path(dst))
    try:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as e:
        raise ModelError("fp16 conversion needs onnx and onnxruntime; pip install 'headrace[worker]'") from e
    try:
        model = OnnxModel(onnx.load(str(src)))
        blocks = list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list or [])
        model.convert_float_to_float16(keep_io_types=keep_io_types, op_block_list=blocks)
        model.save_model_to_file(str(dst))
    except Exception as e:  # the converter raises plain Exceptions for graphs it cannot type
        raise ModelError(f"fp16 conversion of {src} failed: {e}") from e
    log.info("converted %s -> %s (fp16, io fp32=%s)", src.name, dst, keep_io_types)
    return dst
