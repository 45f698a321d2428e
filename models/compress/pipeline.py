"""``headrace compress``: run the compression steps for a model, store every artifact in the
model repository, measure them side by side and report.

Steps (any subset, always run in this order): ``export``, ``quantize-dynamic``,
``quantize-static``, ``prune``, ``distill``, ``fp16``, ``tensorrt``. ``export`` is implied by
every other step. Artifacts are repository entries named ``<model>-<suffix>``:

=====================  ===========================================================
``minilm``             fp32 ONNX, BERT-fused (built by :mod:`headrace.models.builtin.build`)
``minilm-int8``        dynamic INT8, per-channel (+ fp32 MatMuls if the budget needs)
``minilm-int8-static`` static QDQ INT8, calibrated; most sensitive MatMuls kept fp32
``minilm-pruned``      heads + FFN neurons removed, briefly re-distilled; fp32
``minilm-pruned-int8`` the pruned model, dynamic INT8
``minilm-student``     3-layer distilled student, fp32
``minilm-student-int8``the student, dynamic INT8
``minilm-fp16``        fp16 ONNX for GPU execution providers
``minilm-trt-fp16``    TensorRT engines (only where ``tensorrt`` and a GPU exist)
``minilm-trt-int8``
=====================  ===========================================================

The digits model gets the same steps where they apply (no distillation: it is already small).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError

log = logging.getLogger(__name__)

STEPS = ("export", "quantize-dynamic", "quantize-static", "prune", "distill", "fp16", "tensorrt")
MODELS = ("minilm", "digits")
DEFAULT_BUDGETS = {"minilm": 0.995, "digits": 0.99}
# model -> (recipes module, report kind, title)
RECIPES = {"minilm": ("minilm", "embedding", "all-MiniLM-L6-v2: speed vs fidelity to the fp32 teacher"),
           "digits": ("digits", "classifier", "digits MLP: speed vs test accuracy")}


@dataclass(frozen=True)
class CompressOptions:
    """Settings of one ``headrace compress`` run (validated eagerly).

    Attributes:
        model: ``minilm`` or ``digits``.
        steps: steps to run (see module docstring).
        repo: model repository path.
        work_dir: scratch and distillation checkpoints (resumable across runs).
        threads: intra-op threads for every backend while measuring (and for training).
        held_out: held-out sentences for fidelity; 0 = all of them.
        calibration: training sentences for static calibration / pruning importance.
        scan: training sentences scored during the mixed-precision search.
        fidelity_budget: what an INT8 artifact must keep, or None for the model's default
            (:data:`DEFAULT_BUDGETS`). MiniLM: mean cosine to the teacher on ``scan`` training
            sentences. 0.995 is the default because that proxy has to carry the held-out
            targets too (mean cosine >= 0.99 *and* overlap@10 >= 0.90): measured on all 1,153
            held-out sentences, fully quantized dynamic INT8 scores 0.9928 / overlap 0.890,
            one MatMul in fp32 0.9942 / 0.904, three 0.9955 / 0.914. Digits: ``1 - budget``
            is the largest accepted accuracy drop.
        prune_heads / prune_ffn: fractions of heads / FFN neurons (digits: hidden units) removed.
        prune_recover_steps: distillation steps to recover the pruned MiniLM (0 = none).
        distill_steps: distillation steps for the student.
        distill_layers: teacher layers the student starts from.
        distill_lr: peak learning rate of distillation.
        bench: measure speed and fidelity and write them to the manifests.
        plot: PNG path for the speed-vs-fidelity plot (None = no plot).
        seed: seeds training, sampling and splits.
        progress: show tqdm progress bars.
    """

    model: str = "minilm"
    steps: tuple[str, ...] = STEPS
    repo: Path = Path("model_repo")
    work_dir: Path = Path("runs/compress")
    threads: int = 2
    held_out: int = 0
    calibration: int = 256
    scan: int = 128
    fidelity_budget: float | None = None
    prune_heads: float = 0.25
    prune_ffn: float = 0.4
    prune_recover_steps: int = 300
    distill_steps: int = 2000
    distill_layers: tuple[int, ...] = (0, 2, 4, 5)
    distill_lr: float = 5e-4
    bench: bool = True
    plot: Path | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"model {self.model!r}: choose one of {list(MODELS)}")
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown or not self.steps:
            raise ConfigError(f"unknown compress steps {unknown or '(none given)'}; choose from {list(STEPS)}")
        checks = [
            (1 <= self.threads <= 256, "threads", "must be between 1 and 256"),
            (self.held_out >= 0, "held_out", "must be >= 0 (0 = all held-out sentences)"),
            (self.calibration >= 8, "calibration", "must be >= 8 sentences"),
            (self.scan >= 16, "scan", "must be >= 16 sentences"),
            (self.fidelity_budget is None or 0.0 < self.fidelity_budget <= 1.0, "fidelity_budget",
             "must be in (0, 1], e.g. 0.995, or unset for the model default"),
            (0.0 <= self.prune_heads < 1.0 and 0.0 <= self.prune_ffn < 1.0, "prune_heads/prune_ffn", "must be in [0, 1)"),
            (self.prune_recover_steps >= 0, "prune_recover_steps", "must be >= 0"),
            (self.distill_steps >= 1, "distill_steps", "must be >= 1"),
            (len(self.distill_layers) >= 1, "distill_layers", "must name at least one teacher layer"),
            (self.distill_lr > 0, "distill_lr", "must be > 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"compress {name}: {msg}")

    @property
    def budget(self) -> float:
        return self.fidelity_budget if self.fidelity_budget is not None else DEFAULT_BUDGETS[self.model]

    def ordered_steps(self) -> tuple[str, ...]:
        return tuple(s for s in STEPS if s in self.steps or s == "export")


@dataclass
class CompressResult:
    """What a run produced.

    Attributes:
        model: the model compressed.
        artifacts: repository entries written, as ``name/version``.
        rows: measured figures (:class:`~headrace.models.compress.report.Row`), if benched.
        skipped: step -> reason, for steps that could not run here (e.g. no TensorRT).
        plot: the PNG written, if any.
        markdown: the table as markdown, if benched.
        details: per-step extra facts (mixed-precision choices, prune shapes, distill losses).
    """

    model: str
    artifacts: list[str] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    plot: Path | None = None
    markdown: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def parse_steps(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"export,quantize-dynamic"`` or a list -> validated tuple; None/"all" = every step.

    Raises:
        ConfigError: an unknown step name.
    """
    if spec is None or spec == "all":
        return STEPS
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [s for s in items if s not in STEPS]
    if unknown or not items:
        raise ConfigError(f"unknown compress steps {unknown or '(none given)'}; choose from {list(STEPS)}")
    return tuple(items)


