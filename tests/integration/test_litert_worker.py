"""``headrace compress --steps tflite`` makes an INT8 TFLite entry (onnx2tf, checked in
LiteRT), and a worker process serving it on LiteRT answers through the queue like any other
worker: real worker process, real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the tf extra (ai-edge-litert) is not installed")

from headrace.client import Client  # noqa: E402
from headrace.client import errors as E  # noqa: E402
from headrace.models.compress.anymodel import AnyModelOptions, run_any  # noqa: E402
from headrace.models.repository.store import ModelRepository  # noqa: E402
from tests.support.compress import add_tiny_mlp, mlp_data  # noqa: E402
from tests.support.procs import ROOT  # noqa: E402


@pytest.mark.timeout(300)
def test_litert_worker_answers_through_the_queue(redis_url: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    repo = ModelRepository(tmp_path / "repo")
    add_tiny_mlp(repo, tmp_path)
    onnx_path = repo.file_path(repo.load_manifest("tiny"), "model.onnx")
    cal, held = mlp_data(tmp_path / "data")
    res = run_any(AnyModelOptions("tiny", data=cal, held_out=held, repo=repo.root, work_dir=tmp_path / "work",
                                  steps=("tflite",), threads=1, progress=False, bench=False, min_fidelity=0.9))
    assert res.published == ["tiny-tflite-int8/1"], (res.refused, res.details)
    repo.verify("tiny")  # the conversion never touches the source entry's files
    m = repo.verify("tiny-tflite-int8")
    assert (m.format, m.backend, m.precision, m.model_file) == ("tflite", "litert", "int8", "model.tflite")
    assert m.measured["fidelity"]["score"] >= 0.9 and m.recipe[-1]["step"] == "tflite"
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "headrace.workers", "--model", "tiny-tflite-int8", "--model-repo",
                             str(repo.root), "--redis-url", redis_url, "--backend", "litert", "--consumer", "edge-1",
                             "--block-ms", "50", "--max-wait-ms", "5"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        x = np.random.default_rng(5).normal(size=(12, 16)).astype(np.float32)
        ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        # Submitted before the worker has registered: the requests wait in the stream for it.
        with Client(redis_url, timeout_s=120, require_registered=False) as c:
            tickets = [c.submit("tiny-tflite-int8", {"x": row}) for row in x]
            got = np.stack([t.result(120).raise_for_status().outputs["logits"] for t in tickets])
            assert got.shape == (12, 4) and got.dtype == np.float32
            # INT8 inside: close to the fp32 graph, not equal.
            assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max() + 0.05
            assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
            bad = c.submit("tiny-tflite-int8", {"x": np.ones(3, np.float32)}).result(60)
            assert bad.status != "ok" and bad.code == E.BAD_SHAPE
            again = c.infer("tiny-tflite-int8", {"x": x[0]}, timeout_s=60)  # still serving after a bad request
            np.testing.assert_allclose(again.outputs["logits"], got[0], atol=1e-6)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    assert "tflite" in (tmp_path / "worker.log").read_text(errors="replace")
