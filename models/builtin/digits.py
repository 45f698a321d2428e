"""The labelled-accuracy model: an MLP trained locally on scikit-learn's bundled digits.

MiniLM's compression is judged by similarity to its own fp32 self; this model has ground
truth, so compression shows up as lost test accuracy. scikit-learn ships the 1,797 8x8
handwritten digits (UCI optdigits test set) inside the package, so nothing is downloaded.

Signature: input ``image`` float32 (64,) -- the 8x8 pixel intensities 0..16 as scikit-learn
gives them, row-major; scaling happens inside the model -- and output ``logits`` float32 (10,).
Training is seeded and takes a few seconds on CPU. Weights are stored as safetensors plus a
JSON config (``digits_config.json``), never pickle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from headrace.client.errors import ConfigError, ModelError, ModelNotFoundError
from headrace.client.optional import WORKER, require

log = logging.getLogger(__name__)

NAME = "digits"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
NUM_PIXELS = 64
NUM_CLASSES = 10
PIXEL_MAX = 16.0
CONFIG_FILE = "digits_config.json"
WEIGHTS_FILE = "model.safetensors"
SOURCE = "sklearn.datasets.load_digits (UCI optdigits), trained by headrace.models.builtin.digits"


@dataclass(frozen=True)
class DigitsData:
    """A stratified, seeded train/test split of the digits (pixels 0..16, float32)."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    seed: int


