"""A ResNet-style CNN defined here and trained briefly on scikit-learn's bundled digits,
upscaled from 8x8 to 32x32 (nothing is downloaded): the convolutional model that channel
pruning and static INT8 quantization are measured on.

Signature: input ``image`` float32 ``(1, 32, 32)`` (intensities in [0, 1]), output ``logits``
float32 ``(10,)``. Stored as a ``format: torch`` repository entry (safetensors weights plus
``cnn_config.json``, built by :func:`torch_factory`), like a user's own torch model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from headrace.client.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

NAME = "digits-cnn"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SIDE = 32
CONFIG_FILE = "cnn_config.json"
WEIGHTS_FILE = "model.safetensors"
SOURCE = "sklearn.datasets.load_digits upscaled to 32x32, ResNet-style CNN trained by headrace.models.builtin.cnn"


@dataclass(frozen=True)
class CnnConfig:
    """Stage widths (each stage: ``blocks`` basic residual blocks; stages after the first
    halve the resolution)."""

    widths: tuple[int, ...] = (32, 64, 128)
    blocks: int = 2
    classes: int = 10

    def __post_init__(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths) or self.blocks < 1 or self.classes < 2:
            raise ConfigError(f"CNN config {self} needs positive widths, blocks >= 1 and classes >= 2")

    def to_dict(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "blocks": self.blocks, "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CnnConfig:
        return cls(tuple(int(x) for x in d["widths"]), int(d["blocks"]), int(d["classes"]))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a (projected when the shape changes) shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetCNN(nn.Module):
    """``forward(image [B, 1, 32, 32]) -> logits [B, classes]``."""

    def __init__(self, config: CnnConfig | None = None) -> None:
        super().__init__()
        self.config = config or CnnConfig()
        w = self.config.widths
        self.stem = nn.Sequential(nn.Conv2d(1, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = w[0]
        for i, cout in enumerate(w):
            for b in range(self.config.blocks):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, self.config.classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(image))), 1))


def load_images(*, seed: int = 0, test_fraction: float = 0.25) -> tuple[npt.NDArray[np.float32], ...]:
    """(x_train, y_train, x_test, y_test): the bundled digits, bilinearly upscaled to 32x32
    and scaled to [0, 1], in the stratified split of :func:`headrace.models.builtin.digits.load_data`."""
    import torch.nn.functional as F

    from headrace.models.builtin.digits import PIXEL_MAX, load_data

    d = load_data(seed=seed, test_fraction=test_fraction)

    def up(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        t = torch.from_numpy(x.reshape(-1, 1, 8, 8) / PIXEL_MAX)
        return F.interpolate(t, size=(SIDE, SIDE), mode="bilinear", align_corners=False).numpy().astype(np.float32)

    return up(d.x_train), d.y_train, up(d.x_test), d.y_test  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    test_accuracy: float
    final_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(config: CnnConfig | None = None, *, epochs: int = 6, seed: int = 0, lr: float = 1e-2,
          batch_size: int = 64) -> tuple[ResNetCNN, TrainReport]:
    """Train a :class:`ResNetCNN` on the upscaled digits (AdamW, one-cycle; seeded)."""
    x, y, xt, yt = load_images(seed=seed)
    torch.manual_seed(seed)
    net = ResNetCNN(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    loss = torch.tensor(0.0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), batch_size):
            idx = perm[start:start + batch_size]
            loss = nn.functional.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    log.info("trained %s: %d epochs, test accuracy %.4f", NAME, epochs, acc)
    return net, TrainReport(epochs, acc, float(loss.detach()))


def save(model: ResNetCNN, folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict()))
    return {WEIGHTS_FILE: folder / WEIGHTS_FILE, CONFIG_FILE: folder / CONFIG_FILE}


def torch_factory(folder: Path, manifest: Any) -> nn.Module:
    """Factory named by the manifest (``extra.torch_factory``).

    Raises:
        ModelError: missing or mismatched files.
    """
    from safetensors.torch import load_file

    try:
        net = ResNetCNN(CnnConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text())))
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load the CNN from {folder}: {e}") from e
    return net.eval()


def add_to_repository(repo: Any, model: ResNetCNN, report: TrainReport, *, name: str = NAME) -> Any:
    """Add ``model`` as a ``format: torch`` entry; returns the manifest."""
    from headrace.models.repository.store import IOSpec

    with tempfile.TemporaryDirectory(prefix="headrace-cnn-") as tmp:
        return repo.add(name, save(model, Path(tmp)), format="torch", backend="torch", precision="fp32",
                        inputs=[IOSpec(INPUT_NAME, "float32", (1, SIDE, SIDE))],
                        outputs=[IOSpec(OUTPUT_NAME, "float32", (model.config.classes,))],
                        source=SOURCE, recipe=[{"step": "train", "params": report.to_dict()}],
                        measured={"test_accuracy": report.test_accuracy},
                        extra={"torch_factory": "headrace.models.builtin.cnn:torch_factory",
                               "cnn_config": model.config.to_dict()},
                        description="ResNet-style CNN on upscaled scikit-learn digits, fp32 torch")


def write_data(folder: Path, *, seed: int = 0, calibration: int = 512) -> tuple[Path, Path]:
    """``calibration.npz`` (training images) and ``held_out.npz`` (test images with labels)
    in ``folder``, as a user would pass them to ``headrace compress --data/--held-out``."""
    x, _, xt, yt = load_images(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    cal, held = folder / "calibration.npz", folder / "held_out.npz"
    cal_arrays: dict[str, Any] = {INPUT_NAME: x[:calibration]}
    held_arrays: dict[str, Any] = {INPUT_NAME: xt, "labels": yt}
    np.savez(cal, **cal_arrays)
    np.savez(held, **held_arrays)
    return cal, held
