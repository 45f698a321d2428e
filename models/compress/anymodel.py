"""``headrace compress NAME``: compress any ONNX or torch repository entry on the user's data.

1. open the entry (:mod:`.source`), load ``--data`` (calibration) and ``--held-out``
   (evaluation; without it a seeded split is made and the report says so);
2. run the ``--steps`` from the registry (:mod:`.steps`); mixed-precision searches score on
   calibration samples only;
3. measure every artifact against the user's own fp32 model on the held-out samples:
   fidelity by output kind, speed at batch 1/8/32 side by side, size;
4. gate: an artifact below ``--min-fidelity`` is not added; the report says why;
5. publish the rest (new versions of the model, or new names) with the figures in their
   manifests, and keep the report (JSON, markdown, PNG) under ``<work_dir>/reports/``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError
from headrace.models.compress import data as D
from headrace.models.compress.candidates import below, refusal
from headrace.models.compress.evaluate import Comparison, Outputs, collect, compare, ort_run_all
from headrace.models.compress.lineage import describe_reference
from headrace.models.compress.source import Source, export_source, open_source, sample_outputs_axes
from headrace.models.compress.steps import (
    Candidate,
    QuantizeOptions,
    StepContext,
    TfliteOptions,
    parse_steps,
    run_step,
)
from headrace.models.compress.structured import PruneOptions
from headrace.models.repository.store import ModelRepository

log = logging.getLogger(__name__)

PUBLISH = ("name", "version", "none")
DEFAULT_STEPS = ("quantize-dynamic", "quantize-static")


@dataclass(frozen=True)
class AnyModelOptions:
    """One ``headrace compress NAME`` run (validated eagerly).

    Attributes:
        name / version: the repository entry (version None = latest).
        data: calibration file (``.npz`` keyed by input name, or text, one sample per line).
        held_out: evaluation file; None = a ``held_out_fraction`` split of ``data``.
        steps: registered steps to run, in order.
        min_fidelity: the gate; an artifact scoring below it on held-out data is refused.
        kind: primary output kind (``classification``, ``binary``, ``embedding``, ``other``);
            None = inferred from the output.
        output: the one output the gate looks at; None = every output, each judged by its
            kind (the table shows the first).
        publish: ``name`` (entries ``NAME-<suffix>``), ``version`` (new versions of NAME) or ``none``.
        calibration_limit: at most this many calibration samples are used.
    """

    name: str
    version: str | None = None
    data: Path | None = None
    held_out: Path | None = None
    held_out_fraction: float = 0.2
    steps: tuple[str, ...] = DEFAULT_STEPS
    min_fidelity: float = 0.99
    kind: str | None = None
    output: str | None = None
    publish: str = "name"
    repo: Path = Path("model_repo")
    work_dir: Path = Path("runs/compress")
    threads: int = 2
    calibration_limit: int = 512
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)
    tflite: TfliteOptions = field(default_factory=TfliteOptions)
    bench: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        parse_steps(self.steps)
        if not 0.0 < self.min_fidelity <= 1.0:
            raise ConfigError(f"min_fidelity {self.min_fidelity} must be in (0, 1], e.g. 0.99")
        if self.publish not in PUBLISH:
            raise ConfigError(f"publish {self.publish!r}: choose one of {list(PUBLISH)}")
        if not 1 <= self.threads <= 256 or self.calibration_limit < 4:
            raise ConfigError("threads must be in 1..256 and calibration_limit >= 4")
        if self.data is None and self.held_out is not None:
            raise ConfigError("--held-out needs --data (calibration data) as well")


@dataclass
class Evaluated:
    """A candidate (or a reference) with its measured figures and the gate's verdict."""

    candidate: Candidate
    comparison: Comparison | None = None
    size_bytes: int = 0
    accepted: bool = False
    reason: str = ""
    published: str = ""
    row: Any = None


@dataclass
class Prepared:
    """The opened source and data, shared by every step and measurement."""

    source: Source
    onnx_path: Path
    calibration: D.Samples
    held_out: D.Samples
    axes: dict[str, int]
    kinds: dict[str, str]
    primary: str
    reference_held: Outputs
    reference_cal: Outputs
    split_note: str = ""


