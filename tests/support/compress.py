"""Small models for the compression tests, added through the repository API, with the
heavy artifacts (trained CNN weights, an onnx2tf conversion) cached under ``.cache/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headrace.models.repository.store import IOSpec, Manifest, ModelRepository

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "compress-tests"


def tiny_mlp_onnx(path: Path, *, width: int = 64, seed: int = 0) -> Path:
    """A 16 -> width -> width -> 4 ReLU MLP exported to ONNX (dynamic batch)."""
    import torch

    from headrace.models.compress.export import export_onnx

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 4))
    export_onnx(net, {"x": np.random.default_rng(seed).normal(size=(2, 16)).astype(np.float32)}, path,
                output_names=["logits"])
    return path


def add_tiny_mlp(repo: ModelRepository, tmp: Path, name: str = "tiny") -> Manifest:
    return repo.add(name, {"model.onnx": tiny_mlp_onnx(tmp / f"{name}.onnx")}, format="onnx",
                    inputs=[IOSpec("x", "float32", (16,))], outputs=[IOSpec("logits", "float32", (4,))],
                    source="tests.support.compress")


def mlp_data(folder: Path, n: int = 200, seed: int = 1) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cal, held = folder / "cal.npz", folder / "held.npz"
    np.savez(cal, x=rng.normal(size=(n, 16)).astype(np.float32))
    np.savez(held, x=rng.normal(size=(n // 2, 16)).astype(np.float32),
             labels=rng.integers(0, 4, n // 2).astype(np.int64))
    return cal, held


def tiny_cnn(repo: ModelRepository, name: str = "tiny-cnn") -> Manifest:
    """A small ResNet-style CNN, trained once (cached) and added as a torch entry."""
    import torch

    from headrace.models.builtin import cnn

    folder = CACHE / "tiny-cnn-e10"
    cfg = cnn.CnnConfig((8, 16), 1)
    if not (folder / cnn.WEIGHTS_FILE).is_file():
        torch.set_num_threads(1)
        net, _ = cnn.train(cfg, epochs=10)
        cnn.save(net, folder)
    net = cnn.torch_factory(folder, None)
    return cnn.add_to_repository(repo, net, cnn.TrainReport(10, 0.0, 0.0), name=name)  # type: ignore[arg-type]

