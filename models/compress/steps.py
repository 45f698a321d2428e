"""The compression steps for any model, as a registry: ``STEPS[name](ctx) -> candidates``.

Each step reads the fp32 source graph (or the torch module) and the calibration samples
from a :class:`StepContext` and returns :class:`Candidate` artifacts; the run
(:mod:`.anymodel`) measures, gates and publishes them. A new step is one decorated function.
Mixed-precision searches score on calibration samples only (``ctx.scan_score``); held-out
samples never reach a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress.data import Feed, Samples
from headrace.models.compress.structured import PruneOptions

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeOptions:
    """INT8 settings.

    Attributes:
        per_channel: one weight scale per output channel.
        method: static calibration method (``minmax``, ``entropy``, ``percentile``).
        op_types: op types to quantize; empty = chosen from the graph.
        mixed: keep the most sensitive nodes in fp32 until the fidelity floor holds on
            calibration samples (False: quantize everything chosen).
        batch_size: calibration batch size.
        weight_bits: ``auto`` (7 on an x86 CPU without VNNI, where 8-bit weights saturate
            ONNX Runtime's integer kernels; else 8), ``8`` or ``7`` (ORT's ``reduce_range``).
    """

    per_channel: bool = True
    method: str = "minmax"
    op_types: tuple[str, ...] = ()
    mixed: bool = True
    batch_size: int = 16
    weight_bits: str = "auto"

    @property
    def reduce_range(self) -> bool | None:
        """ORT's ``reduce_range`` for :attr:`weight_bits` (None: the quantizer decides)."""
        return None if self.weight_bits == "auto" else self.weight_bits == "7"

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration method {self.method!r}: choose one of {list(CALIBRATION_METHODS)}")
        if self.batch_size < 1:
            raise ConfigError("calibration batch_size must be >= 1")
        if self.weight_bits not in ("auto", "8", "7"):
            raise ConfigError(f"weight_bits {self.weight_bits!r}: choose auto, 8 or 7")

    def to_dict(self) -> dict[str, Any]:
        from headrace.models.compress.quantize import resolve_reduce_range

        # what was used, not just what was asked: "auto" resolved on this host
        return {**asdict(self), "weight_bits": "7" if resolve_reduce_range(self.reduce_range) else "8"}


@dataclass(frozen=True)
class TfliteOptions:
    """TFLite export: ``integer`` (INT8 weights and activations, calibrated; float I/O) or
    ``dynamic`` (INT8 weights, activations quantized per call); empty: ``dynamic`` for a text
    model (onnx2tf cannot calibrate token ids), else ``integer``. ``seq_length``: the token
    length a text model's graph is frozen to (0 = the tokenizer's truncation length)."""

    quant: str = ""
    seq_length: int = 0

    def __post_init__(self) -> None:
        if self.quant not in ("", "integer", "dynamic"):
            raise ConfigError(f"tflite quant {self.quant!r}: integer or dynamic")
        if self.seq_length < 0:
            raise ConfigError(f"tflite seq_length {self.seq_length}: 0 (the tokenizer's length) or a positive count")