def load_samples(opts: AnyModelOptions, src: Source) -> tuple[D.Samples, D.Samples, str]:
    """(calibration, held-out, note) from the options' files.

    Raises:
        ConfigError: no data, or data the model cannot take.
    """
    if opts.data is None:
        raise ConfigError(f"compressing {opts.name!r} needs --data: an .npz keyed by input name "
                          f"({list(src.declared)}) or a text file for text models")
    cal = D.load(opts.data, src.declared, text=src.accepts_text, dtypes=src.dtypes)
    if opts.held_out is not None:
        held, note = D.load(opts.held_out, src.declared, text=src.accepts_text, dtypes=src.dtypes), ""
    else:
        cal, held = D.split(cal, opts.held_out_fraction, opts.seed)
        note = held.origin
    if cal.n > opts.calibration_limit:  # a seeded sample spread over the whole file, not its head
        idx = np.sort(np.random.default_rng(opts.seed).choice(cal.n, opts.calibration_limit, replace=False))
        cal = cal.subset(idx, f"{cal.origin} ({opts.calibration_limit} of {cal.n}, seed {opts.seed})")
    return cal, held, note


def prepare(opts: AnyModelOptions, repo: ModelRepository, work: Path) -> Prepared:
    """Open the source, load the data, run the fp32 reference on both parts."""
    src = open_source(repo, opts.name, opts.version)
    cal, held, note = load_samples(opts, src)
    onnx_path = export_source(src, cal, work)
    two = held.subset(np.arange(min(held.n, 5)))
    sizes = [min(3, two.n), max(0, two.n - 3)]
    feeds = [two.subset(np.arange(sizes[0])).feeds(8, src.encode)[0]]
    if sizes[1]:
        feeds.append(two.subset(np.arange(3, two.n)).feeds(8, src.encode)[0])
    axes = sample_outputs_axes(onnx_path, feeds, sizes, src.output_names)
    run = ort_run_all(onnx_path, opts.threads, src.output_names)
    ref_held = collect(run, held.feeds(32, src.encode), axes)
    ref_cal = collect(run, cal.feeds(32, src.encode), axes)
    from headrace.models.compress.fidelity import infer_kind

    primary = opts.output or src.output_names[0]
    if primary not in src.output_names:
        raise ConfigError(f"output {primary!r} is not one of {list(src.output_names)}")
    kinds = {k: infer_kind(k, v, src.manifest.postprocess) for k, v in ref_held.items()}
    if opts.kind:
        kinds[primary] = opts.kind
    return Prepared(src, onnx_path, cal, held, axes, kinds, primary, ref_held, ref_cal, note)


def score_on(p: Prepared, run: Any, samples: D.Samples, reference: Outputs) -> Comparison:
    out = collect(run, samples.feeds(32, p.source.encode), p.axes)
    labels = samples.labels
    return compare(reference, out, p.kinds, p.primary, labels)


def _tokenizer(src: Source) -> Any:
    if not src.accepts_text:
        return None
    from headrace.models.tokenizer import load_tokenizer

    m = src.manifest
    return load_tokenizer(src.repo.file_path(m, str(m.extra.get("tokenizer", "tokenizer.json"))),
                          max_length=int(m.extra.get("max_length", 256)))


def run_steps(opts: AnyModelOptions, p: Prepared, work: Path) -> tuple[list[Candidate], dict[str, Any]]:
    """Every requested step; a failing step is reported and the others go on."""
    def scan_score(path: Path) -> float:
        return score_on(p, ort_run_all(path, opts.threads, p.source.output_names), p.calibration,
                        p.reference_cal).score

    ctx = StepContext(onnx_path=p.onnx_path, module=p.source.module, calibration=p.calibration,
                      encode=p.source.encode, scan_score=scan_score, floor=opts.min_fidelity,
                      kind=p.kinds[p.primary], work=work, quantize=opts.quantize, prune=opts.prune,
                      tflite=opts.tflite, seed=opts.seed, progress=opts.progress, threads=opts.threads,
                      tokenizer=_tokenizer(p.source))
    out: list[Candidate] = []
    failed: dict[str, str] = {}
    for name in opts.steps:
        try:
            out.extend(run_step(name, ctx))
        except Exception as e:  # noqa: BLE001 - one step failing must not lose the others' artifacts
            log.warning("step %s failed: %s", name, e)
            failed[name] = str(e)
    return out, {"steps": ctx.details, "failed": failed}


