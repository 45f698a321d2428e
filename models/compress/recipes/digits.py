"""The compression steps for the digits MLP (called by :mod:`.pipeline`).

Unlike MiniLM this model has labels, so every artifact is judged by test accuracy; its
fidelity budget is an accuracy drop of at most ``1 - fidelity_budget`` against fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from headrace.models.compress.pipeline import CompressOptions, CompressResult
from headrace.models.compress.recipes.common import _artifacts, _Entry, run_steps

log = logging.getLogger(__name__)


class _DigitsRun:
    """State shared by the digits steps of one run; each step is one method (:data:`STEPS`)."""

    def __init__(self, opts: CompressOptions, repo: Any, tmp: Path) -> None:
        import torch

        from headrace.models.builtin import digits as DG
        from headrace.models.compress import report as R

        torch.set_num_threads(opts.threads)
        self.opts, self.repo, self.tmp = opts, repo, tmp
        self.res = CompressResult(model="digits")
        self.data = DG.load_data(seed=opts.seed)
        self.model, trep = DG.train(self.data, seed=opts.seed)
        self.res.details["train"] = trep.to_dict()
        n_params = self.model.num_parameters()
        fp32 = tmp / "digits.onnx"
        exp = DG.export(self.model, fp32)
        self.train_recipe = {"step": "train", "params": trep.to_dict()}
        self.export_recipe = {"step": "export", "params": {"exporter": exp.exporter, "opset": exp.opset,
                                                           "max_abs_diff": exp.max_abs_diff}}
        base = DG.add_to_repository(repo, self.model, onnx_path=fp32, recipe=[self.train_recipe, self.export_recipe],
                                    measured={"size_bytes": fp32.stat().st_size, "params": n_params,
                                              "test_accuracy": trep.test_accuracy})
        self.res.artifacts.append(f"{base.name}/{base.version}")
        self.base_onnx = repo.file_path(base, "model.onnx")
        self.entries: list[_Entry] = [
            _Entry("fp32 torch", "torch", "fp32", lambda: R.torch_runner(self.model, opts.threads), n_params,
                   DG.save(self.model, tmp / "torch")[0].stat().st_size, None, "reference", True),
            _Entry("fp32 onnx", "onnxruntime", "fp32", lambda: R.ort_runner(self.base_onnx, opts.threads), n_params,
                   self.base_onnx.stat().st_size, (base.name, base.version), "", True),
        ]
        # The budget search scores on training images; test images are only for the report.
        self.scan_x = self.data.x_train[: max(opts.scan, 256)]
        self.scan_y = self.data.y_train[: len(self.scan_x)]
        ref_acc = float((DG.onnx_logits(self.base_onnx, self.scan_x).argmax(1) == self.scan_y).mean())
        self.threshold = ref_acc - (1.0 - opts.budget)

    def score(self, path: Path) -> float:
        from headrace.models.builtin import digits as DG

        return float((DG.onnx_logits(path, self.scan_x).argmax(1) == self.scan_y).mean())

    def add(self, name: str, net: Any, onnx_path: Path, precision: str, recipe: list[dict[str, Any]], label: str,
            note: str = "", bench_speed: bool = True) -> None:
        from headrace.models.builtin import digits as DG
        from headrace.models.compress import report as R

        m = DG.add_to_repository(self.repo, net, name=name, onnx_path=onnx_path, precision=precision,
                                 recipe=[self.train_recipe, self.export_recipe, *recipe],
                                 measured={"size_bytes": onnx_path.stat().st_size, "params": net.num_parameters()})
        self.res.artifacts.append(f"{m.name}/{m.version}")
        stored = self.repo.file_path(m, "model.onnx")
        self.entries.append(_Entry(label, "onnxruntime", precision, lambda: R.ort_runner(stored, self.opts.threads),
                                   net.num_parameters(), stored.stat().st_size, (m.name, m.version), note,
                                   bench_speed))

    def quantize_dynamic(self) -> None:
        from headrace.models.compress import quantize as Q

        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_dynamic_int8(s, d, per_channel=True, nodes_to_quantize=nq, nodes_to_exclude=ne)

        mp = Q.mixed_precision(self.base_onnx, self.tmp / "int8.onnx", qfn, self.score, self.threshold,
                               progress=self.opts.progress)
        self.res.details["quantize-dynamic"] = mp.to_dict()
        self.add("digits-int8", self.model, mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [{"step": "quantize-dynamic", "params": {"per_channel": True, "fp32_nodes": list(mp.excluded)}}],
                 "int8 dynamic")

    def quantize_static(self) -> None:
        from headrace.models.builtin import digits as DG
        from headrace.models.compress import quantize as Q

        cal = [{DG.INPUT_NAME: self.data.x_train[i:i + 64]} for i in range(0, 512, 64)]

        def sfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_static_int8(s, d, cal, nodes_to_quantize=nq, nodes_to_exclude=ne,
                                   cache_path=self.tmp / "calibration.json")

        mp = Q.mixed_precision(self.base_onnx, self.tmp / "int8_static.onnx", sfn, self.score, self.threshold,
                               nodes=Q.weight_nodes(self.base_onnx, Q.STATIC_OPS), progress=self.opts.progress)
        self.res.details["quantize-static"] = mp.to_dict()
        self.add("digits-int8-static", self.model, mp.path, "int8" if not mp.excluded else "int8_mixed",
                 [{"step": "quantize-static", "params": {"format": "QDQ", "fp32_nodes": list(mp.excluded)}}],
                 "int8 static QDQ")

    def prune(self) -> None:
        from headrace.models.builtin import digits as DG
        from headrace.models.compress import quantize as Q
        from headrace.models.compress.prune import prune_mlp

        pruned, prep = prune_mlp(self.model, self.data.x_train, self.opts.prune_ffn)
        acc_before = DG.accuracy(pruned, self.data.x_test, self.data.y_test)
        # A few epochs of fine-tuning on the training split recover what slicing lost.
        pruned, ft = DG.train(self.data, seed=self.opts.seed, epochs=10, lr=5e-4, model=pruned)
        self.res.details["prune"] = {**prep.to_dict(), "test_accuracy_before_finetune": acc_before,
                                     "finetune": ft.to_dict()}
        p_onnx = self.tmp / "pruned.onnx"
        DG.export(pruned, p_onnx)
        self.add("digits-pruned", pruned, p_onnx, "fp32",
                 [{"step": "prune", "params": prep.to_dict()}, {"step": "finetune", "params": ft.to_dict()}],
                 "pruned fp32", note=f"hidden {list(prep.ffn_before)} -> {list(prep.ffn_after)}")
        p_int8 = self.tmp / "pruned_int8.onnx"
        Q.quantize_dynamic_int8(p_onnx, p_int8)
        self.add("digits-pruned-int8", pruned, p_int8, "int8",
                 [{"step": "prune", "params": prep.to_dict()},
                  {"step": "quantize-dynamic", "params": {"per_channel": True}}], "pruned int8")

    def distill(self) -> None:
        self.res.skipped["distill"] = "not applied to digits: a 2-hidden-layer MLP has no shallower student worth making"

    def fp16(self) -> None:
        from headrace.models.compress import quantize as Q

        fp16 = Q.convert_fp16(self.base_onnx, self.tmp / "fp16.onnx")
        self.add("digits-fp16", self.model, fp16, "fp16", [{"step": "fp16", "params": {"keep_io_types": True}}],
                 "fp16 onnx", note="GPU target: CPU run checks accuracy only", bench_speed=False)

    def tensorrt(self) -> None:
        from headrace.models.compress.tensorrt import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            self.res.skipped["tensorrt"] = why
            return
        self._tensorrt_engine()

    def _tensorrt_engine(self) -> None:
        from headrace.models.builtin import digits as DG
        from headrace.models.compress import quantize as Q
        from headrace.models.compress import tensorrt as T

        fp16 = (self.repo.file_path(self.repo.load_manifest("digits-fp16"), "model.onnx")
                if "fp16" in self.opts.steps else Q.convert_fp16(self.base_onnx, self.tmp / "fp16.onnx"))
        rep = T.build_engine(fp16, self.tmp / "fp16.plan", T.tensor_profile(DG.INPUT_NAME, (DG.NUM_PIXELS,)))
        inputs, outputs = DG.signature()
        m = self.repo.add("digits-trt-fp16", {"model.plan": Path(rep.path)}, format="tensorrt", backend="tensorrt",
                          precision="fp16", inputs=inputs, outputs=outputs, source=DG.SOURCE,
                          recipe=[self.train_recipe, self.export_recipe, {"step": "tensorrt", "params": rep.to_dict()}],
                          measured={"size_bytes": rep.size_bytes, "params": self.model.num_parameters()},
                          description="digits MLP, TensorRT fp16 engine")
        self.res.artifacts.append(f"{m.name}/{m.version}")
        plan = self.repo.file_path(m, "model.plan")

        def make() -> Any:
            runner = T.EngineRunner(plan)
            return lambda batch: runner.run(batch)[DG.OUTPUT_NAME]

        self.entries.append(_Entry("trt fp16", "tensorrt", "fp16", make, self.model.num_parameters(), rep.size_bytes,
                                   (m.name, m.version), f"GPU {rep.device}", True))

    def bench(self) -> None:
        from headrace.models.builtin import digits as DG
        from headrace.models.compress import report as R
        from headrace.models.compress.fidelity import classifier_fidelity

        x, o = self.data.x_test, self.opts
        by_size = {b: [{DG.INPUT_NAME: x[i:i + b]} for i in range(0, min(len(x), 64 * b), b) if len(x[i:i + b]) == b]
                   for b in R.BATCH_SIZES}
        arts = _artifacts(self.entries, self.res)
        full = [{DG.INPUT_NAME: x[i:i + 64]} for i in range(0, len(x), 64)]
        ref_logits = R.outputs_of(arts[0], full)
        times = R.measure_speed(arts, by_size, min_passes=5, min_time_s=0.5, progress=o.progress)
        rows = []
        for a in arts:
            row = R.Row(a.label, a.backend, a.precision, a.params, a.size_bytes, repo_ref=a.repo_ref, note=a.note)
            if a.label in times:
                R.summarize_speed(row, times[a.label], R.pass_rows(by_size))
            row.fidelity = classifier_fidelity(R.outputs_of(a, full), self.data.y_test, ref_logits).to_dict()
            rows.append(row)
        R.add_speedups(rows, "fp32 torch")
        ctx = R.bench_context(o.threads, "fp32 torch digits MLP", {"test_samples": int(len(x)), "split_seed": o.seed})
        R.record(self.repo, rows, ctx)
        self.res.rows = rows
        self.res.details["bench"] = ctx


# step name -> method of _DigitsRun, run in pipeline order ("export" is the base build).
STEPS: dict[str, Callable[[_DigitsRun], None]] = {
    "quantize-dynamic": _DigitsRun.quantize_dynamic, "quantize-static": _DigitsRun.quantize_static,
    "prune": _DigitsRun.prune, "distill": _DigitsRun.distill, "fp16": _DigitsRun.fp16,
    "tensorrt": _DigitsRun.tensorrt,
}


def run_digits(opts: CompressOptions, repo: Any, tmp: Path) -> CompressResult:
    """Every requested digits step (:data:`STEPS`), then the side-by-side report."""
    return run_steps(_DigitsRun(opts, repo, tmp), STEPS, opts)
