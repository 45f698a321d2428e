"""What shrinking onnxruntime's CPU arena after every run would cost, against the worker's
rule (shrink only after a run that left the process 512 MB past its size after loading),
side by side in one process, and what each leaves resident after one oversized run.

    python -m benchmarks.arena_shrink [--threads 2] [--repeats 4]

The model is a 6-layer MLP (384 -> 1536 -> 384, GELU-free: MatMul + Relu) built with
``onnx.helper``: a transformer's FFN blocks, the allocation pattern the worker's models have.
Prints ms per run at three batch shapes for: the arena kept (onnxruntime's default), shrunk
after every run, and the worker's :class:`OnnxServable` rule; then the memory each keeps after one oversized run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def mlp(path: Path, layers: int = 6, width: int = 384, hidden: int = 1536) -> Path:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [nh.from_array((rng.standard_normal((width, hidden)) / width**0.5).astype(np.float32), f"w{i}a"),
                  nh.from_array((rng.standard_normal((hidden, width)) / hidden**0.5).astype(np.float32), f"w{i}b")]
        nodes += [h.make_node("MatMul", [x, f"w{i}a"], [f"h{i}"]), h.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  h.make_node("MatMul", [f"r{i}", f"w{i}b"], [f"y{i}"])]
        x = f"y{i}"
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["B", "S", width])],
                         [h.make_tensor_value_info(x, T.FLOAT, ["B", "S", width])], initializer=inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def rss_mb() -> float:
    from headrace.workers.backends.onnx import rss_bytes

    return rss_bytes() / 2**20


def main() -> None:
    import onnxruntime as ort

    from headrace.models.repository.store import IOSpec, ModelRepository
    from headrace.workers.backends.onnx import OnnxServable

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = mlp(Path(tmp) / "mlp.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        kept = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        always = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        repo = ModelRepository(Path(tmp) / "repo")
        m = repo.add("mlp", {"model.onnx": src}, format="onnx", inputs=[IOSpec("x", "float32", (-1, 384))],
                     outputs=[IOSpec("y5", "float32", (-1, 384))])
        worker = OnnxServable(m, repo.path("mlp", m.version) / "model.onnx", intra_op_threads=args.threads)
        modes: dict[str, Any] = {
            "arena kept": lambda x: kept.run(None, {"x": x}),
            "shrunk every run": lambda x: always.run(None, {"x": x}, shrink),
            "worker rule": lambda x: worker._run({"x": x}),
        }
        print(f"| batch x tokens | {' | '.join(modes)} | every run / kept |")
        print(f"|---|{'---|' * len(modes)}---|")
        for b, s, n in ((32, 32, 20), (8, 16, 150), (1, 8, 600)):
            x = np.random.default_rng(1).standard_normal((b, s, 384)).astype(np.float32)
            best = {k: float("inf") for k in modes}
            for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
                for name, run in modes.items():
                    run(x)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        run(x)
                    best[name] = min(best[name], (time.perf_counter() - t0) / n * 1000)
            cells = " | ".join(f"{best[k]:.3f} ms" for k in modes)
            print(f"| {b} x {s} | {cells} | {best['shrunk every run'] / best['arena kept']:.2f} |")
        big = np.random.default_rng(2).standard_normal((256, 1024, 384)).astype(np.float32)  # 400 MB in
        small = np.zeros((1, 8, 384), np.float32)
        print("\n| one 256 x 1024 run (1.5 GB of activations), then two small runs | RSS kept afterwards |"
              "\n|---|---|")
        for name, run in modes.items():
            before = rss_mb()
            run(big)
            run(small)
            run(small)
            print(f"| {name} | +{rss_mb() - before:.0f} MB |")


if __name__ == "__main__":
    main()
