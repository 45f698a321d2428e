"""The compression steps for all-MiniLM-L6-v2 (called by :mod:`.pipeline`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headrace.models.compress.pipeline import CompressOptions, CompressResult

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask")
SPEED_POOL = 256  # held-out sentences used for the timed batches


@dataclass
class _Entry:
    """An artifact to measure: how to build its runner, and where it lives."""

    label: str
    backend: str
    precision: str
    make_run: Callable[[], Callable[[dict[str, np.ndarray[Any, Any]]], np.ndarray[Any, Any]]]
    params: int
    size_bytes: int
    repo_ref: tuple[str, str] | None = None
    note: str = ""
    bench_speed: bool = True


def _text_batches(tok: Any, sentences: Sequence[str], size: int, *, bucket: bool, seed: int) -> list[dict[str, Any]]:
    """Batches of ``size`` sentences; with ``bucket`` the sentences are length-sorted first and
    the batch order shuffled (what the worker's length-bucketing batcher does)."""
    from headrace.models.tokenizer import encode_batch

    sents = list(sentences)
    if bucket:
        lengths = [len(e.ids) for e in tok.encode_batch(sents)]
        sents = [s for _, s in sorted(zip(lengths, sents, strict=True), key=lambda x: x[0])]
    out = []
    for i in range(0, len(sents), size):
        ids, mask = encode_batch(tok, sents[i:i + size])
        out.append({"input_ids": ids, "attention_mask": mask})
    if bucket:
        order = np.random.default_rng(seed).permutation(len(out))
        out = [out[i] for i in order]
    return out


def _add_text(repo: Any, name: str, files: dict[str, Path], *, fmt: str = "onnx", precision: str,
              recipe: list[dict[str, Any]], config: Any, description: str, measured: dict[str, Any]) -> Any:
    from headrace.models.builtin.build import EMBEDDING_OUTPUTS, MINILM_SOURCE, TEXT_INPUTS
    from headrace.models.builtin.minilm import MAX_SEQ_LENGTH, default_model_path

    files = {**files, "tokenizer.json": default_model_path() / "tokenizer.json"}
    backend = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}[fmt]
    return repo.add(name, files, format=fmt, backend=backend, precision=precision, inputs=TEXT_INPUTS,
                    outputs=EMBEDDING_OUTPUTS, preprocess="bert_tokenizer", postprocess="none",
                    source=MINILM_SOURCE, recipe=recipe, measured=measured,
                    extra={"tokenizer": "tokenizer.json", "max_length": MAX_SEQ_LENGTH, "embedding_dim": 384,
                           "minilm_config": config.to_dict()},
                    description=description)


