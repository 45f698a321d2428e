"""torch programs and operator servables, added with ``headrace models add`` and served by
``headrace worker``; and manifests that do not match their model refuse to start.

* silero-vad's own TorchScript file behind the example operator servable
  (examples/silero_vad: int16 PCM in, custom preprocessing, ``--servable``): answers equal
  silero's ``audio_forward`` on each clip alone, batches > 1;
* a TorchScript and a ``torch.export`` program served by the torch backend (and each
  converted with ``--to-onnx``): answers equal the module's own;
* a manifest edited to disagree with its model (a fixed dim, a dtype, a torch program's
  output dtype, which the worker never converts): the worker exits
  non-zero naming both sides, before it registers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.byom import Worker, latest, max_batch_seen, models_add, raw_infer, sdk_infer, serving

pytestmark = pytest.mark.timeout(300)

SILERO_SERVABLE = "examples.silero_vad.servable:SileroClipVAD"


def _silero_jit() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data" / "silero_vad.jit"


def test_silero_torchscript_through_the_example_operator_servable(redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models_add(repo, "vad-clip", _silero_jit(), "--servable", SILERO_SERVABLE)
    assert latest(repo, "vad-clip").format == "torchscript"
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(n) * 3000).astype(np.int16) for n in (512, 1600, 4000, 700, 2048, 3333, 100, 5000)]
    with serving(redis_url, repo, "vad-clip", tmp_path / "worker.log", "--servable", SILERO_SERVABLE,
                 "--max-batch", "16") as w:
        entry = w.wait_registered(redis_url, "vad-clip")
        sdk = sdk_infer(redis_url, "vad-clip", [{"pcm": c} for c in clips])
        raw = raw_infer(redis_url, "vad-clip", [{"pcm": c} for c in clips])
    assert "SileroClipVAD" in json.dumps(entry["signatures"])
    ref_model = torch.jit.load(str(_silero_jit()))
    # silero's audio_forward zero-pads to whole chunks itself, but refuses clips under one chunk.
    padded = [np.pad(c.astype(np.float32) / 32768.0, (0, -len(c) % 512)) for c in clips]
    expected = [ref_model.audio_forward(torch.from_numpy(p[None]), 16000)[0].numpy() for p in padded]
    assert [len(e) for e in expected] == [math.ceil(len(c) / 512) for c in clips]
    for got in ([r.outputs["speech_prob"] for r in sdk], [r["outputs"]["speech_prob"] for r in raw]):
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, atol=1e-5)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


class _Scaler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x) + bias, x.sum(-1)


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("torch")
    module = _Scaler().eval()
    torch.jit.save(torch.jit.script(module), str(folder / "scaler.pt"))
    batch = torch.export.Dim("batch")
    ep = torch.export.export(module, (torch.randn(2, 5), torch.randn(2, 3)), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(ep, str(folder / "scaler.pt2"))
    x = np.random.default_rng(2).standard_normal((9, 5)).astype(np.float32)
    b = np.random.default_rng(3).standard_normal((9, 3)).astype(np.float32)
    np.savez(folder / "example.npz", x=x[:2], bias=b[:2])
    with torch.no_grad():
        y, s = module(torch.from_numpy(x), torch.from_numpy(b))
    return {"folder": folder, "x": x, "b": b, "y": y.numpy(), "s": s.numpy()}


@pytest.mark.parametrize("source,args", [("scaler.pt", ("--example", "EXAMPLE", "--output", "y:float32:3",
                                                        "--output", "total:float32:")),
                                         ("scaler.pt2", ("--output", "y:float32:3", "--output", "total:float32:")),
                                         ("scaler.pt", ("--example", "EXAMPLE", "--to-onnx", "--output", "y:float32:3",
                                                        "--output", "total:float32:")),
                                         ("scaler.pt2", ("--to-onnx", "--output", "y:float32:3",
                                                         "--output", "total:float32:"))])
def test_torch_programs_served(source: str, args: tuple[str, ...], programs: dict[str, Any], redis_url: str,
                               tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = programs["folder"]
    models_add(repo, "scaler", folder / source, *[str(folder / "example.npz") if a == "EXAMPLE" else a for a in args])
    m = latest(repo, "scaler")
    assert m.format == ("onnx" if "--to-onnx" in args else "torchscript" if source.endswith(".pt") else "pt2")
    assert [(s.name, s.shape) for s in m.inputs] == [("x", (5,)), ("bias", (3,))]
    samples = [{"x": x, "bias": b} for x, b in zip(programs["x"], programs["b"], strict=True)]
    with serving(redis_url, repo, "scaler", tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, "scaler", samples)
        raw = raw_infer(redis_url, "scaler", samples)
    for got in ([r.outputs for r in sdk], [r["outputs"] for r in raw]):
        np.testing.assert_allclose(np.stack([g["y"] for g in got]), programs["y"], atol=1e-5)
        np.testing.assert_allclose(np.array([g["total"] for g in got]), programs["s"], atol=1e-5)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


def _edit_manifest(repo: Path, name: str, edit: Any) -> None:
    path = repo / name / "1" / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _refused(url: str, repo: Path, name: str, log: Path) -> str:
    w = Worker(url, repo, name, log)
    try:
        assert w.proc.wait(120) != 0
    finally:
        w.stop()
    return w.log()


def test_wrong_onnx_manifest_refuses_to_start_naming_both_sides(programs: dict[str, Any], redis_url: str,
                                                               tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = programs["folder"]
    models_add(repo, "scaler", folder / "scaler.pt", "--example", str(folder / "example.npz"), "--to-onnx")

    def wrong_dim(doc: dict[str, Any]) -> None:
        doc["inputs"][0]["shape"] = [7]

    _edit_manifest(repo, "scaler", wrong_dim)
    log = _refused(redis_url, repo, "scaler", tmp_path / "w1.log")
    assert "manifest says float32 [B,7]" in log and "model.onnx has float32 [B,5]" in log, log

    def wrong_dtype(doc: dict[str, Any]) -> None:
        doc["inputs"][0]["shape"] = [5]
        doc["outputs"][0]["dtype"] = "int64"

    _edit_manifest(repo, "scaler", wrong_dtype)
    log = _refused(redis_url, repo, "scaler", tmp_path / "w2.log")
    assert "output 'output0': manifest says int64 [B,3]; model.onnx has float32 [B,3]" in log, log


def test_wrong_torchscript_manifest_refuses_to_start(programs: dict[str, Any], redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = programs["folder"]
    models_add(repo, "scaler", folder / "scaler.pt", "--example", str(folder / "example.npz"))

    def wrong_output(doc: dict[str, Any]) -> None:
        doc["outputs"][0]["shape"] = [4]

    _edit_manifest(repo, "scaler", wrong_output)
    log = _refused(redis_url, repo, "scaler", tmp_path / "w.log")
    assert "manifest says float32 [4] per sample; the model returned float32 [3]" in log, log


def test_torchscript_manifest_with_another_output_dtype_refuses_to_start(programs: dict[str, Any], redis_url: str,
                                                                         tmp_path: Path) -> None:
    # The worker used to cast outputs to the manifest's dtype: float32 answers truncated to
    # int64 in silence. A dtype that is not the model's is a mismatch like a wrong dim.
    repo = tmp_path / "repo"
    folder = programs["folder"]
    models_add(repo, "scaler", folder / "scaler.pt", "--example", str(folder / "example.npz"))

    def wrong_dtype(doc: dict[str, Any]) -> None:
        doc["outputs"][0]["dtype"] = "int64"

    _edit_manifest(repo, "scaler", wrong_dtype)
    log = _refused(redis_url, repo, "scaler", tmp_path / "w.log")
    assert "[model_error]" in log and "output 'output0': manifest says int64; the model returned float32" in log, log