def runner_for(c: Candidate, outputs: tuple[str, ...], threads: int) -> Any:
    """feed -> outputs for an ONNX or TFLite candidate."""
    if c.fmt == "tflite":
        from headrace.models.compress.edge import litert_run_all

        return litert_run_all(c.path, threads, c.extra)
    return ort_run_all(c.path, threads, outputs)


def torch_run_all(module: Any, outputs: tuple[str, ...]) -> Any:
    import torch

    def run(feed: D.Feed) -> Outputs:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {k: o.float().numpy() for k, o in zip(outputs, outs, strict=True)}

    return run


def speed_batches(p: Prepared) -> dict[int, list[D.Feed]]:
    """Held-out batches of 1, 8 and 32 samples (cycled when there are fewer), 128 samples a pass
    (32 at batch 1)."""
    from headrace.models.compress.report import BATCH_SIZES

    out = {}
    for b in BATCH_SIZES:
        idx = np.arange(32 if b == 1 else 128) % p.held_out.n
        out[b] = p.held_out.subset(idx).feeds(b, p.source.encode)
    return out


def measure(opts: AnyModelOptions, p: Prepared, cands: list[Candidate]) -> list[Evaluated]:
    """Fidelity on held-out samples and speed side by side for the references and candidates."""
    from headrace.models.compress import report as R

    outs = p.source.output_names
    refs = [Evaluated(Candidate("fp32 onnx", p.onnx_path, "onnx", "fp32", [], describe_reference(p.source.manifest)))]
    runs: dict[str, Any] = {"fp32 onnx": ort_run_all(p.onnx_path, opts.threads, outs)}
    if p.source.module is not None:
        refs.insert(0, Evaluated(Candidate("fp32 torch", p.source.folder / p.source.manifest.model_file, "torch",
                                           "fp32", [], "your torch module")))
        runs["fp32 torch"] = torch_run_all(p.source.module, outs)
    evals = refs + [Evaluated(c) for c in cands]
    arts = []
    for e in evals:
        c = e.candidate
        # a converted file is loaded here only once a child process survived loading it
        e.reason = refusal(c, p.held_out, p.source.encode, outs, opts.threads) if c.recipe else ""
        if e.reason:
            continue
        try:
            if c.label not in runs:
                runs[c.label] = runner_for(c, outs, opts.threads)
            e.comparison = score_on(p, runs[c.label], p.held_out, p.reference_held)
        except Exception as ex:  # noqa: BLE001 - an artifact that cannot run is refused, not fatal
            e.reason = f"cannot run here: {ex}"
            continue
        e.size_bytes = c.path.stat().st_size if c.path.is_file() else 0
        arts.append(R.Artifact(c.label, _backend(c), c.precision, _primary(runs[c.label], p.primary),
                               c.params, e.size_bytes, None, c.note, c.bench_speed and opts.bench))
    by_size = speed_batches(p)
    times = R.measure_speed(arts, by_size, min_passes=5, min_time_s=1.0, progress=opts.progress)
    rows = {a.label: R.Row(a.label, a.backend, a.precision, a.params, a.size_bytes, note=a.note) for a in arts}
    for label, t in times.items():
        R.summarize_speed(rows[label], t, {b: 32 if b == 1 else 128 for b in by_size})
    R.add_speedups(list(rows.values()), "fp32 onnx")
    for e in evals:
        e.row = rows.get(e.candidate.label)
        if e.row is not None and e.comparison is not None:
            e.row.fidelity = e.comparison.flat()
    return evals


def _primary(run: Any, name: str) -> Any:
    return lambda feed: run(feed)[name]


def _backend(c: Candidate) -> str:
    return {"onnx": "onnxruntime", "tflite": "litert", "torch": "torch"}[c.fmt]