def _run_dir(opts: CompressOptions, prefix: str, cfg: Any, spec: Any) -> Path:
    """A checkpoint folder per distinct run: the same settings resume, other settings start
    their own run instead of being refused by the resume check."""
    import hashlib
    import json

    key = json.dumps({"cfg": cfg.to_dict(), "spec": spec.to_dict() if spec else None}, sort_keys=True)
    return opts.work_dir / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_minilm(opts: CompressOptions, repo: Any, tmp: Path) -> CompressResult:
    import torch

    from headrace.models.builtin.build import build_minilm
    from headrace.models.builtin.corpus import load_corpus, sample
    from headrace.models.builtin.minilm import default_model_path, load_minilm
    from headrace.models.compress import distill as D
    from headrace.models.compress import quantize as Q
    from headrace.models.compress import report as R
    from headrace.models.compress.export import export_minilm
    from headrace.models.compress.fidelity import cosine_per_row, embedding_fidelity
    from headrace.models.compress.prune import PruneSpec, prune_minilm
    from headrace.models.compress.tensorrt import tensorrt_available
    from headrace.models.tokenizer import load_tokenizer

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    steps = opts.ordered_steps()
    res = CompressResult(model="minilm")
    corpus = load_corpus()
    res.details["corpus"] = corpus.describe()
    tok = load_tokenizer()
    teacher = load_minilm()
    n_params = teacher.num_parameters()

    base = build_minilm(repo)
    base_onnx = repo.file_path(base, base.model_file)
    res.artifacts.append(f"{base.name}/{base.version}")
    base_recipe = [dict(s) for s in base.recipe]
    entries: list[_Entry] = [
        _Entry("fp32 torch", "torch", "fp32", lambda: R.torch_runner(teacher, opts.threads), n_params,
               (default_model_path() / "model.safetensors").stat().st_size, note="reference"),
        _Entry("fp32 onnx", "onnxruntime", "fp32", lambda: R.ort_runner(base_onnx, opts.threads), n_params,
               base_onnx.stat().st_size, (base.name, base.version), note="ORT BERT fusions"),
    ]

    # Mixed-precision search data: training sentences (never the held-out ones). A quantized
    # model is scored against the fp32 graph it was made from, so the budget measures what
    # quantization costs (a pruned or distilled source has its own, larger, distance to the
    # teacher, which the report shows separately).
    scan_batches = _text_batches(tok, sample(corpus.train, opts.scan, seed=opts.seed + 1), 32, bucket=True,
                                 seed=opts.seed)

    def embed(path: Path) -> np.ndarray[Any, Any]:
        run = R.ort_runner(path, opts.threads)
        return np.concatenate([run(b) for b in scan_batches])

    def scorer(src: Path) -> Callable[[Path], float]:
        ref = embed(src)
        return lambda path: float(cosine_per_row(ref, embed(path)).mean())

    def add_onnx(name: str, path: Path, precision: str, recipe: list[dict[str, Any]], config: Any, params: int,
                 label: str, description: str, note: str = "") -> None:
        m = _add_text(repo, name, {"model.onnx": path}, precision=precision, recipe=recipe, config=config,
                      description=description, measured={"size_bytes": path.stat().st_size, "params": params})
        res.artifacts.append(f"{m.name}/{m.version}")
        stored = repo.file_path(m, m.model_file)
        entries.append(_Entry(label, "onnxruntime", precision, lambda: R.ort_runner(stored, opts.threads), params,
                              stored.stat().st_size, (m.name, m.version), note=note))

    def dynamic_int8(src: Path, dst: Path) -> Q.MixedPrecisionResult:
        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_dynamic_int8(s, d, per_channel=True, nodes_to_quantize=nq, nodes_to_exclude=ne)

        return Q.mixed_precision(src, dst, qfn, scorer(src), opts.budget, progress=opts.progress)

    def quant_recipe(step: str, mp: Q.MixedPrecisionResult, **params: Any) -> dict[str, Any]:
        return {"step": step, "params": {**params, "per_channel": True, "fp32_nodes": list(mp.excluded),
                                         "budget_mean_cosine_vs_source": opts.budget,
                                         "scan_mean_cosine": mp.score,
                                         "scan_sentences": opts.scan}}

    if "quantize-dynamic" in steps:
        mp = dynamic_int8(base_onnx, tmp / "int8.onnx")
        res.details["quantize-dynamic"] = mp.to_dict()
        add_onnx("minilm-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [*base_recipe, quant_recipe("quantize-dynamic", mp, weights="int8", activations="uint8 per batch")],
                 teacher.config, n_params, "int8 dynamic", "all-MiniLM-L6-v2, dynamic INT8 per-channel ONNX",
                 note=f"{len(mp.excluded)} MatMul fp32" if mp.excluded else "")

    if "quantize-static" in steps:
        cal = Q.text_feeds(tok, sample(corpus.train, opts.calibration, seed=opts.seed + 2), INPUTS, batch_size=16)
        cache = tmp / "calibration.json"

        def sfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_static_int8(s, d, cal, nodes_to_quantize=nq, nodes_to_exclude=ne, cache_path=cache)

        mp = Q.mixed_precision(base_onnx, tmp / "int8_static.onnx", sfn, scorer(base_onnx), opts.budget,
                               nodes=Q.weight_nodes(base_onnx, Q.STATIC_OPS), progress=opts.progress)
        res.details["quantize-static"] = mp.to_dict()
        add_onnx("minilm-int8-static", mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [*base_recipe, quant_recipe("quantize-static", mp, format="QDQ", calibration="minmax",
                                             calibration_sentences=opts.calibration)],
                 teacher.config, n_params, "int8 static QDQ", "all-MiniLM-L6-v2, static QDQ INT8 ONNX (mixed)",
                 note=f"{len(mp.excluded)}/{len(Q.weight_nodes(base_onnx, Q.STATIC_OPS))} MatMul fp32")

    targets = None
    if "prune" in steps or "distill" in steps:
        targets = D.cached_teacher_embeddings(opts.work_dir, teacher, tok, corpus.train, max_length=128,
                                              progress=opts.progress)

    if "prune" in steps:
        imp = [(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])) for b in
               _text_batches(tok, sample(corpus.train, opts.calibration, seed=opts.seed + 3), 32, bucket=True,
                             seed=opts.seed)]
        spec = PruneSpec(head_fraction=opts.prune_heads, ffn_fraction=opts.prune_ffn)
        pruned, prep = prune_minilm(teacher, imp, spec)
        recipe = [{"step": "prune", "params": prep.to_dict()}]
        if opts.prune_recover_steps:
            cfg = D.DistillConfig(steps=opts.prune_recover_steps, lr=1e-4, warmup_steps=30, seed=opts.seed)
            pruned, dres = D.distill(pruned, teacher, tok, corpus.train, _run_dir(opts, "prune-recover", cfg, spec), cfg,
                                     progress=opts.progress, targets=targets)
            recipe.append({"step": "distill", "params": {**dres.to_dict(), "purpose": "recover after pruning"}})
            res.details["prune-recover"] = dres.to_dict()
        res.details["prune"] = prep.to_dict()
        p_onnx = tmp / "pruned.onnx"
        export_minilm(pruned, p_onnx, tokenizer=tok)
        p_params = pruned.num_parameters()
        add_onnx("minilm-pruned", p_onnx, "fp32", [*recipe, *base_recipe], pruned.config, p_params,
                 "pruned fp32", "all-MiniLM-L6-v2, structurally pruned, fp32 ONNX",
                 note=f"heads {sum(prep.heads_after)}/{sum(prep.heads_before)}, ffn "
                      f"{sum(prep.ffn_after)}/{sum(prep.ffn_before)}")
        mp = dynamic_int8(p_onnx, tmp / "pruned_int8.onnx")
        add_onnx("minilm-pruned-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [*recipe, *base_recipe, quant_recipe("quantize-dynamic", mp)], pruned.config, p_params,
                 "pruned int8", "all-MiniLM-L6-v2, pruned + dynamic INT8 ONNX")

    if "distill" in steps:
        layers = tuple(opts.distill_layers)
        student = D.init_student(layers)
        cfg = D.DistillConfig(steps=opts.distill_steps, lr=opts.distill_lr, seed=opts.seed)
        run_dir = _run_dir(opts, f"distill-{'-'.join(map(str, layers))}", cfg, None)
        student, dres = D.distill(student, teacher, tok, corpus.train, run_dir, cfg, progress=opts.progress,
                                  targets=targets)
        res.details["distill"] = dres.to_dict()
        s_onnx = tmp / "student.onnx"
        export_minilm(student, s_onnx, tokenizer=tok)
        recipe = [{"step": "distill", "params": {**dres.to_dict(), "layers": list(layers)}}]
        s_params = student.num_parameters()
        add_onnx("minilm-student", s_onnx, "fp32", [*recipe, *base_recipe], student.config, s_params,
                 f"student {len(layers)}L fp32", f"{len(layers)}-layer student distilled from all-MiniLM-L6-v2")
        mp = dynamic_int8(s_onnx, tmp / "student_int8.onnx")
        add_onnx("minilm-student-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [*recipe, *base_recipe, quant_recipe("quantize-dynamic", mp)],
                 student.config, s_params, f"student {len(layers)}L int8",
                 f"{len(layers)}-layer distilled student, dynamic INT8 per-channel")

    plain: Path | None = None
    if "fp16" in steps or "tensorrt" in steps:
        plain = tmp / "plain.onnx"
        export_minilm(teacher, plain, optimize=False, tokenizer=tok)

    if "fp16" in steps:
        fp16 = Q.convert_fp16(base_onnx, tmp / "fp16.onnx")
        m = _add_text(repo, "minilm-fp16", {"model.onnx": fp16}, precision="fp16", config=teacher.config,
                      recipe=[*base_recipe, {"step": "fp16", "params": {"keep_io_types": True}}],
                      description="all-MiniLM-L6-v2, fp16 ONNX for GPU execution providers",
                      measured={"size_bytes": fp16.stat().st_size, "params": n_params})
        res.artifacts.append(f"{m.name}/{m.version}")
        stored = repo.file_path(m, m.model_file)
        entries.append(_Entry("fp16 onnx", "onnxruntime", "fp16", lambda: R.ort_runner(stored, opts.threads),
                              n_params, stored.stat().st_size, (m.name, m.version),
                              note="GPU target: CPU run checks fidelity only", bench_speed=False))

    if "tensorrt" in steps:
        ok, why = tensorrt_available()
        if not ok:
            res.skipped["tensorrt"] = why
        else:
            assert plain is not None
            _tensorrt_steps(opts, repo, tmp, plain, tok, corpus, teacher, res, entries, base_recipe)

    if opts.bench:
        held = list(corpus.held_out) if not opts.held_out else sample(corpus.held_out, opts.held_out, seed=opts.seed)
        fid_batches = _text_batches(tok, held, 32, bucket=True, seed=opts.seed)
        pool = sample(corpus.held_out, SPEED_POOL, seed=opts.seed + 4)
        by_size = {b: _text_batches(tok, pool if b > 1 else pool[:64], b, bucket=True, seed=opts.seed)
                   for b in R.BATCH_SIZES}
        arts = []
        for e in entries:
            try:
                arts.append(R.Artifact(e.label, e.backend, e.precision, e.make_run(), e.params, e.size_bytes,
                                       e.repo_ref, e.note, e.bench_speed))
            except Exception as ex:  # noqa: BLE001 - e.g. an fp16 graph with no CPU kernel: report, go on
                res.skipped[f"bench {e.label}"] = f"cannot run on this machine: {ex}"
        ref = R.outputs_of(arts[0], fid_batches)
        rows = []
        times = R.measure_speed(arts, by_size, min_passes=5, progress=opts.progress)
        rows_per = R.pass_rows(by_size)
        for a in arts:
            row = R.Row(a.label, a.backend, a.precision, a.params, a.size_bytes, repo_ref=a.repo_ref, note=a.note)
            if a.label in times:
                R.summarize_speed(row, times[a.label], rows_per)
            row.fidelity = embedding_fidelity(ref, R.outputs_of(a, fid_batches)).to_dict()
            rows.append(row)
        R.add_speedups(rows, "fp32 torch")
        ctx = R.bench_context(opts.threads, "fp32 torch (all-MiniLM-L6-v2, in-process)",
                              {"held_out_sentences": len(held), "corpus": corpus.describe(),
                               "bucketed_batches": True, "speed_pool_sentences": SPEED_POOL})
        R.record(repo, rows, ctx)
        res.rows = rows
        res.details["bench"] = ctx
    return res