@dataclass
class Candidate:
    """An artifact a step made (not yet in the repository).

    Attributes:
        label: row name in the report.
        path: the file.
        fmt: repository format (``onnx``, ``tflite``).
        precision: ``int8``, ``int8_mixed``, ``fp16``, ``fp32``...
        recipe: the steps that made it (``{"step", "params"}``), appended to the source's.
        note: one line for the table.
        params: parameter count (0 = same as the source).
        bench_speed: False for artifacts whose CPU speed means nothing (fp16).
        extra: manifest ``extra`` additions (e.g. TFLite tensor names).
    """

    label: str
    path: Path
    fmt: str
    precision: str
    recipe: list[dict[str, Any]]
    note: str = ""
    params: int = 0
    bench_speed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step may use.

    Attributes:
        onnx_path: the fp32 source graph.
        module: the source torch module, or None (ONNX sources).
        calibration: calibration samples; ``encode`` tokenises text samples.
        scan_score: model file -> fidelity score on calibration samples (the mixed-precision search).
        floor: the score an artifact must reach (``--min-fidelity``).
        kind: the primary output's kind (drives the recovery loss).
        work: scratch folder.
        tokenizer: the text model's ``tokenizers.Tokenizer`` (None for tensor models).
        details: per-step facts for the report.
    """

    onnx_path: Path
    module: Any
    calibration: Samples
    encode: Callable[[Sequence[str]], Feed] | None
    scan_score: Callable[[Path], float]
    floor: float
    kind: str
    work: Path
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)
    tflite: TfliteOptions = field(default_factory=TfliteOptions)
    seed: int = 0
    progress: bool = True
    threads: int = 2
    tokenizer: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def feeds(self, batch_size: int | None = None, *, same_length: bool = False) -> list[Feed]:
        """Calibration batches (text padded to one length when ``same_length``: ORT's histogram
        calibrators stack every batch)."""
        feeds = self.calibration.feeds(batch_size or self.quantize.batch_size, self.encode)
        if same_length and self.encode is not None:
            feeds = _pad_text(feeds)
        if same_length and len(feeds) > 1 and _rows(feeds[-1]) != _rows(feeds[0]):
            feeds = feeds[:-1]  # a short last batch would not stack with the others either
        return feeds


def _rows(feed: Feed) -> tuple[int, ...]:
    return tuple(v.shape[0] if v.ndim else 0 for v in feed.values())


def _pad_text(feeds: list[Feed]) -> list[Feed]:
    import numpy as np

    width = max(f[next(iter(f))].shape[1] for f in feeds)
    return [{k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in f.items()} for f in feeds]


StepFn = Callable[[StepContext], list[Candidate]]
STEPS: dict[str, StepFn] = {}


def step(name: str) -> Callable[[StepFn], StepFn]:
    """Register a step under ``name`` (the ``--steps`` word)."""
    def deco(fn: StepFn) -> StepFn:
        STEPS[name] = fn
        return fn
    return deco


def parse_steps(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"quantize-static,prune"`` -> validated names, in the given order.

    Raises:
        ConfigError: an unknown or missing step.
    """
    _register_more()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [s for s in items if s not in STEPS]
    if unknown or not items:
        raise ConfigError(f"unknown compress steps {unknown or '(none given)'}; choose from {sorted(STEPS)}")
    return tuple(items)


# --- quantization -------------------------------------------------------------------------------


def _mixed(ctx: StepContext, src: Path, dst: Path, mode: str) -> tuple[Any, tuple[str, ...]]:
    from headrace.models.compress import quantize as Q

    ops = ctx.quantize.op_types or Q.choose_op_types(src, mode)
    cache = ctx.work / f"calibration-{src.stem}-{ctx.quantize.method}.json"
    if mode == "dynamic":
        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_dynamic_int8(s, d, per_channel=ctx.quantize.per_channel, nodes_to_quantize=nq,
                                    nodes_to_exclude=ne, op_types=ops, reduce_range=ctx.quantize.reduce_range)
    else:
        cal = ctx.feeds(same_length=ctx.quantize.method != "minmax")

        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_static_int8(s, d, cal, per_channel=ctx.quantize.per_channel, nodes_to_quantize=nq,
                                   nodes_to_exclude=ne, op_types=ops, method=ctx.quantize.method, cache_path=cache,
                                   reduce_range=ctx.quantize.reduce_range)
    if not ctx.quantize.mixed:
        qfn(src, dst, None, ())
        return Q.MixedPrecisionResult(dst, (), float("nan"), ctx.floor, True), ops
    nodes = Q.weight_nodes(src, [o for o in ops if o in (*Q.STATIC_WEIGHT_OPS, "Attention", "LSTM", "GRU", "Gather")])
    mp = Q.mixed_precision(src, dst, qfn, ctx.scan_score, ctx.floor, nodes=nodes, progress=ctx.progress)
    return mp, ops


QUANTIZED_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
                 "DynamicQuantizeLSTM", "QAttention", "QLinearConv", "QLinearMatMul", "QGemm")


def _check_quantized(path: Path, mode: str) -> None:
    """Raises ModelError when the quantizer left the graph without a single INT8 op (e.g. every
    weight sits inside an If/Loop body, which static QDQ quantization does not enter)."""
    from headrace.models.compress.quantize import graph_op_types

    ops = graph_op_types(path)
    if not any(ops.get(op) for op in QUANTIZED_OPS):
        where = " (the weights sit inside If/Loop bodies, which it does not enter)" if ops.get("If") or ops.get(
            "Loop") else ""
        raise ModelError(f"{mode} quantization changed nothing: no INT8 op in the result{where}")


def _quant_candidate(ctx: StepContext, src: Path, mode: str, label: str, recipe: list[dict[str, Any]]) -> Candidate:
    mp, ops = _mixed(ctx, src, ctx.work / f"{src.stem}-int8-{mode}.onnx", mode)
    _check_quantized(mp.path, mode)
    params = {**ctx.quantize.to_dict(), "mode": mode, "op_types": list(ops), "fp32_nodes": list(mp.excluded),
              "calibration_score": mp.score if mp.score == mp.score else None, "floor": ctx.floor}
    if mode == "static":
        params.update(format="QDQ", calibration_samples=ctx.calibration.n)
    ctx.details[label] = {**params, "search": mp.to_dict()}
    note = f"{len(mp.excluded)} node(s) fp32" if mp.excluded else ""
    return Candidate(label, mp.path, "onnx", "int8_mixed" if mp.excluded else "int8",
                     [*recipe, {"step": f"quantize-{mode}", "params": params}], note)


