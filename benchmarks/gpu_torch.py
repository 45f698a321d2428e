"""MiniLM through the torch servable on a CUDA GPU: fp32 vs fp16, against the CPU fp32 run.

Exercises the real serving path (repository entry -> ``load_servable`` -> ``TorchServable``
on ``cuda``) and prints throughput at several batch sizes and fidelity (cosine) of each GPU
run against the CPU fp32 embeddings of the same weights.

    python -m benchmarks.gpu_torch --weights DIR [--n 512] [--json OUT]

``DIR`` holds ``model.safetensors`` (fp32 or fp16 weights in the Hugging Face layout),
``config.json`` and ``tokenizer.json``; by default the packaged all-MiniLM-L6-v2.
Skips (exit 0, with the reason) when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _throughput(servable: Any, reqs: list[Any], batch: int, sync: Any) -> float:
    servable.infer(reqs[:batch])  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(reqs) - batch + 1, batch):
        servable.infer(reqs[start:start + batch])
        done += batch
    sync()
    return done / (time.perf_counter() - t0)


def main() -> int:
    import torch

    from headrace.client.protocol import Envelope, Request
    from headrace.models.builtin.build import build_minilm_torch
    from headrace.models.builtin.corpus import load_corpus, sample
    from headrace.models.repository.store import ModelRepository
    from headrace.workers.backends import load_servable
    from headrace.workers.settings import WorkerSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="folder with model.safetensors, config.json, tokenizer.json")
    ap.add_argument("--n", type=int, default=512, help="held-out sentences to embed")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--device", default="cuda", help="'cpu' only for a dry run of this script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device; this benchmark measures the GPU path of the torch servable")
        return 0

    sentences = sample(load_corpus().held_out, args.n, seed=0)
    reqs = [Request(Envelope(f"r{i}", "unused"), text=t) for i, t in enumerate(sentences)]
    with tempfile.TemporaryDirectory() as tmp:
        repo = ModelRepository(tmp)
        fp32 = build_minilm_torch(repo, model_path=args.weights)
        src = repo.path(fp32.name, fp32.version)
        repo.add("minilm-torch-fp16", {f.path: src / f.path for f in fp32.files}, format="torch",
                 inputs=fp32.inputs, outputs=fp32.outputs, precision="fp16", backend="torch",
                 preprocess=fp32.preprocess, postprocess=fp32.postprocess, model_file=fp32.model_file,
                 source=fp32.source, recipe=[{"step": "fp16", "params": {}}], extra=fp32.extra)

        def load(name: str, device: str) -> Any:
            return load_servable(WorkerSettings(model=name, model_repo=tmp, backend="torch"), device=device)

        cpu = load(fp32.name, "cpu")
        ref = np.stack([o["embeddings"] for o in cpu.infer(reqs)])
        report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "none (dry run)", "n": len(reqs), "runs": {}}
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        for label, name in ((f"{args.device} fp32", fp32.name), (f"{args.device} fp16", "minilm-torch-fp16")):
            s = load(name, args.device)
            emb = np.stack([o["embeddings"] for o in s.infer(reqs)])
            cos = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            tput = {b: _throughput(s, reqs, b, sync) for b in map(int, args.batches.split(","))}
            report["runs"][label] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                                     "throughput": tput}
            s.close()
    print(f"GPU: {report['gpu']}  sentences: {report['n']} (held-out corpus)")
    print(f"{'run':<10} {'mean cos':>9} {'min cos':>9}  " + "  ".join(f"b={b:<4} sent/s" for b in args.batches.split(",")))
    for label, r in report["runs"].items():
        print(f"{label:<10} {r['mean_cos']:>9.6f} {r['min_cos']:>9.6f}  "
              + "  ".join(f"{v:>13.0f}" for v in r["throughput"].values()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