def compress_main(opts: Any, *, console: Any = None) -> Any:
    """Entry point of ``headrace compress``: a recipe run for :class:`CompressOptions`, a
    repository-model run (:func:`headrace.models.compress.anymodel.run_any`) for
    ``AnyModelOptions``.

    Raises:
        ConfigError: bad options. ModelError / RepositoryError: a step failed.
    """
    if isinstance(opts, CompressOptions):
        return run(opts, console=console)
    from headrace.models.compress.anymodel import run_any

    return run_any(opts, console=console)


def _recipe(model: str) -> tuple[Any, str, str]:
    """(run function, report kind, title) of a built-in recipe."""
    import importlib

    module, kind, title = RECIPES[model]
    return getattr(importlib.import_module(f"headrace.models.compress.recipes.{module}"), f"run_{module}"), kind, title


def run(opts: CompressOptions, *, console: Any = None) -> CompressResult:
    """Run a validated :class:`CompressOptions` (what :func:`compress_main` calls)."""
    from rich.console import Console
    from rich.markup import escape

    from headrace.models.repository.store import ModelRepository

    con = console or Console()
    if console is None and not con.is_terminal:
        con = Console(width=200)  # a piped report would otherwise wrap every column at 80
    repo = ModelRepository(opts.repo)
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=opts.work_dir, prefix=".scratch-") as tmp:
        runner, kind, title = _recipe(opts.model)
        result = runner(opts, repo, Path(tmp))
    if result.rows:
        from headrace.models.compress import report

        con.print(report.table(result.rows, title=f"{title} ({opts.threads} threads)", kind=kind))
        result.markdown = report.markdown_table(result.rows, kind=kind)
        plot = opts.plot or opts.work_dir / f"{opts.model}-speed-vs-fidelity.png"
        if opts.bench:
            result.plot = report.plot(result.rows, plot, title=f"{title}, {opts.threads} threads", kind=kind)
            con.print(f"plot: {result.plot}")
    for step, why in result.skipped.items():
        con.print(f"[yellow]skipped {escape(step)}[/yellow]: {escape(why)}")
    con.print(f"artifacts: {', '.join(result.artifacts) or 'none'} in {repo.root}")
    return result