def gate(evals: list[Evaluated], floor: float, only: str | None = None) -> None:
    """Accept candidates whose held-out score reaches ``floor`` on every output, each judged
    by its kind (on ``only`` when the user named one output: ``--output``); say why for the
    others. Every output, because a head the table does not show (a value head next to the
    logits) can be ruined while the first output agrees."""
    for e in evals:
        if not e.candidate.recipe:
            continue  # a reference row
        if e.comparison is None:
            e.reason = e.reason or "not measured"
            continue
        scores = ({only: e.comparison.score} if only else
                  {k: float(m.get("score", float("nan"))) for k, m in e.comparison.metrics.items()})
        worst = min(scores, key=lambda k: scores[k] if scores[k] == scores[k] else -1.0)
        if not scores[worst] >= floor:
            e.reason = (f"held-out {worst} score {below(scores[worst], floor)} ({e.comparison.kinds.get(worst, '?')}) "
                        "is below "
                        f"--min-fidelity {floor:g}; not added to the repository")
        else:
            e.accepted = True


SUFFIX = {"heads+ffn pruned": "heads-pruned", "int8 dynamic": "int8", "int8 static": "int8-static", "fp16": "fp16", "pruned fp32": "pruned",
          "pruned int8 static": "pruned-int8", "tflite int8 (integer)": "tflite-int8",
          "tflite int8 (dynamic)": "tflite-int8-dynamic"}


def publish(opts: AnyModelOptions, p: Prepared, e: Evaluated, context: dict[str, Any]) -> str:
    """Add an accepted candidate to the repository (new version or new name) with its
    figures; returns ``name/version``."""
    from headrace.models.repository.manifest import DEFAULT_MODEL_FILE

    m, c = p.source.manifest, e.candidate
    name = m.name if opts.publish == "version" else f"{m.name}-{SUFFIX.get(c.label, c.label.replace(' ', '-'))}"
    model_file = DEFAULT_MODEL_FILE[c.fmt]
    files: dict[str, str | Path] = {f.path: p.source.repo.file_path(m, f.path) for f in m.files
                                    if f.path != m.model_file and not f.path.endswith((".safetensors", ".onnx"))}
    files[model_file] = c.path
    extra = {k: v for k, v in m.extra.items() if k not in ("torch_factory", "arch", "build_key")}
    measured = e.row.measured(context) if e.row is not None else {}
    measured["fidelity"] = e.comparison.to_dict() if e.comparison else {}
    out = p.source.repo.add(
        name, files, format=c.fmt, backend=_backend(c), precision=c.precision, inputs=m.inputs, outputs=m.outputs,
        # The source's batching facts hold for its compressed copies: a model served one
        # request per call (outputs that mix rows) must not be batched as its INT8 copy.
        batch_dim=m.batch_dim, max_batch=m.max_batch, preprocess=m.preprocess, postprocess=m.postprocess, model_file=model_file, source=f"{p.source.ref}",
        recipe=_json_safe([*m.recipe, *c.recipe]), measured=_json_safe(measured), extra={**extra, **c.extra},
        description=f"{m.description or m.name}: {c.label}")
    return f"{out.name}/{out.version}"


def _json_safe(x: Any) -> Any:
    from headrace.models.compress.report import _json_safe as safe

    return safe(x)


@dataclass
class AnyModelResult:
    """What a run produced: every evaluated artifact, what was published, where the report is."""

    evaluated: list[Evaluated]
    published: list[str]
    refused: dict[str, str]
    report_dir: Path
    details: dict[str, Any]
    markdown: str = ""


def run_any(opts: AnyModelOptions, *, console: Any = None) -> AnyModelResult:
    """Run one compression of a repository entry (see the module docstring).

    Raises:
        ConfigError: bad options or data. ModelNotFoundError / RepositoryError: the entry.
        ModelError: the source cannot be exported or run.
    """
    from headrace.models.compress import anyreport
    from headrace.models.compress.report import bench_context

    repo = ModelRepository(opts.repo)
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=opts.work_dir, prefix=".scratch-") as tmp:
        work = Path(tmp)
        p = prepare(opts, repo, work)
        cands, details = run_steps(opts, p, work)
        evals = measure(opts, p, cands)
        gate(evals, opts.min_fidelity, opts.output or None)
        context = bench_context(opts.threads, "fp32 onnx (the source graph)", anyreport.data_context(p))
        published = []
        for e in evals:
            if e.accepted and opts.publish != "none":
                e.published = publish(opts, p, e, context)
                published.append(e.published)
        refused = {e.candidate.label: e.reason for e in evals if e.candidate.recipe and not e.accepted}
        res = AnyModelResult(evals, published, refused, anyreport.report_dir(opts, p), details)
        anyreport.write(res, opts, p, context, console=console)
    return res