@step("quantize-dynamic")
def quantize_dynamic(ctx: StepContext) -> list[Candidate]:
    """INT8 weights, activations quantized per batch; no calibration data needed."""
    return [_quant_candidate(ctx, ctx.onnx_path, "dynamic", "int8 dynamic", [])]


@step("quantize-static")
def quantize_static(ctx: StepContext) -> list[Candidate]:
    """QDQ INT8, activation ranges calibrated on the user's samples."""
    return [_quant_candidate(ctx, ctx.onnx_path, "static", "int8 static", [])]


@step("fp16")
def fp16(ctx: StepContext) -> list[Candidate]:
    """fp16 weights and compute for GPU execution providers, fp32 graph inputs/outputs."""
    from headrace.models.compress.graph import float16_tensors
    from headrace.models.compress.quantize import convert_fp16

    path = convert_fp16(ctx.onnx_path, ctx.work / "fp16.onnx")
    _check_graph(path, "fp16 conversion")
    if not float16_tensors(path):
        # e.g. tree ensembles and linear classifiers (ai.onnx.ml ops keep float32/double)
        raise ModelError("fp16 conversion changed nothing: the graph holds no float weights it could convert "
                         "(its ops keep their own types); an fp16 entry would be the fp32 model under another name")
    return [Candidate("fp16", path, "onnx", "fp16", [{"step": "fp16", "params": {"keep_io_types": True}}],
                      "GPU target: CPU run checks fidelity only", bench_speed=False)]


def _check_graph(path: Path, what: str) -> None:
    """Raises ModelError when ``path`` fails ONNX's full check (strict type and shape inference):
    a converter's invalid graph is said to be invalid, not "cannot run here" as if another
    machine could run it."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{what} produced an invalid graph, not offered: {first[:300]}") from e


# --- structure ------------------------------------------------------------------------------------


@step("prune")
def prune(ctx: StepContext) -> list[Candidate]:
    """Channel pruning (torch-pruning) + recovery distillation, then static INT8 of the result.

    Raises:
        ConfigError: the source is not a torch model.
    """
    from headrace.models.compress.export import export_onnx
    from headrace.models.compress.structured import prune_and_recover

    if ctx.module is None:
        raise ConfigError("prune needs the torch model (a format: torch entry); an ONNX graph has no "
                          "trainable structure here")
    feeds = ctx.feeds(ctx.prune.batch_size)
    student, res = prune_and_recover(ctx.module, feeds, ctx.kind, ctx.prune, seed=ctx.seed, progress=ctx.progress)
    ctx.details["prune"] = res.to_dict()
    path = ctx.work / "pruned.onnx"
    first = feeds[0]
    axes = {k: {0: "batch"} for k in first}
    export_onnx(student, first, path, output_names=_outputs(ctx.onnx_path), atol=1e-3,
                dynamic_axes={**axes, **{o: {0: "batch"} for o in _outputs(ctx.onnx_path)}})
    recipe = [{"step": "prune", "params": res.to_dict()}]
    note = f"channels {res.channels_before} -> {res.channels_after}"
    pruned = Candidate("pruned fp32", path, "onnx", "fp32", recipe, note, params=res.params_after)
    q = _quant_candidate(ctx, path, "static", "pruned int8 static", recipe)
    q.params, q.note = res.params_after, f"{note}; {q.note}".rstrip("; ")
    return [pruned, q]


def _outputs(path: Path) -> list[str]:
    from headrace.models.compress.source import graph_signature

    return list(graph_signature(path)[1])


def _register_more() -> None:
    """Steps that live in their own modules register on import."""
    import headrace.models.compress.bert  # noqa: F401
    import headrace.models.compress.tflite_step  # noqa: F401


def run_step(name: str, ctx: StepContext) -> list[Candidate]:
    """Run one registered step.

    Raises:
        ConfigError: unknown step or unusable options. ModelError: the step failed.
    """
    _register_more()
    if name not in STEPS:
        raise ConfigError(f"unknown compress step {name!r}; choose from {sorted(STEPS)}")
    try:
        return STEPS[name](ctx)
    except (ConfigError, ModelError):
        raise
    except Exception as e:  # noqa: BLE001 - third-party converters raise anything; name the step
        raise ModelError(f"compress step {name!r} failed: {e}") from e
