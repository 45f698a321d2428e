"""MiniLM to INT8 TFLite through ``headrace compress --steps tflite``: the plain (unfused)
export is added as ``minilm-plain``, frozen to one sentence of 256 tokens (the tokenizer's
length; onnx2tf mis-converts symbolic shapes, see ``headrace.models.compress.freeze``),
converted by onnx2tf with dynamic-range INT8, run in LiteRT, measured against the fp32 ONNX
graph on 400 held-out corpus sentences and gated at mean cosine 0.99. The published entry is
then measured on the three held-out corpora of the out-of-domain benchmark (Python docs, legal
text, scientific prose) against the fp32 ONNX graph.

    .venv/bin/python -m benchmarks.compress_minilm_tflite [dynamic]
    .venv/bin/python -m benchmarks.compress_minilm_tflite serve [REDIS_URL]

``serve`` starts a LiteRT worker process on the newest published entry and sends it 64
held-out sentences through Redis (default ``redis://127.0.0.1:6379/0``), comparing the
answers with the fp32 ONNX graph.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.compress_minilm_ood import corpora, embed
from headrace.models.builtin.build import build_minilm
from headrace.models.builtin.corpus import load_corpus, sample
from headrace.models.compress.anymodel import AnyModelOptions, run_any
from headrace.models.compress.steps import TfliteOptions
from headrace.models.repository.store import ModelRepository

W = Path("runs/compress-minilm-tflite")


def across_corpora(repo: ModelRepository, published: str) -> None:
    """Mean/min cosine, overlap@10 and Spearman of the LiteRT entry on each corpus."""
    from headrace.models.compress import report as R
    from headrace.models.compress.edge import litert_run_all
    from headrace.models.compress.fidelity import embedding_fidelity
    from headrace.models.tokenizer import load_tokenizer

    m = repo.load_manifest(*published.split("/"))
    fp32 = R.ort_runner(repo.file_path(repo.load_manifest("minilm-plain"), "model.onnx"), 2)
    lite = litert_run_all(repo.file_path(m, m.model_file), 2, m.extra)

    def run_lite(feed: dict[str, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(lite(feed)["embeddings"])

    tok = load_tokenizer()
    print("| corpus | sentences | mean cos | min cos | overlap@10 | spearman |\n|---|---|---|---|---|---|")
    for label, sentences in corpora(400, seed=2).items():
        f = embedding_fidelity(embed(fp32, tok, sentences), embed(run_lite, tok, sentences))
        print(f"| {label} | {f.n} | {f.mean_cosine:.4f} | {f.min_cosine:.4f} | {f.overlap_at_k:.3f} | {f.spearman:.4f} |")


def serve(redis_url: str) -> int:
    """A LiteRT worker on the published entry answers sentences through the queue."""
    import subprocess

    from headrace.client import Client
    from headrace.models.compress import report as R
    from headrace.models.compress.fidelity import cosine_per_row
    from headrace.models.tokenizer import load_tokenizer

    repo = ModelRepository(W / "model_repo")
    m = repo.load_manifest("minilm-plain-tflite-int8-dynamic")
    sentences = sample(load_corpus().held_out, 64, seed=5)
    ref = embed(R.ort_runner(repo.file_path(repo.load_manifest("minilm-plain"), "model.onnx"), 2), load_tokenizer(),
                sentences)
    proc = subprocess.Popen([sys.executable, "-m", "headrace.workers", "--model", m.name, "--model-repo",
                             str(repo.root), "--redis-url", redis_url, "--backend", "litert", "--consumer", "edge-bench"])
    try:
        with Client(redis_url, timeout_s=300, require_registered=False) as c:
            tickets = [c.submit(m.name, text=t) for t in sentences]
            got = np.stack([t.result(300).raise_for_status().outputs["embeddings"] for t in tickets])
    finally:
        proc.terminate()
        proc.wait(30)
    cos = cosine_per_row(ref, got)
    print(f"LiteRT worker {m.name}/{m.version} through {redis_url}: {len(got)} answers, "
          f"cosine to fp32 ONNX mean {cos.mean():.4f} min {cos.min():.4f}")
    return 0 if cos.mean() >= 0.99 else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        return serve(sys.argv[2] if len(sys.argv) > 2 else "redis://127.0.0.1:6379/0")
    quant = sys.argv[1] if len(sys.argv) > 1 else "dynamic"
    repo = ModelRepository(W / "model_repo")
    build_minilm(repo, optimize=False, name="minilm-plain")
    c = load_corpus()
    W.mkdir(parents=True, exist_ok=True)
    (W / "cal.txt").write_text("\n".join(sample(c.train, 256, seed=1)) + "\n")
    (W / "held.txt").write_text("\n".join(sample(c.held_out, 400, seed=2)) + "\n")
    res = run_any(AnyModelOptions("minilm-plain", data=W / "cal.txt", held_out=W / "held.txt", repo=repo.root,
                                  work_dir=W, steps=("tflite",), tflite=TfliteOptions(quant=quant), min_fidelity=0.99,
                                  threads=2, calibration_limit=128))
    print(res.markdown)
    print(res.refused, res.details.get("failed"))
    if res.published:
        across_corpora(repo, res.published[0])
    return 0 if res.published else 1


if __name__ == "__main__":
    raise SystemExit(main())
