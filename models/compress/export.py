"""torch -> ONNX export with dynamic axes, optional onnxruntime transformer fusions, and a
numerical check of the exported graph against the torch module.

Exporter choice (torch 2.13): we use the legacy TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17). Measured on MiniLM: both exporters
produce correct graphs with dynamic batch/sequence axes, but onnxruntime's BERT optimizer
fuses 6 Attention + 12 SkipLayerNormalization + 6 BiasGelu nodes in the TorchScript graph
and no Attention / SkipLayerNormalization at all in the dynamo graph (opset 20, different
Reshape/Gelu shapes), so the TorchScript path is the one that gives the fast CPU/GPU kernels.

Everything here is generic over the module: MiniLM, pruned/distilled students and the
digits MLP all go through :func:`export_onnx`; :func:`export_minilm` fills in MiniLM's
names and axes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headrace.client.errors import ModelError
from headrace.client.optional import WORKER, require

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORTER = "torchscript"
# Largest acceptable |onnx - torch| for fp32 exports; a fused graph reorders float sums, so
# exact equality is not expected, but anything near 1e-3 on unit vectors is a broken graph.
DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class OptimizeOptions:
    """onnxruntime.transformers fusions to apply after export.

    Attributes:
        model_type: optimizer model type (``bert`` for MiniLM and its students).
        num_heads / hidden_size: attention geometry hints; 0 = detect from the graph (needed
            for pruned models whose layers have different head counts).
        opt_level: onnxruntime graph optimisation level baked into the file; 0 keeps only
            the Python fusions so the file stays portable across execution providers.
        use_gpu: let the optimizer pick GPU-only fusions (only for GPU-bound files).
    """

    model_type: str = "bert"
    num_heads: int = 0
    hidden_size: int = 0
    opt_level: int = 0
    use_gpu: bool = False


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how close it is to the torch module.

    Attributes:
        path: the final ``.onnx`` file.
        exporter / opset: how it was exported.
        optimized: whether onnxruntime fusions were applied.
        fused_ops: fused operator counts (e.g. ``{"Attention": 6, ...}``), empty if not optimized.
        max_abs_diff: largest |onnx - torch| over every output and check batch.
        min_cosine: smallest per-row cosine similarity of 2-D float outputs (1.0 if none).
        size_bytes: file size.
        export_s / optimize_s: wall time of the two steps, seconds.
    """

    path: str
    exporter: str
    opset: int
    optimized: bool
    fused_ops: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    min_cosine: float = 1.0
    size_bytes: int = 0
    export_s: float = 0.0
    optimize_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_dynamic_axes(input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output is the batch axis."""
    return {n: {0: "batch"} for n in (*input_names, *output_names)}


def _as_tensor_tuple(inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in inputs.values())


def _eval_mode(module: torch.nn.Module) -> bool:
    """``module.eval()``; False for a module without a train/eval mode.

    A ``torch.export`` program's module (``ExportedProgram.module()``) has none: its graph was
    fixed in the mode it was exported in, and its ``eval()`` / ``train()`` raise
    ``NotImplementedError``. Only its ``training`` flags are cleared then (what ``eval()``
    sets), so that the exporter, which reads them, exports it as an inference graph.
    """
    try:
        module.eval()
    except NotImplementedError:
        for m in module.modules():
            m.training = False
        return False
    return True


def compare_outputs(onnx_path: str | Path, module: torch.nn.Module,
                    batches: Sequence[Mapping[str, np.ndarray[Any, Any]]]) -> tuple[float, float]:
    """Run ``batches`` through the ONNX file (CPU) and the torch module.

    Every batch maps input names (in the module's positional order) to arrays.

    Returns:
        (max abs difference over all outputs, min row cosine of 2-D float outputs).

    Raises:
        ModelError: the ONNX file cannot be loaded or run.
    """
    ort = require("onnxruntime", WORKER, purpose="export verification")

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"onnxruntime cannot load {onnx_path}: {e}") from e
    max_abs, min_cos = 0.0, 1.0
    _eval_mode(module)
    for batch in batches:
        try:
            got = sess.run(None, {k: np.asarray(v) for k, v in batch.items()})
        except Exception as e:  # noqa: BLE001 - any runtime failure means the export is unusable
            raise ModelError(f"onnxruntime failed to run {onnx_path}: {e}") from e
        with torch.inference_mode():
            ref = module(*_as_tensor_tuple(batch))
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        for g, r in zip(got, refs, strict=True):
            rn = r.detach().float().cpu().numpy()
            gn = np.asarray(g, dtype=np.float32)
            if gn.shape != rn.shape:
                raise ModelError(f"ONNX output shape {gn.shape} != torch output shape {rn.shape}")
            if gn.size:
                max_abs = max(max_abs, float(np.max(np.abs(gn - rn))))
            if gn.ndim == 2 and gn.size:
                num = (gn * rn).sum(axis=1)
                den = np.linalg.norm(gn, axis=1) * np.linalg.norm(rn, axis=1)
                min_cos = min(min_cos, float(np.min(num / np.maximum(den, 1e-12))))
    return max_abs, min_cos


def optimize_onnx(src: str | Path, dst: str | Path, options: OptimizeOptions) -> dict[str, int]:
    """Apply onnxruntime.transformers fusions (Attention, SkipLayerNorm, BiasGelu...) to ``src``
    and write ``dst``.

    Returns:
        Fused operator counts (only those > 0).

    Raises:
        ModelError: the optimizer failed.
    """
    optimize_model = require("onnxruntime.transformers.optimizer", WORKER, purpose="graph fusion").optimize_model

    try:
        opt = optimize_model(str(src), model_type=options.model_type, num_heads=options.num_heads,
                             hidden_size=options.hidden_size, opt_level=options.opt_level,
                             use_gpu=options.use_gpu)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(dst))
    except Exception as e:  # noqa: BLE001 - the optimizer raises assorted internal errors
        raise ModelError(f"onnxruntime transformer optimizer failed on {src}: {e}") from e
    return stats


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor | np.ndarray[Any, Any]],
    path: str | Path,
    *,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    optimize: OptimizeOptions | None = None,
    check_inputs: Sequence[Mapping[str, np.ndarray[Any, Any]]] | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export ``module`` to ONNX at ``path`` and check it against torch.

    Args:
        module: called as ``module(*example_inputs.values())``; put in eval mode here.
        example_inputs: ordered input name -> example tensor (names become graph inputs).
        path: destination ``.onnx`` file (parent folders are created).
        output_names: graph output names, in the module's return order.
        dynamic_axes: ``{name: {axis: axis_name}}``; default: axis 0 of everything is ``batch``.
        opset: ONNX opset of the TorchScript exporter.
        optimize: apply onnxruntime.transformers fusions; None = plain export.
        check_inputs: batches to compare on (default: the example inputs). Use shapes different
            from the example to prove the axes really are dynamic.
        atol: largest accepted |onnx - torch|.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ModelError: export or optimisation failed, or outputs differ by more than ``atol``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    input_names = list(example_inputs)
    axes = {k: dict(v) for k, v in (dynamic_axes or default_dynamic_axes(input_names, output_names)).items()}
    _eval_mode(module)
    batches = list(check_inputs) if check_inputs else [
        {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in example_inputs.items()}]
    # Export to a temp file in the same folder and rename, so a crash never leaves a
    # half-written model where a repository entry or cache expects a complete one.
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        times, fused = _export_checked(module, example_inputs, tmp, input_names, output_names, axes, opset, optimize)
        max_abs, min_cos = compare_outputs(tmp, module, batches)
        if not max_abs <= atol:  # written this way so NaN fails too
            raise ModelError(f"exported graph differs from torch by {max_abs:.3g} (> atol {atol:g}); "
                             f"min cosine {min_cos:.6f}; refusing to keep {out.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = ExportReport(path=str(out), exporter=EXPORTER, opset=opset, optimized=optimize is not None,
                          fused_ops=fused, max_abs_diff=max_abs, min_cosine=min_cos,
                          size_bytes=out.stat().st_size, export_s=times[0], optimize_s=times[1])
    log.info("exported %s to %s (%d bytes, max|diff| %.2e, fused %s)", type(module).__name__, out,
             report.size_bytes, max_abs, fused or "-")
    return report


def _export_checked(module: torch.nn.Module, example_inputs: Mapping[str, Any], tmp: Path, input_names: list[str],
                    output_names: Sequence[str], axes: dict[str, dict[int, str]], opset: int,
                    optimize: OptimizeOptions | None) -> tuple[tuple[float, float], dict[str, int]]:
    """TorchScript export to ``tmp`` (+ fusions); ((export s, optimize s), fused op counts).

    Raises:
        ModelError: the exporter or the optimizer failed.
    """
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # EVAL makes the exporter call module.train(False), which a torch.export program's
            # module refuses: that one is exported as it is (PRESERVE), its flags cleared above.
            mode = torch.onnx.TrainingMode.EVAL if _eval_mode(module) else torch.onnx.TrainingMode.PRESERVE
            torch.onnx.export(module, _as_tensor_tuple(example_inputs), str(tmp), input_names=input_names,
                              output_names=list(output_names), dynamic_axes=axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True, training=mode)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many error types
        raise ModelError(f"ONNX export of {type(module).__name__} failed: {e}") from e
    export_s = time.perf_counter() - t0
    if optimize is None:
        return (export_s, 0.0), {}
    t1 = time.perf_counter()
    fused = optimize_onnx(tmp, tmp, optimize)
    return (export_s, time.perf_counter() - t1), fused


# --- MiniLM -------------------------------------------------------------------------------

MINILM_INPUTS = ("input_ids", "attention_mask")
MINILM_OUTPUTS = ("embeddings",)
MINILM_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "embeddings": {0: "batch"},
}
CHECK_SENTENCES = (
    "The cat sat on the mat.",
    "ONNX Runtime fuses attention into a single kernel when it recognises the pattern.",
    "Short",
    "Redis Streams keep every entry until it is acknowledged by a consumer group, "
    "which is how headrace promises that nothing is lost when a worker dies mid-batch.",
)


def minilm_example_inputs(tokenizer: Any = None, texts: Sequence[str] = CHECK_SENTENCES) -> dict[str, np.ndarray[Any, Any]]:
    """Tokenised ``texts`` as ``{"input_ids", "attention_mask"}`` int64 arrays."""
    from headrace.models.tokenizer import encode_batch, load_tokenizer

    ids, mask = encode_batch(tokenizer or load_tokenizer(), texts)
    return {"input_ids": ids, "attention_mask": mask}


def export_minilm(model: torch.nn.Module, path: str | Path, *, optimize: bool = True,
                  tokenizer: Any = None, atol: float = DEFAULT_ATOL) -> ExportReport:
    """Export a MiniLM-shaped sentence encoder (``forward(input_ids, attention_mask) -> [B, D]``,
    pooling + normalisation inside) with dynamic batch and sequence axes.

    With ``optimize`` the BERT fusions are applied; head counts are detected from the graph
    so pruned models work too. Checked on two batches of different shapes.

    Raises:
        ModelError: export failed or the graph does not match torch within ``atol``.
    """
    example = minilm_example_inputs(tokenizer, CHECK_SENTENCES[:2])
    checks = [minilm_example_inputs(tokenizer, CHECK_SENTENCES), minilm_example_inputs(tokenizer, CHECK_SENTENCES[2:3])]
    cfg = getattr(model, "config", None)
    heads = set(getattr(cfg, "num_heads", ()) or ())
    opts = None
    if optimize:
        # The optimizer's hidden_size is the attention width (heads * head_dim); with
        # per-layer head counts (pruned) both are left to detection from the graph.
        n_heads = next(iter(heads)) if len(heads) == 1 else 0
        opts = OptimizeOptions(model_type="bert", num_heads=n_heads,
                               hidden_size=n_heads * int(getattr(cfg, "head_dim", 0)))
    return export_onnx(model, example, path, output_names=MINILM_OUTPUTS, dynamic_axes=MINILM_AXES,
                       optimize=opts, check_inputs=checks, atol=atol)
