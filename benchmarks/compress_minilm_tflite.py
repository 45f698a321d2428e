"""MiniLM to INT8 TFLite through ``headrace compress --steps tflite``: the plain (unfused)
export is added as ``minilm-plain``, converted by onnx2tf with dynamic-range INT8, run in
LiteRT and measured against the fp32 ONNX graph on 400 held-out corpus sentences.

    .venv/bin/python -m benchmarks.compress_minilm_tflite [dynamic|integer]
"""

from __future__ import annotations

import sys
from pathlib import Path

from headrace.models.builtin.build import build_minilm
from headrace.models.builtin.corpus import load_corpus, sample
from headrace.models.compress.anymodel import AnyModelOptions, run_any
from headrace.models.compress.steps import TfliteOptions
from headrace.models.repository.store import ModelRepository

W = Path("runs/compress-minilm-tflite")


def main() -> int:
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