def load_data(*, seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """The bundled digits split into train/test (stratified by class, seeded).

    Raises:
        ConfigError: ``test_fraction`` outside (0, 1).
    """
    require("sklearn", "compress", purpose="the digits model")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must be between 0 and 1 (exclusive), e.g. 0.25")
    ds = load_digits()
    x = np.asarray(ds.data, dtype=np.float32)
    y = np.asarray(ds.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return DigitsData(x_tr, y_tr, x_te, y_te, seed)


@dataclass(frozen=True)
class DigitsConfig:
    """Architecture: hidden layer widths (ReLU MLP). Pruning shrinks them."""

    hidden_sizes: tuple[int, ...] = (256, 128)

    def to_dict(self) -> dict[str, Any]:
        return {"hidden_sizes": list(self.hidden_sizes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DigitsConfig:
        try:
            sizes = tuple(int(x) for x in d["hidden_sizes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"digits config {d!r} needs hidden_sizes: list of ints") from e
        if not sizes or any(s < 1 for s in sizes):
            raise ModelError(f"digits hidden sizes {sizes} must be positive")
        return cls(sizes)


class DigitsMLP(nn.Module):
    """``forward(image [B, 64] float32 in 0..16) -> logits [B, 10]``.

    ``hidden`` is a list of Linear layers each followed by ReLU; ``head`` maps to classes.
    """

    def __init__(self, config: DigitsConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitsConfig()
        widths = (NUM_PIXELS, *self.config.hidden_sizes)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(widths[-1], NUM_CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.reshape(image.shape[0], NUM_PIXELS) / PIXEL_MAX
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)

    def activations(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Post-ReLU output of each hidden layer (for pruning importance)."""
        x = image.reshape(image.shape[0], NUM_PIXELS) / PIXEL_MAX
        out = []
        for layer in self.hidden:
            x = torch.relu(layer(x))
            out.append(x)
        return out

    def current_config(self) -> DigitsConfig:
        return DigitsConfig(tuple(cast(nn.Linear, layer).out_features for layer in self.hidden))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class TrainReport:
    seed: int
    epochs: int
    train_accuracy: float
    test_accuracy: float
    final_loss: float
    train_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(
    data: DigitsData | None = None,
    *,
    config: DigitsConfig | None = None,
    seed: int = 0,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    model: DigitsMLP | None = None,
    threads: int = 1,
) -> tuple[DigitsMLP, TrainReport]:
    """Train (or fine-tune ``model``) with AdamW + cross-entropy; deterministic for a seed.

    Takes about a second for the default 60 epochs on one CPU core. ``threads`` is the torch
    intra-op thread count while training (restored afterwards): this model is so small that
    one thread is fastest, and more only spin against other processes on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(data or load_data(seed=seed), config, seed, epochs, batch_size, lr, weight_decay, model)
    finally:
        torch.set_num_threads(previous)


def _train(data: DigitsData, config: DigitsConfig | None, seed: int, epochs: int, batch_size: int, lr: float,
           weight_decay: float, model: DigitsMLP | None) -> tuple[DigitsMLP, TrainReport]:
    torch.manual_seed(seed)
    net = model if model is not None else DigitsMLP(config)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    net.eval()
    report = TrainReport(seed=seed, epochs=epochs, train_accuracy=accuracy(net, data.x_train, data.y_train),
                         test_accuracy=accuracy(net, data.x_test, data.y_test), final_loss=float(loss.item()),
                         train_s=time.perf_counter() - t0)
    log.info("digits: trained %s for %d epochs in %.1fs, test accuracy %.4f",
             net.current_config().hidden_sizes, epochs, report.train_s, report.test_accuracy)
    return net, report


def predict_logits(model: nn.Module, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Logits [n, 10] of a torch digits model."""
    model.eval()
    with torch.inference_mode():
        return np.asarray(model(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy())


def accuracy(model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Share of ``x`` classified as ``y``."""
    return float((predict_logits(model, x).argmax(axis=1) == y).mean())


def onnx_logits(path: str | Path, x: npt.NDArray[np.float32], *, threads: int = 1) -> npt.NDArray[np.float32]:
    """Logits [n, 10] of a digits ONNX model on the CPU.

    Raises:
        ModelError: the file cannot be loaded or run.
    """
    ort = require("onnxruntime", WORKER)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(x, dtype=np.float32)})[0])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        raise ModelError(f"cannot run digits model {path}: {e}") from e


# --- files ------------------------------------------------------------------------------


def save(model: DigitsMLP, folder: str | Path) -> list[Path]:
    """Write ``model.safetensors`` + ``digits_config.json``; returns the files."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"arch": "headrace.digits"})
    cfg = out / CONFIG_FILE
    cfg.write_text(json.dumps(model.current_config().to_dict()))
    return [weights, cfg]


def load(folder: str | Path) -> DigitsMLP:
    """Inverse of :func:`save` (eval mode).

    Raises:
        ModelNotFoundError: files missing. ModelError: weights do not fit the config.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, cfg_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not cfg_path.is_file():
        raise ModelNotFoundError(f"digits model needs {WEIGHTS_FILE} and {CONFIG_FILE} in {folder}")
    try:
        cfg = DigitsConfig.from_dict(json.loads(cfg_path.read_text()))
        model = DigitsMLP(cfg)
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load digits model from {folder}: {e}") from e
    return model.eval()


def torch_factory(folder: Path, manifest: Any) -> nn.Module:
    """Factory named by torch-format manifests (``extra.torch_factory``)."""
    return load(folder)


def export(model: DigitsMLP, path: str | Path, *, check: npt.NDArray[np.float32] | None = None) -> Any:
    """Export to ONNX (dynamic batch) through the shared exporter, checked against torch.

    Returns the :class:`~headrace.models.compress.export.ExportReport`.

    Raises:
        ModelError: export failed or differs from torch.
    """
    from headrace.models.compress.export import export_onnx

    sample = check if check is not None else load_data().x_test[:17]
    example = {INPUT_NAME: torch.from_numpy(np.asarray(sample[:2], dtype=np.float32))}
    return export_onnx(model, example, path, output_names=[OUTPUT_NAME],
                       check_inputs=[{INPUT_NAME: np.asarray(sample, dtype=np.float32)}])


def signature() -> tuple[Any, Any]:
    """(inputs, outputs) IOSpecs of the repository entry."""
    from headrace.models.repository.store import IOSpec

    return (IOSpec(INPUT_NAME, "float32", (NUM_PIXELS,)),), (IOSpec(OUTPUT_NAME, "float32", (NUM_CLASSES,)),)


def add_to_repository(
    repo: Any,
    model: DigitsMLP,
    *,
    name: str = NAME,
    onnx_path: str | Path | None = None,
    precision: str = "fp32",
    recipe: Sequence[dict[str, Any]] = (),
    measured: dict[str, Any] | None = None,
    description: str = "",
) -> Any:
    """Add a digits entry (ONNX, with the torch weights alongside) to a model repository.

    ``onnx_path`` is the graph to serve (e.g. an INT8 one); default: export ``model``.
    Returns the written :class:`~headrace.models.repository.store.Manifest`.

    Raises:
        ModelError / RepositoryError: export failed or the repository refused the entry.
    """
    from headrace.models.repository.store import ModelRepository

    r = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    inputs, outputs = signature()
    with tempfile.TemporaryDirectory(prefix="headrace-digits-") as tmp:
        files: dict[str, str | Path] = dict(zip((WEIGHTS_FILE, CONFIG_FILE), save(model, tmp), strict=True))
        if onnx_path is None:
            onnx_path = Path(tmp) / "model.onnx"
            export(model, onnx_path)
        files["model.onnx"] = Path(onnx_path)
        return r.add(name, files, format="onnx", backend="onnxruntime", precision=precision, inputs=inputs,
                     outputs=outputs, source=SOURCE, recipe=list(recipe) or [{"step": "train", "params": {}}],
                     measured=measured or {},
                     extra={"arch": "digits", "torch_factory": "headrace.models.builtin.digits:torch_factory",
                            "digits_config": model.current_config().to_dict()},
                     description=description or f"MLP on scikit-learn digits, {precision} ONNX")
