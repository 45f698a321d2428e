"""Compress real models through ``headrace compress NAME`` (the any-model path) and record
their reports: the ResNet-style CNN (torch entry), a skl2onnx classifier and silero-vad's
ONNX file. Each model's table and PNG land in ``docs/img/`` and ``runs/compress-any/``.

    .venv/bin/python -m benchmarks.compress_any cnn sklearn silero --threads 2

Ratios are measured side by side in one run (artifacts take turns over the same batches);
the load average is printed with every table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from headrace.models.compress.anymodel import AnyModelOptions, run_any
from headrace.models.compress.steps import PruneOptions
from headrace.models.repository.store import IOSpec, ModelRepository

WORK = Path("runs/compress-any")
IMG = Path("docs/img")


def _keep(res: object, model: str) -> None:
    rd = res.report_dir  # type: ignore[attr-defined]
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copy(rd / "speed-vs-fidelity.png", IMG / f"compress-any-{model}.png")
    print(f"\n### {model} (load average {os.getloadavg()})\n\n{res.markdown}\n\nreport: {rd}")  # type: ignore[attr-defined]


def cnn(repo: ModelRepository, threads: int) -> None:
    import torch

    from headrace.models.builtin import cnn as C

    torch.set_num_threads(threads)
    if not repo.versions(C.NAME):
        net, rep = C.train()
        print(f"trained {C.NAME}: {rep}")
        C.add_to_repository(repo, net, rep)
    cal, held = C.write_data(WORK / "cnn-data")
    for prune_fraction in (0.4,):
        res = run_any(AnyModelOptions(C.NAME, data=cal, held_out=held, repo=repo.root, work_dir=WORK,
                                      steps=("quantize-static", "quantize-dynamic", "prune", "tflite"),
                                      min_fidelity=0.98, threads=threads,
                                      prune=PruneOptions(fraction=prune_fraction, recover_steps=400)))
        _keep(res, "cnn")


def sklearn(repo: ModelRepository, threads: int) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    clf = make_pipeline(StandardScaler(), MLPClassifier((256, 128), max_iter=400, random_state=0)).fit(xtr, ytr)
    onx = to_onnx(clf, xtr[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    path = WORK / "sklearn.onnx"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    if not repo.versions("breast-cancer-mlp"):
        repo.add("breast-cancer-mlp", {"model.onnx": path}, format="onnx", inputs=[IOSpec("X", "float32", (30,))],
                 outputs=[IOSpec("probabilities", "float32", (2,))], source="skl2onnx MLPClassifier, sklearn breast cancer")
    np.savez(WORK / "bc-cal.npz", X=xtr)
    np.savez(WORK / "bc-held.npz", X=xte, labels=yte.astype(np.int64))
    res = run_any(AnyModelOptions("breast-cancer-mlp", data=WORK / "bc-cal.npz", held_out=WORK / "bc-held.npz",
                                  repo=repo.root, work_dir=WORK, output="probabilities", kind="classification",
                                  steps=("quantize-dynamic", "quantize-static"), threads=threads))
    _keep(res, "sklearn")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=["cnn", "sklearn", "silero"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repo", default=str(WORK / "model_repo"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    repo = ModelRepository(args.repo)
    for m in args.models:
        {"cnn": cnn, "sklearn": sklearn, "silero": silero}[m](repo, args.threads)
    return 0


def silero(repo: ModelRepository, threads: int) -> None:
    from benchmarks.compress_silero import run as run_silero

    # The default gate first (it may refuse), then the floor a VAD user would accept.
    for floor in (0.99, 0.98):
        _keep(run_silero(repo, WORK, threads, floor), f"silero-{floor}")


if __name__ == "__main__":
    raise SystemExit(main())
