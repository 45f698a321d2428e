"""A worker process serving a ``format: tflite`` repository entry on LiteRT answers through
the queue like any other worker: real worker process, real Redis, the INT8 TFLite export of
a small model made by onnx2tf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the tf extra (ai-edge-litert) is not installed")

from headrace.client import Client  # noqa: E402
from headrace.client import errors as E  # noqa: E402
from headrace.models.repository.store import IOSpec, ModelRepository  # noqa: E402
from tests.support.compress import tiny_tflite  # noqa: E402
from tests.support.procs import ROOT  # noqa: E402


@pytest.mark.timeout(300)
def test_litert_worker_answers_through_the_queue(redis_url: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    onnx_path, tfl, ins, outs = tiny_tflite(tmp_path)
    repo = ModelRepository(tmp_path / "repo")
    repo.add("tiny-edge", {"model.tflite": tfl}, format="tflite", backend="litert", precision="int8",
             inputs=[IOSpec("x", "float32", (16,))], outputs=[IOSpec("logits", "float32", (4,))],
             extra={"tflite_inputs": ins, "tflite_outputs": outs})
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "headrace.workers", "--model", "tiny-edge", "--model-repo",
                             str(repo.root), "--redis-url", redis_url, "--backend", "litert", "--consumer", "edge-1",
                             "--block-ms", "50", "--max-wait-ms", "5"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        x = np.random.default_rng(5).normal(size=(12, 16)).astype(np.float32)
        ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        with Client(redis_url, timeout_s=120) as c:
            tickets = [c.submit("tiny-edge", {"x": row}) for row in x]
            got = np.stack([t.result(120).raise_for_status().outputs["logits"] for t in tickets])
            assert got.shape == (12, 4) and got.dtype == np.float32
            # INT8 inside: close to the fp32 graph, not equal.
            assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max() + 0.05
            assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
            bad = c.submit("tiny-edge", {"x": np.ones(3, np.float32)}).result(60)
            assert bad.status != "ok" and bad.code == E.BAD_SHAPE
            again = c.infer("tiny-edge", {"x": x[0]}, timeout_s=60)  # still serving after a bad request
            np.testing.assert_allclose(again.outputs["logits"], got[0], atol=1e-6)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    assert "tflite" in (tmp_path / "worker.log").read_text(errors="replace")
