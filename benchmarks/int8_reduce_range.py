"""MiniLM dynamic INT8 with 8-bit vs 7-bit weights (ONNX Runtime's ``reduce_range``) on this
CPU: fidelity to the fp32 graph and speed, side by side in one run.

On an x86 CPU without VNNI, ONNX Runtime's uint8 x int8 kernels add pairs of products in
int16 and saturate with 8-bit weights; ``headrace.models.compress.quantize`` then picks 7-bit
weights by itself (``cpu_needs_reduce_range``). This prints what either choice gives here:
mean/min cosine to the fp32 graph's embeddings on held-out sentences of the offline corpus,
and sentences/s at batch 32 (same threads, the three graphs taking turns).

    .venv/bin/python -m benchmarks.int8_reduce_range [--sentences 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.lib.output import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=256, help="held-out sentences measured")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="speed passes per graph (median)")
    ap.add_argument("--repo", default="runs/int8-reduce-range/model_repo")
    ap.add_argument("--json", default="runs/int8_reduce_range.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    from benchmarks.lib.models import ensure_minilm_fp32
    from headrace.models.builtin.corpus import load_corpus, sample
    from headrace.models.compress.fidelity import embedding_fidelity
    from headrace.models.compress.quantize import cpu_needs_reduce_range, quantize_dynamic_int8
    from headrace.models.repository.store import ModelRepository
    from headrace.models.tokenizer import encode_batch, load_tokenizer

    args = parse_args(argv)
    repo = ModelRepository(args.repo)
    fp32 = ensure_minilm_fp32(repo)
    src = repo.file_path(fp32, fp32.model_file)
    tok = load_tokenizer(repo.file_path(fp32, str(fp32.extra.get("tokenizer", "tokenizer.json"))))
    texts = sample(list(load_corpus().held_out), args.sentences, seed=0)
    batches = [encode_batch(tok, texts[i:i + 32]) for i in range(0, len(texts), 32)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp32": src,
                  "int8, 8-bit weights": quantize_dynamic_int8(src, Path(tmp) / "w8.onnx", reduce_range=False),
                  "int8, 7-bit weights": quantize_dynamic_int8(src, Path(tmp) / "w7.onnx", reduce_range=True)}
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in graphs.items()}
        names = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}

        def run(key: str, ids: Any, mask: Any) -> Any:
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            out = sessions[key].run(None, {n: v for n, v in feed.items() if n in names[key]})[0]
            return out if out.ndim == 2 else (out * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

        emb = {k: np.concatenate([run(k, ids, mask) for ids, mask in batches]) for k in sessions}
        passes: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k in sessions:  # the graphs take turns: drifts of the machine hit all of them
                t0 = time.perf_counter()
                for ids, mask in batches:
                    run(k, ids, mask)
                passes[k].append(len(texts) / (time.perf_counter() - t0))
    rows = []
    for k in sessions:
        fid = embedding_fidelity(emb["fp32"], emb[k])
        rows.append({"graph": k, "mean_cosine": fid.mean_cosine, "min_cosine": fid.min_cosine,
                     "overlap_at_10": fid.overlap_at_k, "sentences_per_s": float(np.median(passes[k]))})
    table = Table(title=f"MiniLM dynamic INT8 on this CPU (cpu_needs_reduce_range: {cpu_needs_reduce_range()}), "
                        f"{len(texts)} held-out sentences, batch 32, {args.threads} threads")
    for col in ("graph", "mean cos", "min cos", "overlap@10", "sentences/s"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for r in rows:
        table.add_row(r["graph"], f"{r['mean_cosine']:.4f}", f"{r['min_cosine']:.4f}", f"{r['overlap_at_10']:.3f}",
                      f"{r['sentences_per_s']:.0f}")
    Console().print(table)
    write_json(args.json, {"benchmark": "int8_reduce_range", "needs_reduce_range": cpu_needs_reduce_range(),
                           "rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