def _tensorrt_steps(opts: CompressOptions, repo: Any, tmp: Path, plain: Path, tok: Any, corpus: Any, teacher: Any,
                    res: CompressResult, entries: list[_Entry], base_recipe: list[dict[str, Any]]) -> None:
    """fp16 and INT8 (QDQ, symmetric activations) engines from the plain export."""
    from headrace.models.builtin.corpus import sample
    from headrace.models.compress import quantize as Q
    from headrace.models.compress import tensorrt as T

    profile = T.text_profile()
    fp16 = Q.convert_fp16(plain, tmp / "plain_fp16.onnx")
    cal = Q.text_feeds(tok, sample(corpus.train, opts.calibration, seed=opts.seed + 2), INPUTS, batch_size=16)
    qdq = Q.quantize_static_int8(plain, tmp / "plain_qdq.onnx", cal, symmetric_activations=True)
    for precision, onnx_path in (("fp16", fp16), ("int8", qdq)):
        plan = tmp / f"{precision}.plan"
        rep = T.build_engine(onnx_path, plan, profile)
        m = _add_text(repo, f"minilm-trt-{precision}", {"model.plan": plan}, fmt="tensorrt", precision=precision,
                      config=teacher.config, description=f"all-MiniLM-L6-v2, TensorRT {precision} engine",
                      recipe=[*base_recipe, {"step": "tensorrt", "params": rep.to_dict()}],
                      measured={"size_bytes": rep.size_bytes, "params": teacher.num_parameters()})
        res.artifacts.append(f"{m.name}/{m.version}")
        stored = repo.file_path(m, m.model_file)

        def make(p: Path = stored) -> Any:
            runner = T.EngineRunner(p)
            return lambda batch: runner.run(batch)[runner.outputs[0]]

        entries.append(_Entry(f"trt {precision}", "tensorrt", precision, make, teacher.num_parameters(),
                              rep.size_bytes, (m.name, m.version), note=f"GPU {rep.device}"))
