"""The compression steps for the digits MLP (called by :mod:`.pipeline`).

Unlike MiniLM this model has labels, so every artifact is judged by test accuracy; its
fidelity budget is an accuracy drop of at most ``1 - fidelity_budget`` against fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headrace.models.compress.pipeline import CompressOptions, CompressResult

log = logging.getLogger(__name__)


def run_digits(opts: CompressOptions, repo: Any, tmp: Path) -> CompressResult:
    import torch

    from headrace.models.builtin import digits as DG
    from headrace.models.compress import quantize as Q
    from headrace.models.compress import report as R
    from headrace.models.compress.fidelity import classifier_fidelity
    from headrace.models.compress.prune import prune_mlp
    from headrace.models.compress.tensorrt import tensorrt_available

    torch.set_num_threads(opts.threads)
    steps = opts.ordered_steps()
    res = CompressResult(model="digits")
    data = DG.load_data(seed=opts.seed)
    model, trep = DG.train(data, seed=opts.seed)
    res.details["train"] = trep.to_dict()
    n_params = model.num_parameters()
    fp32 = tmp / "digits.onnx"
    exp = DG.export(model, fp32)
    train_recipe = {"step": "train", "params": trep.to_dict()}
    export_recipe = {"step": "export", "params": {"exporter": exp.exporter, "opset": exp.opset,
                                                  "max_abs_diff": exp.max_abs_diff}}
    base = DG.add_to_repository(repo, model, onnx_path=fp32, recipe=[train_recipe, export_recipe],
                                measured={"size_bytes": fp32.stat().st_size, "params": n_params,
                                          "test_accuracy": trep.test_accuracy})
    res.artifacts.append(f"{base.name}/{base.version}")
    base_onnx = repo.file_path(base, "model.onnx")
    entries: list[tuple[str, str, str, Any, int, int, tuple[str, str] | None, str, bool]] = [
        ("fp32 torch", "torch", "fp32", lambda: R.torch_runner(model, opts.threads), n_params,
         DG.save(model, tmp / "torch")[0].stat().st_size, None, "reference", True),
        ("fp32 onnx", "onnxruntime", "fp32", lambda: R.ort_runner(base_onnx, opts.threads), n_params,
         base_onnx.stat().st_size, (base.name, base.version), "", True),
    ]
    # The budget search scores on training images; test images are only for the report.
    scan_x = data.x_train[: max(opts.scan, 256)]
    scan_y = data.y_train[: len(scan_x)]
    ref_acc = float((DG.onnx_logits(base_onnx, scan_x).argmax(1) == scan_y).mean())
    threshold = ref_acc - (1.0 - opts.budget)

    def score(path: Path) -> float:
        return float((DG.onnx_logits(path, scan_x).argmax(1) == scan_y).mean())

    def add(name: str, net: Any, onnx_path: Path, precision: str, recipe: list[dict[str, Any]], label: str,
            note: str = "", bench_speed: bool = True) -> None:
        m = DG.add_to_repository(repo, net, name=name, onnx_path=onnx_path, precision=precision,
                                 recipe=[train_recipe, export_recipe, *recipe],
                                 measured={"size_bytes": onnx_path.stat().st_size, "params": net.num_parameters()})
        res.artifacts.append(f"{m.name}/{m.version}")
        stored = repo.file_path(m, "model.onnx")
        entries.append((label, "onnxruntime", precision, lambda: R.ort_runner(stored, opts.threads),
                        net.num_parameters(), stored.stat().st_size, (m.name, m.version), note, bench_speed))

    if "quantize-dynamic" in steps:
        def qfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_dynamic_int8(s, d, per_channel=True, nodes_to_quantize=nq, nodes_to_exclude=ne)

        mp = Q.mixed_precision(base_onnx, tmp / "int8.onnx", qfn, score, threshold, progress=opts.progress)
        res.details["quantize-dynamic"] = mp.to_dict()
        add("digits-int8", model, mp.path, "int8" if not mp.excluded else "int8_mixed",
            [{"step": "quantize-dynamic", "params": {"per_channel": True, "fp32_nodes": list(mp.excluded)}}],
            "int8 dynamic")

    if "quantize-static" in steps:
        cal = [{DG.INPUT_NAME: data.x_train[i:i + 64]} for i in range(0, 512, 64)]

        def sfn(s: Path, d: Path, nq: Sequence[str] | None, ne: Sequence[str]) -> None:
            Q.quantize_static_int8(s, d, cal, nodes_to_quantize=nq, nodes_to_exclude=ne,
                                   cache_path=tmp / "calibration.json")

        mp = Q.mixed_precision(base_onnx, tmp / "int8_static.onnx", sfn, score, threshold,
                               nodes=Q.weight_nodes(base_onnx, Q.STATIC_OPS), progress=opts.progress)
        res.details["quantize-static"] = mp.to_dict()
        add("digits-int8-static", model, mp.path, "int8" if not mp.excluded else "int8_mixed",
            [{"step": "quantize-static", "params": {"format": "QDQ", "fp32_nodes": list(mp.excluded)}}],
            "int8 static QDQ")

    if "prune" in steps:
        fraction = opts.prune_ffn
        pruned, prep = prune_mlp(model, data.x_train, fraction)
        acc_before = DG.accuracy(pruned, data.x_test, data.y_test)
        # A few epochs of fine-tuning on the training split recover what slicing lost.
        pruned, ft = DG.train(data, seed=opts.seed, epochs=10, lr=5e-4, model=pruned)
        res.details["prune"] = {**prep.to_dict(), "test_accuracy_before_finetune": acc_before,
                                "finetune": ft.to_dict()}
        p_onnx = tmp / "pruned.onnx"
        DG.export(pruned, p_onnx)
        add("digits-pruned", pruned, p_onnx, "fp32",
            [{"step": "prune", "params": prep.to_dict()}, {"step": "finetune", "params": ft.to_dict()}],
            "pruned fp32", note=f"hidden {list(prep.ffn_before)} -> {list(prep.ffn_after)}")
        p_int8 = tmp / "pruned_int8.onnx"
        Q.quantize_dynamic_int8(p_onnx, p_int8)
        add("digits-pruned-int8", pruned, p_int8, "int8",
            [{"step": "prune", "params": prep.to_dict()}, {"step": "quantize-dynamic", "params": {"per_channel": True}}],
            "pruned int8")

    if "distill" in steps:
        res.skipped["distill"] = "not applied to digits: a 2-hidden-layer MLP has no shallower student worth making"

    if "fp16" in steps:
        fp16 = Q.convert_fp16(base_onnx, tmp / "fp16.onnx")
        add("digits-fp16", model, fp16, "fp16", [{"step": "fp16", "params": {"keep_io_types": True}}],
            "fp16 onnx", note="GPU target: CPU run checks accuracy only", bench_speed=False)

    if "tensorrt" in steps:
        ok, why = tensorrt_available()
        if not ok:
            res.skipped["tensorrt"] = why
        else:
            from headrace.models.compress import tensorrt as T

            rep = T.build_engine(repo.file_path(repo.load_manifest("digits-fp16"), "model.onnx")
                                 if "fp16" in steps else Q.convert_fp16(base_onnx, tmp / "fp16.onnx"),
                                 tmp / "fp16.plan", T.tensor_profile(DG.INPUT_NAME, (DG.NUM_PIXELS,)))
            inputs, outputs = DG.signature()
            m = repo.add("digits-trt-fp16", {"model.plan": Path(rep.path)}, format="tensorrt", backend="tensorrt",
                         precision="fp16", inputs=inputs, outputs=outputs, source=DG.SOURCE,
                         recipe=[train_recipe, export_recipe, {"step": "tensorrt", "params": rep.to_dict()}],
                         measured={"size_bytes": rep.size_bytes, "params": n_params},
                         description="digits MLP, TensorRT fp16 engine")
            res.artifacts.append(f"{m.name}/{m.version}")
            plan = repo.file_path(m, "model.plan")

            def make() -> Any:
                runner = T.EngineRunner(plan)
                return lambda batch: runner.run(batch)[DG.OUTPUT_NAME]

            entries.append(("trt fp16", "tensorrt", "fp16", make, n_params, rep.size_bytes, (m.name, m.version),
                            f"GPU {rep.device}", True))

    if opts.bench:
        x = data.x_test
        by_size = {b: [{DG.INPUT_NAME: x[i:i + b]} for i in range(0, min(len(x), 64 * b), b) if len(x[i:i + b]) == b]
                   for b in R.BATCH_SIZES}
        arts = []
        for label, backend, precision, make_run, params, size, ref, note, bench_speed in entries:
            try:
                arts.append(R.Artifact(label, backend, precision, make_run(), params, size, ref, note, bench_speed))
            except Exception as ex:  # noqa: BLE001 - report what cannot run here and go on
                res.skipped[f"bench {label}"] = f"cannot run on this machine: {ex}"
        full = [{DG.INPUT_NAME: x[i:i + 64]} for i in range(0, len(x), 64)]
        ref_logits = R.outputs_of(arts[0], full)
        times = R.measure_speed(arts, by_size, min_passes=5, min_time_s=0.5, progress=opts.progress)
        rows = []
        for a in arts:
            row = R.Row(a.label, a.backend, a.precision, a.params, a.size_bytes, repo_ref=a.repo_ref, note=a.note)
            if a.label in times:
                R.summarize_speed(row, times[a.label], R.pass_rows(by_size))
            row.fidelity = classifier_fidelity(R.outputs_of(a, full), data.y_test, ref_logits).to_dict()
            rows.append(row)
        R.add_speedups(rows, "fp32 torch")
        ctx = R.bench_context(opts.threads, "fp32 torch digits MLP", {"test_samples": int(len(x)),
                                                                      "split_seed": opts.seed})
        R.record(repo, rows, ctx)
        res.rows = rows
        res.details["bench"] = ctx
    return res
