"""Baseline: fp32 torch vs fp32 ONNX (BERT-fused) MiniLM throughput at batch 1 / 8 / 32.

Both run through their servables (same tokenisation, same split of outputs) with the same
number of intra-op threads, on real sentences from the offline corpus. Prints measured
figures; asserts nothing about speed.

    .venv/bin/python -m benchmarks.minilm_backends --threads 2 --seconds 5 [--plot runs/minilm.png] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from headrace.client.protocol import Envelope, Request
from headrace.models.builtin.build import MINILM_NAME, MINILM_TORCH_NAME, ensure_minilm
from headrace.models.repository.store import ModelRepository
from headrace.workers.backends import load_servable
from headrace.workers.backends.base import Servable
from headrace.workers.settings import WorkerSettings


def sentences(n: int) -> list[str]:
    from headrace.models.builtin.corpus import load_corpus, sample

    return sample(load_corpus(("pydoc",)).held_out, n, seed=0)


def measure(servable: Servable, texts: list[str], batch: int, seconds: float) -> dict[str, float]:
    """Run batches of ``batch`` texts for about ``seconds``; sentences/s and batch latency."""
    requests = [Request(Envelope(f"b{i}", "x"), text=t) for i, t in enumerate(texts)]
    servable.infer(requests[:batch])  # warm-up (allocations, first-run kernel choices)
    lat: list[float] = []
    done = 0
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(lat) < 3:
        chunk = [requests[(i + k) % len(requests)] for k in range(batch)]
        t0 = time.perf_counter()
        servable.infer(chunk)
        lat.append(time.perf_counter() - t0)
        done += batch
        i += batch
    total = time.perf_counter() - start
    return {"per_s": done / total, "p50_ms": statistics.median(lat) * 1000, "batches": len(lat)}


def plot(results: dict[tuple[str, int], dict[str, float]], labels: list[str], batches: list[int], threads: int,
         path: str) -> None:
    """A PNG bar chart of sentences/s per backend and batch size at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, label in enumerate(labels):
        xs = [i + (k - 0.5) * width for i in range(len(batches))]
        ax.bar(xs, [results[(label, b)]["per_s"] for b in batches], width, label=label)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("sentences / s")
    ax.set_title(f"MiniLM fp32, CPU, {threads} threads")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repo", help="model repository (built if needed)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for both backends")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per (backend, batch)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--plot", default="", help="write a PNG bar chart here")
    ap.add_argument("--record", action="store_true", help="store the figures in the manifests' measured")
    args = ap.parse_args()

    repo = ModelRepository(args.repo)
    ensure_minilm(repo)
    ensure_minilm(repo, torch_format=True)
    texts = sentences(256)
    mean_chars = sum(map(len, texts)) / len(texts)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[tuple[str, int], dict[str, float]] = {}
    servables = {
        "torch fp32": load_servable(WorkerSettings(model=MINILM_TORCH_NAME, model_repo=str(repo.root),
                                                   intra_op_threads=args.threads), device="cpu"),
        "onnx fp32 (fused)": load_servable(WorkerSettings(model=MINILM_NAME, model_repo=str(repo.root),
                                                          intra_op_threads=args.threads),
                                           providers=["CPUExecutionProvider"]),
    }
    with tqdm(total=len(servables) * len(batches), desc="measuring") as bar:
        for label, s in servables.items():
            for b in batches:
                results[(label, b)] = measure(s, texts, b, args.seconds)
                bar.update()

    table = Table(title=f"MiniLM fp32 on CPU, {args.threads} intra-op threads, "
                        f"{len(texts)} real sentences (mean {mean_chars:.0f} chars)")
    for col in ("backend", "batch", "sentences/s", "p50 batch ms", "sentences/s @p50", "batches run"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for (label, b), r in results.items():
        table.add_row(label, str(b), f"{r['per_s']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{b * 1000 / r['p50_ms']:.1f}", str(int(r["batches"])))
    Console().print(table)
    for b in batches:
        t, o = results[("torch fp32", b)]["per_s"], results[("onnx fp32 (fused)", b)]["per_s"]
        print(f"batch {b}: onnx/torch = {o / t:.2f}x")

    if args.record:
        for label, name in (("torch fp32", MINILM_TORCH_NAME), ("onnx fp32 (fused)", MINILM_NAME)):
            s = servables[label]
            repo.update_measured(name, s.version, {"throughput": {
                f"b{b}": round(results[(label, b)]["per_s"], 1) for b in batches},
                "throughput_setup": f"CPU, {args.threads} threads, sentences/s via the servable"})
    if args.plot:
        plot(results, list(servables), batches, args.threads, args.plot)


if __name__ == "__main__":
    main()
