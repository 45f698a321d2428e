"""The compression steps for all-MiniLM-L6-v2 (called by :mod:`.pipeline`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.models.compress.pipeline import CompressOptions, CompressResult
from headrace.models.compress.recipes.common import _artifacts, _Entry, run_steps

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask")
SPEED_POOL = 256  # held-out sentences used for the timed batches


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


class _MiniLMRun:
    """State shared by the MiniLM steps of one run; each step is one method (:data:`STEPS`)."""

    def __init__(self, opts: CompressOptions, repo: Any, tmp: Path) -> None:
        import torch

        from headrace.models.builtin.build import build_minilm
        from headrace.models.builtin.corpus import load_corpus
        from headrace.models.builtin.minilm import default_model_path, load_minilm
        from headrace.models.compress import report as R
        from headrace.models.tokenizer import load_tokenizer

        torch.set_num_threads(opts.threads)
        torch.manual_seed(opts.seed)
        self.opts, self.repo, self.tmp = opts, repo, tmp
        self.res = CompressResult(model="minilm")
        self.corpus = load_corpus()
        self.res.details["corpus"] = self.corpus.describe()
        self.tok = load_tokenizer()
        self.teacher = load_minilm()
        self.n_params = self.teacher.num_parameters()
        base = build_minilm(repo)
        self.base_onnx = repo.file_path(base, base.model_file)
        self.res.artifacts.append(f"{base.name}/{base.version}")
        self.base_recipe = [dict(s) for s in base.recipe]
        self.entries: list[_Entry] = [
            _Entry("fp32 torch", "torch", "fp32", lambda: R.torch_runner(self.teacher, opts.threads), self.n_params,
                   (default_model_path() / "model.safetensors").stat().st_size, note="reference"),
            _Entry("fp32 onnx", "onnxruntime", "fp32", lambda: R.ort_runner(self.base_onnx, opts.threads),
                   self.n_params, self.base_onnx.stat().st_size, (base.name, base.version), note="ORT BERT fusions"),
        ]
        self.targets: Any = None
        self.plain: Path | None = None
        # Mixed-precision search data: training sentences (never the held-out ones). A quantized
        # model is scored against the fp32 graph it was made from, so the budget measures what
        # quantization costs (a pruned or distilled source has its own, larger, distance to the
        # teacher, which the report shows separately).
        from headrace.models.builtin.corpus import sample

        self.scan_batches = _text_batches(self.tok, sample(self.corpus.train, opts.scan, seed=opts.seed + 1), 32,
                                          bucket=True, seed=opts.seed)

    # --- helpers ----------------------------------------------------------------------------

    def embed(self, path: Path) -> np.ndarray[Any, Any]:
        from headrace.models.compress import report as R

        run = R.ort_runner(path, self.opts.threads)
        return np.concatenate([run(b) for b in self.scan_batches])

    def scorer(self, src: Path) -> Callable[[Path], float]:
        from headrace.models.compress.fidelity import cosine_per_row

        ref = self.embed(src)
        return lambda path: float(cosine_per_row(ref, self.embed(path)).mean())

    def add_onnx(self, name: str, path: Path, precision: str, recipe: list[dict[str, Any]], config: Any, params: int,
                 label: str, description: str, note: str = "", bench_speed: bool = True) -> None:
        from headrace.models.compress import report as R

        m = _add_text(self.repo, name, {"model.onnx": path}, precision=precision, recipe=recipe, config=config,
                      description=description, measured={"size_bytes": path.stat().st_size, "params": params})
        self.res.artifacts.append(f"{m.name}/{m.version}")
        stored = self.repo.file_path(m, m.model_file)
        self.entries.append(_Entry(label, "onnxruntime", precision, lambda: R.ort_runner(stored, self.opts.threads),
                                   params, stored.stat().st_size, (m.name, m.version), note=note,
                                   bench_speed=bench_speed))

    def dynamic_int8(self, src: Path, dst: Path) -> Any:
        from headrace.models.compress import quantize as Q

        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_dynamic_int8(s, d, per_channel=True, nodes_to_quantize=nq, nodes_to_exclude=ne)

        return Q.mixed_precision(src, dst, qfn, self.scorer(src), self.opts.budget, progress=self.opts.progress)

    def quant_recipe(self, step: str, mp: Any, **params: Any) -> dict[str, Any]:
        return {"step": step, "params": {**params, "per_channel": True, "fp32_nodes": list(mp.excluded),
                                         "budget_mean_cosine_vs_source": self.opts.budget,
                                         "scan_mean_cosine": mp.score, "scan_sentences": self.opts.scan}}

    def teacher_targets(self) -> Any:
        from headrace.models.compress.distill_data import cached_teacher_embeddings

        if self.targets is None:
            self.targets = cached_teacher_embeddings(self.opts.work_dir, self.teacher, self.tok, self.corpus.train,
                                                     max_length=128, progress=self.opts.progress)
        return self.targets

    def plain_export(self) -> Path:
        from headrace.models.compress.export import export_minilm

        if self.plain is None:
            self.plain = self.tmp / "plain.onnx"
            export_minilm(self.teacher, self.plain, optimize=False, tokenizer=self.tok)
        return self.plain

    # --- steps --------------------------------------------------------------------------------

    def quantize_dynamic(self) -> None:
        mp = self.dynamic_int8(self.base_onnx, self.tmp / "int8.onnx")
        self.res.details["quantize-dynamic"] = mp.to_dict()
        self.add_onnx("minilm-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                      [*self.base_recipe, self.quant_recipe("quantize-dynamic", mp, weights="int8",
                                                            activations="uint8 per batch")],
                      self.teacher.config, self.n_params, "int8 dynamic",
                      "all-MiniLM-L6-v2, dynamic INT8 per-channel ONNX",
                      note=f"{len(mp.excluded)} MatMul fp32" if mp.excluded else "")

    def quantize_static(self) -> None:
        from headrace.models.builtin.corpus import sample
        from headrace.models.compress import quantize as Q

        o = self.opts
        cal = Q.text_feeds(self.tok, sample(self.corpus.train, o.calibration, seed=o.seed + 2), INPUTS, batch_size=16)
        cache = self.tmp / "calibration.json"

        def sfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_static_int8(s, d, cal, nodes_to_quantize=nq, nodes_to_exclude=ne, cache_path=cache)

        nodes = Q.weight_nodes(self.base_onnx, Q.STATIC_OPS)
        mp = Q.mixed_precision(self.base_onnx, self.tmp / "int8_static.onnx", sfn, self.scorer(self.base_onnx),
                               o.budget, nodes=nodes, progress=o.progress)
        self.res.details["quantize-static"] = mp.to_dict()
        self.add_onnx("minilm-int8-static", mp.path, "int8" if not mp.excluded else "int8_mixed",
                      [*self.base_recipe, self.quant_recipe("quantize-static", mp, format="QDQ", calibration="minmax",
                                                            calibration_sentences=o.calibration)],
                      self.teacher.config, self.n_params, "int8 static QDQ",
                      "all-MiniLM-L6-v2, static QDQ INT8 ONNX (mixed)",
                      note=f"{len(mp.excluded)}/{len(nodes)} MatMul fp32")

    def prune(self) -> None:
        import torch

        from headrace.models.builtin.corpus import sample
        from headrace.models.compress import distill as D
        from headrace.models.compress.export import export_minilm
        from headrace.models.compress.prune import PruneSpec, prune_minilm

        o = self.opts
        imp = [(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])) for b in
               _text_batches(self.tok, sample(self.corpus.train, o.calibration, seed=o.seed + 3), 32, bucket=True,
                             seed=o.seed)]
        spec = PruneSpec(head_fraction=o.prune_heads, ffn_fraction=o.prune_ffn)
        pruned, prep = prune_minilm(self.teacher, imp, spec)
        recipe = [{"step": "prune", "params": prep.to_dict()}]
        if o.prune_recover_steps:
            cfg = D.DistillConfig(steps=o.prune_recover_steps, lr=1e-4, warmup_steps=30, seed=o.seed)
            run = D.DistillRun(self.teacher, self.tok, self.corpus.train, _run_dir(o, "prune-recover", cfg, spec),
                               cfg, progress=o.progress, targets=self.teacher_targets())
            pruned, dres = D.distill(pruned, run)
            recipe.append({"step": "distill", "params": {**dres.to_dict(), "purpose": "recover after pruning"}})
            self.res.details["prune-recover"] = dres.to_dict()
        self.res.details["prune"] = prep.to_dict()
        p_onnx = self.tmp / "pruned.onnx"
        export_minilm(pruned, p_onnx, tokenizer=self.tok)
        p_params = pruned.num_parameters()
        self.add_onnx("minilm-pruned", p_onnx, "fp32", [*recipe, *self.base_recipe], pruned.config, p_params,
                      "pruned fp32", "all-MiniLM-L6-v2, structurally pruned, fp32 ONNX",
                      note=f"heads {sum(prep.heads_after)}/{sum(prep.heads_before)}, ffn "
                           f"{sum(prep.ffn_after)}/{sum(prep.ffn_before)}")
        mp = self.dynamic_int8(p_onnx, self.tmp / "pruned_int8.onnx")
        self.add_onnx("minilm-pruned-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                      [*recipe, *self.base_recipe, self.quant_recipe("quantize-dynamic", mp)], pruned.config,
                      p_params, "pruned int8", "all-MiniLM-L6-v2, pruned + dynamic INT8 ONNX")

    def distill(self) -> None:
        from headrace.models.compress import distill as D
        from headrace.models.compress.export import export_minilm

        o = self.opts
        layers = tuple(o.distill_layers)
        cfg = D.DistillConfig(steps=o.distill_steps, lr=o.distill_lr, seed=o.seed)
        run = D.DistillRun(self.teacher, self.tok, self.corpus.train,
                           _run_dir(o, f"distill-{'-'.join(map(str, layers))}", cfg, None), cfg,
                           progress=o.progress, targets=self.teacher_targets())
        student, dres = D.distill(D.init_student(layers), run)
        self.res.details["distill"] = dres.to_dict()
        s_onnx = self.tmp / "student.onnx"
        export_minilm(student, s_onnx, tokenizer=self.tok)
        recipe = [{"step": "distill", "params": {**dres.to_dict(), "layers": list(layers)}}]
        s_params = student.num_parameters()
        self.add_onnx("minilm-student", s_onnx, "fp32", [*recipe, *self.base_recipe], student.config, s_params,
                      f"student {len(layers)}L fp32", f"{len(layers)}-layer student distilled from all-MiniLM-L6-v2")
        mp = self.dynamic_int8(s_onnx, self.tmp / "student_int8.onnx")
        self.add_onnx("minilm-student-int8", mp.path, "int8" if not mp.excluded else "int8_mixed",
                      [*recipe, *self.base_recipe, self.quant_recipe("quantize-dynamic", mp)],
                      student.config, s_params, f"student {len(layers)}L int8",
                      f"{len(layers)}-layer distilled student, dynamic INT8 per-channel")

    def fp16(self) -> None:
        from headrace.models.compress import quantize as Q

        fp16 = Q.convert_fp16(self.base_onnx, self.tmp / "fp16.onnx")
        self.add_onnx("minilm-fp16", fp16, "fp16",
                      [*self.base_recipe, {"step": "fp16", "params": {"keep_io_types": True}}], self.teacher.config,
                      self.n_params, "fp16 onnx", "all-MiniLM-L6-v2, fp16 ONNX for GPU execution providers",
                      note="GPU target: CPU run checks fidelity only", bench_speed=False)

    def tensorrt(self) -> None:
        from headrace.models.compress.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            self.res.skipped["tensorrt"] = why
            return
        _tensorrt_steps(self.opts, self.repo, self.tmp, self.plain_export(), self.tok, self.corpus, self.teacher,
                        self.res, self.entries, self.base_recipe)

    def bench(self) -> None:
        from headrace.models.builtin.corpus import sample
        from headrace.models.compress import report as R
        from headrace.models.compress.fidelity import embedding_fidelity

        o, corpus = self.opts, self.corpus
        held = list(corpus.held_out) if not o.held_out else sample(corpus.held_out, o.held_out, seed=o.seed)
        fid_batches = _text_batches(self.tok, held, 32, bucket=True, seed=o.seed)
        pool = sample(corpus.held_out, SPEED_POOL, seed=o.seed + 4)
        by_size = {b: _text_batches(self.tok, pool if b > 1 else pool[:64], b, bucket=True, seed=o.seed)
                   for b in R.BATCH_SIZES}
        arts = _artifacts(self.entries, self.res)
        ref = R.outputs_of(arts[0], fid_batches)
        times = R.measure_speed(arts, by_size, min_passes=5, progress=o.progress)
        rows = []
        for a in arts:
            row = R.Row(a.label, a.backend, a.precision, a.params, a.size_bytes, repo_ref=a.repo_ref, note=a.note)
            if a.label in times:
                R.summarize_speed(row, times[a.label], R.pass_rows(by_size))
            row.fidelity = embedding_fidelity(ref, R.outputs_of(a, fid_batches)).to_dict()
            rows.append(row)
        R.add_speedups(rows, "fp32 torch")
        ctx = R.bench_context(o.threads, "fp32 torch (all-MiniLM-L6-v2, in-process)",
                              {"held_out_sentences": len(held), "corpus": corpus.describe(),
                               "bucketed_batches": True, "speed_pool_sentences": SPEED_POOL})
        R.record(self.repo, rows, ctx)
        self.res.rows = rows
        self.res.details["bench"] = ctx


# step name -> method of _MiniLMRun, run in pipeline order ("export" is the base build).
STEPS: dict[str, Callable[[_MiniLMRun], None]] = {
    "quantize-dynamic": _MiniLMRun.quantize_dynamic, "quantize-static": _MiniLMRun.quantize_static,
    "prune": _MiniLMRun.prune, "distill": _MiniLMRun.distill, "fp16": _MiniLMRun.fp16,
    "tensorrt": _MiniLMRun.tensorrt,
}


def run_minilm(opts: CompressOptions, repo: Any, tmp: Path) -> CompressResult:
    """Every requested MiniLM step (:data:`STEPS`), then the side-by-side report."""
    return run_steps(_MiniLMRun(opts, repo, tmp), STEPS, opts)


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
